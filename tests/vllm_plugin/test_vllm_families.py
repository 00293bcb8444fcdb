"""The plugin on every decoder family the adapters know, each a tiny random checkpoint served by
vLLM; and its behaviour when it is not configured, misconfigured or its transport is down."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config  # the main suite's tiny random configs
from vllm_helpers import engine_args, run_engine, tap_env

PROMPTS = [[5, 9, 17, 33, 2, 8, 100, 7, 64, 12, 3], [40, 41, 42], list(range(3, 60))]


def _tiny_checkpoint(family: str, root: Path) -> Path:
    """The main suite's tiny config of ``family`` widened to head_dim 64 (vLLM's CPU attention
    kernels take 32, 64, 80, 96, 112, 128, ... not the 16 of d=32 with 2 heads)."""
    cls, cfg = tiny_config(family)
    if family == "gpt2":
        cfg.n_embd = 128
    else:
        cfg.hidden_size, cfg.intermediate_size = 128, 256
        if getattr(cfg, "head_dim", None) is not None:  # set from d/heads when the config was built
            cfg.head_dim = 64
    torch.manual_seed(0)
    out = root / family
    cls(cfg).eval().save_pretrained(out)
    return out


def _tiny_engine(model_dir: Path, **over: Any) -> dict[str, Any]:
    return engine_args(model_dir, skip_tokenizer_init=True, max_model_len=256, **over)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2", "gpt_neox"])
def test_each_family_is_captured_with_the_hugging_face_fingerprint_and_states(family: str, tmp_path: Path) -> None:
    """A tiny random checkpoint of each family served by vLLM: samples carry the fingerprint of
    the Hugging Face model loaded from the same folder, and last+mean states equal HF's."""
    import transformers as tf

    from monitor.adapters import collect_states, find_parts, model_fingerprint

    ckpt = _tiny_checkpoint(family, tmp_path)
    batch = [{"prompt_token_ids": p, "force": True, "max_tokens": 2} for p in PROMPTS]
    run = run_engine(tmp_path, _tiny_engine(ckpt), [batch], env=tap_env())
    hf = tf.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert run.stats["exported"] == len(PROMPTS), run.stats
    parts = find_parts(hf)
    for s in run.samples:
        assert s["model_fingerprint"] == model_fingerprint(hf)
        st = collect_states(hf, parts, torch.tensor([PROMPTS[int(s["request_id"])]]))[:, 0]
        ref = torch.stack([st.mean(1), st[:, -1]], 1)
        got = torch.from_numpy(run.hidden[s["sample_id"]])
        assert torch.allclose(got, ref, rtol=1e-3, atol=1e-4), (family, (got - ref).abs().max().item())


def test_unconfigured_plugin_does_nothing(tmp_path: Path) -> None:
    """Installed but with no LAYERWATCH_TAP_* variable: no tap, vLLM serves as usual."""
    ckpt = _tiny_checkpoint("llama", tmp_path)
    run = run_engine(tmp_path, _tiny_engine(ckpt), [[{"prompt_token_ids": PROMPTS[0], "max_tokens": 3}]], env={})
    assert run.doc["taps"] == 0 and len(run.outputs[0][0]["completions"][0]) == 3
    assert "layerwatch" not in run.log


def test_misconfigured_plugin_leaves_vllm_serving_and_says_why(tmp_path: Path) -> None:
    """An invalid setting: vLLM starts and serves every request; the log names the field."""
    ckpt = _tiny_checkpoint("llama", tmp_path)
    run = run_engine(tmp_path, _tiny_engine(ckpt), [[{"prompt_token_ids": PROMPTS[0], "max_tokens": 3}]],
                     env=tap_env(positions="sideways"))
    assert run.doc["taps"] == 0 and len(run.outputs[0][0]["completions"][0]) == 3
    assert "the tap is not attached" in run.log and "positions" in run.log


def test_transport_down_drops_and_counts_while_vllm_serves(tmp_path: Path) -> None:
    """Redis unreachable: every request is served, sampled ones are dropped as transport_down."""
    ckpt = _tiny_checkpoint("llama", tmp_path)
    batch = [{"prompt_token_ids": p, "force": True, "max_tokens": 2} for p in PROMPTS]
    run = run_engine(tmp_path, _tiny_engine(ckpt), [batch],
                     env=tap_env(transport="redis://127.0.0.1:1/0", backoff_initial_s="0.05", backoff_max_s="0.1"))
    assert all(len(o["completions"][0]) == 2 for o in run.outputs[0])
    assert run.stats["sampled"] == len(PROMPTS)
    assert run.stats["exported"] == 0 and run.stats["drops"]["transport_down"] + run.stats["drops"]["transport_error"] == len(PROMPTS)


def test_pipeline_parallelism_and_encoders_are_refused_with_a_reason() -> None:
    """The worker-side checks refuse pipeline parallelism and pooling models by name."""
    from types import SimpleNamespace

    from monitor.config import TapSettings
    from monitor.errors import UnsupportedArchitecture
    from monitor.tap.vllm.frontend import VllmTap

    cfg = SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=2), speculative_config=None)
    with pytest.raises(UnsupportedArchitecture, match="pipeline parallelism"):
        VllmTap(SimpleNamespace(), cfg, TapSettings())
    cfg.parallel_config.pipeline_parallel_size = 1
    with pytest.raises(UnsupportedArchitecture, match="pooling"):
        VllmTap(SimpleNamespace(is_pooling_model=True), cfg, TapSettings())


def test_tensor_parallel_ranks_export_once_and_match_hugging_face(tmp_path: Path) -> None:
    """Two tensor-parallel ranks (vLLM's CPU backend, one core each): only rank 0 exports, once per
    sampled request, and the states equal HF's (the residual stream is replicated after each
    all-reduce)."""
    import uuid

    import redis
    import transformers as tf

    from monitor.adapters import collect_states, find_parts
    from monitor.wire import decode

    ckpt = _tiny_checkpoint("llama", tmp_path)
    stream = f"layerwatch:tp-test:{uuid.uuid4().hex[:8]}"
    batch = [{"prompt_token_ids": p, "force": True, "max_tokens": 2} for p in PROMPTS]
    env = {**tap_env(transport="redis://127.0.0.1:6379/0", stream=stream), "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    run = run_engine(tmp_path, _tiny_engine(ckpt, tensor_parallel_size=2), [batch], env=env)
    assert all(len(o["completions"][0]) == 2 for o in run.outputs[0])
    r = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        samples = [decode(f[b"d"]) for _, f in r.xrange(stream)]
    finally:
        r.delete(stream)
    assert sorted(s.request_id for s in samples) == ["0", "1", "2"]
    hf = tf.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    for s in samples:
        st = collect_states(hf, find_parts(hf), torch.tensor([PROMPTS[int(s.request_id)]]))[:, 0]
        ref = torch.stack([st.mean(1), st[:, -1]], 1)
        assert torch.allclose(torch.from_numpy(s.hidden.copy()), ref, rtol=1e-3, atol=1e-4)
