"""The vLLM front end's step planning and assembly, driven directly (no vLLM needed).

A stand-in model runner exposes the host-side arrays vLLM's runner has (request index, query
start offsets, computed-token counts); the tests feed the layer hooks synthetic residual streams
split as vLLM's decoder layers return them, ``(out, residual)``, over steps that mix sampled and
unsampled requests and split prompts over several steps (chunked prefill), and check that each
exported sample equals the states of the request's whole prompt. On a CUDA machine the same runs
on the GPU under ``torch.cuda.set_sync_debug_mode("error")``: no host synchronisation.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import drain_samples, make_tiny

from monitor.config import TapSettings
from monitor.tap.vllm.frontend import VllmTap
from monitor.tap.vllm.plugin import MARK, client_request_id
from monitor.transport.memory import MemoryTransport

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
D = 32  # tiny llama: 2 blocks, d=32


class FakeRunner:
    """The parts of vLLM's GPUModelRunner the tap reads."""

    def __init__(self, model: Any, device: str) -> None:
        self.model = model
        self.device = torch.device(device)
        self.input_batch = SimpleNamespace(req_id_to_index={}, num_computed_tokens_cpu=np.zeros(8, np.int32))
        self.query_start_loc = SimpleNamespace(np=np.zeros(9, np.int32))
        self.forwarded = 0

    def execute_model(self, scheduler_output: Any) -> None:
        return None

    def _model_forward(self, **kwargs: Any) -> None:
        self.forwarded += 1


def _tap(tmp_path: Path, device: str, positions: str, transport: MemoryTransport) -> tuple[VllmTap, FakeRunner]:
    model = make_tiny("llama")
    model.save_pretrained(tmp_path / "ckpt")
    runner = FakeRunner(model, device)
    cfg = SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=1), speculative_config=None,
                          model_config=SimpleNamespace(model=str(tmp_path / "ckpt"), served_model_name="tiny"))
    settings = TapSettings(transport=transport.url, positions=positions, wire_dtype="float32", max_positions=64)
    return VllmTap(runner, cfg, settings, transport=transport), runner


def _new(req_id: str, plen: int, sampled: bool) -> Any:
    params = SimpleNamespace(extra_args={MARK: {"sampled": sampled, "request_id": f"ext-{req_id}",
                                                **({} if sampled else {"reason": "rate"})}})
    return SimpleNamespace(req_id=req_id, prompt_token_ids=list(range(plen)), sampling_params=params,
                           num_computed_tokens=0)


def _step(tap: VllmTap, runner: FakeRunner, chunks: list[tuple[str, int, int]], states: dict[str, torch.Tensor],
          device: str) -> None:
    """One forward over ``chunks`` [(req, first position, n tokens)]: set the runner's arrays,
    plan, feed every hook the flat batch as vLLM's layers return it, collect."""
    ib = runner.input_batch
    ib.req_id_to_index = {rid: i for i, (rid, _, _) in enumerate(chunks)}
    start = 0
    for i, (_, p0, n) in enumerate(chunks):
        ib.num_computed_tokens_cpu[i] = p0
        runner.query_start_loc.np[i], start = start, start + n
        runner.query_start_loc.np[i + 1] = start
    work = tap._plan()
    if work is None:
        return
    tap._work = work
    n_states = states[chunks[0][0]].shape[0]
    flat = [torch.cat([states[rid][layer, p0:p0 + n] for rid, p0, n in chunks]).to(device) for layer in range(n_states)]
    positions = torch.zeros(start, dtype=torch.long, device=device)
    tap._embed_pre(None, (positions, flat[0], None), {})
    for layer in range(1, n_states):
        residual = torch.randn_like(flat[layer])
        tap._block_hook(layer)(None, None, (flat[layer] - residual, residual))
    tap._work = None
    tap._collect(work)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("positions", ["last+mean", "mean", "last", "all"])
def test_chunked_prompts_among_unsampled_requests_assemble_to_the_whole_prompt(
        tmp_path: Path, device: str, positions: str) -> None:
    """Two sampled prompts split over three steps beside an unsampled one: each sample holds the
    mean and/or last token of its whole prompt (residual stream = out + residual), nothing else."""
    transport = MemoryTransport(f"memory://vllm-plan-{positions}-{device}")
    tap, runner = _tap(tmp_path, device, positions, transport)
    torch.manual_seed(0)
    plen = {"a": 10, "b": 7, "u": 9}
    states = {rid: torch.randn(3, n, D) for rid, n in plen.items()}
    tap._admit(SimpleNamespace(scheduled_new_reqs=[_new(r, plen[r], r != "u") for r in plen], finished_req_ids=set()))
    sync = torch.cuda.set_sync_debug_mode if device == "cuda" else (lambda _mode: None)
    sync("error")
    try:
        _step(tap, runner, [("a", 0, 4), ("u", 0, 5), ("b", 0, 3)], states, device)
        _step(tap, runner, [("b", 3, 4), ("a", 4, 4), ("u", 5, 4)], states, device)
        _step(tap, runner, [("a", 8, 2)], states, device)
    finally:
        sync("default")
    assert tap.core is not None and tap.core.exporter.flush(5)
    got = {s.request_id: s for s in drain_samples(transport, group="t")}
    assert set(got) == {"ext-a", "ext-b"}
    for rid in ("a", "b"):
        st, s = states[rid], got[f"ext-{rid}"]
        want = {"last+mean": torch.stack([st.mean(1), st[:, -1]], 1), "mean": st.mean(1, keepdim=True),
                "last": st[:, -1:], "all": st}[positions]
        assert torch.allclose(torch.from_numpy(np.array(s.hidden)), want, atol=1e-5), rid
        assert s.metadata["prompt_tokens"] == plen[rid]
        assert list(s.position_index) == ({"last": [plen[rid] - 1], "all": list(range(plen[rid]))}.get(positions, []))
    assert tap.core.stats()["sampled"] == 2 and tap.core.skipped["rate"] == 1


def test_a_request_that_ends_before_its_prompt_is_read_is_dropped_and_counted(tmp_path: Path) -> None:
    """An aborted sampled request (finished before its last prompt token ran) is counted as a
    request_error drop, not exported half-read."""
    transport = MemoryTransport("memory://vllm-plan-abort")
    tap, runner = _tap(tmp_path, "cpu", "last", transport)
    states = {"a": torch.randn(3, 10, D)}
    tap._admit(SimpleNamespace(scheduled_new_reqs=[_new("a", 10, True)], finished_req_ids=set()))
    _step(tap, runner, [("a", 0, 4)], states, "cpu")
    tap._admit(SimpleNamespace(scheduled_new_reqs=[], finished_req_ids={"a"}))
    assert tap.core is not None
    assert tap.core.exporter.drops["request_error"] == 1 and not tap.active


def test_steps_without_a_sampled_request_call_the_runner_unchanged(tmp_path: Path) -> None:
    """No sampled request in flight: the wrapped forward is the original call, nothing planned."""
    tap, runner = _tap(tmp_path, "cpu", "last+mean", MemoryTransport("memory://vllm-plan-idle"))
    runner._model_forward(input_ids=None)
    assert runner.forwarded == 1 and tap._work is None and not tap.active


@pytest.mark.parametrize(("engine_id", "client_id"), [
    ("cmpl-abc-0", "abc"), ("cmpl-abc-2", "abc-2"), ("chatcmpl-r-1", "r-1"), ("42", "42"),
])
def test_openai_server_ids_map_back_to_the_clients_request_id(engine_id: str, client_id: str) -> None:
    """vLLM's OpenAI server prefixes X-Request-Id (cmpl-<id>-<prompt>, chatcmpl-<id>): the
    sampling key and the audited request id are the client's own id."""
    assert client_request_id(engine_id) == client_id
