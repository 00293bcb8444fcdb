"""States the vLLM plugin captures equal Hugging Face's, on the real SmolLM2 served by vLLM.

Each test runs vLLM's engine (CPU backend, eager unless said) in a subprocess with the plugin
exporting float32 states to an in-memory transport, and compares every sampled request's
states with ``output_hidden_states``-equivalent states of the Hugging Face model
(:func:`monitor.adapters.collect_states`). Criterion per captured vector: max |vLLM - HF| /
max |HF| <= 1e-3 (float32; the residual stream reaches 24,000 at the first token, where one
float32 step is 0.002, so an absolute bound cannot hold there), and the logit lens's top-1 token
equal at every layer. The largest absolute difference is printed for the README.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from vllm_helpers import engine_args, real_model_dir, run_engine, tap_env

TEXTS = [
    "The capital of France is",
    "Write a haiku about the sea. " * 3,
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In the beginning the Universe was created. This has made a lot of people very angry and "
    "been widely regarded as a bad move. " * 6,
]


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return real_model_dir()


@cache
def _hf(model_dir: str) -> tuple[Any, Any]:
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tok, model


def _ids(model_dir: Path) -> list[list[int]]:
    tok, _ = _hf(str(model_dir))
    return [tok(t).input_ids for t in TEXTS]


def _states(model_dir: Path, tokens: list[int]) -> torch.Tensor:
    """HF's residual stream of ``tokens`` at every state, ``[L, T, d]``."""
    from monitor.adapters import collect_states, find_parts

    _, model = _hf(str(model_dir))
    return collect_states(model, find_parts(model), torch.tensor([tokens]))[:, 0]


def _reference(model_dir: Path, tokens: list[int], mode: str, position_index: list[int]) -> torch.Tensor:
    """HF states of ``tokens`` ([L, P, d]) as the given positions mode reads them."""
    st = _states(model_dir, tokens)
    if mode == "last+mean":
        return torch.stack([st.mean(1), st[:, -1]], 1)
    if mode == "mean":
        return st.mean(1, keepdim=True)
    return st[:, position_index]


def assert_parity(model_dir: Path, run: Any, sequences: dict[str, list[int]], mode: str) -> tuple[float, float]:
    """Every sample of ``run`` matches HF; returns the largest absolute and relative differences."""
    _, model = _hf(str(model_dir))
    worst = worst_rel = 0.0
    assert run.samples, "nothing was captured"
    for s in run.samples:
        got = torch.from_numpy(run.hidden[s["sample_id"]])
        ref = _reference(model_dir, sequences[s["request_id"]], mode, s["position_index"])
        assert got.shape == ref.shape, (s["request_id"], got.shape, ref.shape)
        diff = (got - ref).abs()
        rel = (diff.amax(-1) / ref.abs().amax(-1)).max().item()
        assert rel <= 1e-3, f"request {s['request_id']}: relative difference {rel:.2e}"
        with torch.no_grad():
            lens = lambda x: model.lm_head(model.model.norm(x)).argmax(-1)  # noqa: E731
            assert torch.equal(lens(got), lens(ref)), f"request {s['request_id']}: logit-lens top-1 differs"
        worst, worst_rel = max(worst, diff.max().item()), max(worst_rel, rel)
        if mode != "generated":  # prompt windows ride beside every prompt mode (issue 19)
            from monitor.windows import pool_windows, window_bounds

            tokens = sequences[s["request_id"]]
            assert s["window_bounds"] == window_bounds(len(tokens)).tolist(), s["request_id"]
            want = torch.from_numpy(pool_windows(_states(model_dir, tokens).numpy(), s["window_bounds"], axis=1))
            got_w = torch.from_numpy(run.hidden[s["sample_id"] + ".windows"])
            rel_w = ((got_w - want).abs().amax(-1) / want.abs().amax(-1)).max().item()
            assert rel_w <= 1e-3, f"request {s['request_id']}: window relative difference {rel_w:.2e}"
    return worst, worst_rel


def _batch(ids: list[list[int]], sampled: set[int], max_tokens: int = 4) -> list[dict[str, Any]]:
    return [{"prompt_token_ids": t, "force": i in sampled, "max_tokens": max_tokens} for i, t in enumerate(ids)]


@pytest.mark.parametrize("mode", ["last+mean", "last", "mean", "all"])
def test_prompt_modes_match_hugging_face_under_chunked_prefill_and_a_prefix_hit(
        mode: str, smollm2_dir: Path, tmp_path: Path) -> None:
    """Two sampled requests among four concurrent ones of different lengths, with prompts split
    over steps (chunked prefill, 32 tokens a step), then a sampled request whose prompt prefix
    sits in the prefix cache: each sample equals HF's states, and the sampled request recomputed
    its whole prompt (no cached tokens)."""
    ids = _ids(smollm2_dir)
    shared = ids[3][:-3] + ids[0]  # the long prompt's first 128+ tokens: a prefix-cache hit
    run = run_engine(tmp_path, engine_args(smollm2_dir, max_num_batched_tokens=32, enable_chunked_prefill=True,
                                           enable_prefix_caching=True),
                     [_batch(ids, {1, 3}), [{"prompt_token_ids": shared, "force": True, "max_tokens": 2},
                                            {"prompt_token_ids": shared, "max_tokens": 2}]],
                     env=tap_env(positions=mode, max_positions="64"))
    assert run.stats["sampled"] == 3 and run.stats["exported"] == 3, run.stats
    cached = {o["request_id"]: o["num_cached_tokens"] for o in run.outputs[1]}
    assert cached["4"] == 0 and cached["5"] > 0, cached  # the unsampled twin did hit the cache
    seqs = {"1": ids[1], "3": ids[3], "4": shared}
    assert {s["request_id"] for s in run.samples} == set(seqs)
    assert all("prefix_cached_tokens" not in s["metadata"] for s in run.samples)
    worst, rel = assert_parity(smollm2_dir, run, seqs, mode)
    print(f"\nPARITY {mode}: max abs difference {worst:.2e}, max relative {rel:.2e}", flush=True)


def test_compiled_engine_captures_inside_the_graph_with_parity_and_unchanged_outputs(
        smollm2_dir: Path, tmp_path: Path) -> None:
    """vLLM's default compiled CPU engine: the layer ops inside the compiled graph capture
    (no uncompiled step), the states equal HF's under chunked prefill among unsampled requests,
    and the greedy completions equal those of the same compiled engine without the plugin (whose
    graph has no op: another compile-cache key)."""
    ids = _ids(smollm2_dir)
    engine = engine_args(smollm2_dir, enforce_eager=False, max_num_batched_tokens=32, enable_chunked_prefill=True)
    batch = [{**b, "logprobs": 2} for b in _batch(ids, {1, 3}, max_tokens=8)]
    run = run_engine(tmp_path, engine, [batch], env=tap_env(positions="last+mean"), timeout=900)
    off = run_engine(tmp_path, engine, [batch], env={"VLLM_PLUGINS": ""}, timeout=900)
    assert run.doc["in_graph"] is True and run.stats["exported"] == 2, run.stats
    worst, rel = assert_parity(smollm2_dir, run, {"1": ids[1], "3": ids[3]}, "last+mean")
    print(f"\nPARITY compiled: max abs difference {worst:.2e}, max relative {rel:.2e}", flush=True)
    completions = lambda r: [[o["completions"] for o in b] for b in r.outputs]  # noqa: E731
    assert completions(run) == completions(off)
    lp = [abs(a - b) for ro, oo in zip(run.outputs[0], off.outputs[0], strict=True)
          for rs, os_ in zip(ro["logprobs"][0], oo["logprobs"][0], strict=True)
          for a, b in zip(rs.values(), os_.values(), strict=True)]
    print(f"COMPILED logprob largest difference vs no plugin: {max(lp):.2e}", flush=True)


def test_one_token_prompt_is_sampled_with_no_windows_and_a_long_one_with_bounded_windows(
        smollm2_dir: Path, tmp_path: Path) -> None:
    """Bad input for the window capture: a one-token prompt is sampled and exported with an empty
    window list (nothing raises in the engine); a 1,500-token prompt split over chunks gets the
    default 64 windows whose means equal HF's."""
    ids = _ids(smollm2_dir)
    long = (ids[3] * 12)[:1500]
    run = run_engine(tmp_path, engine_args(smollm2_dir, max_num_batched_tokens=256, enable_chunked_prefill=True),
                     [[{"prompt_token_ids": ids[0][:1], "force": True, "max_tokens": 2},
                       {"prompt_token_ids": long, "force": True, "max_tokens": 2}]],
                     env=tap_env(positions="last+mean"))
    assert run.stats["exported"] == 2, run.stats
    by_id = {s["request_id"]: s for s in run.samples}
    assert by_id["0"]["window_bounds"] == [] and run.hidden[by_id["0"]["sample_id"] + ".windows"].shape[1] == 0
    assert len(by_id["1"]["window_bounds"]) == 64
    assert_parity(smollm2_dir, run.subset(["1"]), {"1": long}, "last+mean")


def test_generated_mode_matches_hugging_face_on_the_generated_sequence(smollm2_dir: Path, tmp_path: Path) -> None:
    """positions='generated' captures the last prompt token and then each generated token fed
    back (up to max_positions), equal to HF's states over prompt + completion."""
    ids = _ids(smollm2_dir)
    run = run_engine(tmp_path, engine_args(smollm2_dir), [_batch(ids, {0, 2}, max_tokens=6)],
                     env=tap_env(positions="generated", max_positions="4"))
    outs = {o["request_id"]: o["completions"][0] for o in run.outputs[0]}
    seqs = {rid: ids[int(rid)] + outs[rid] for rid in ("0", "2")}
    for s in run.samples:
        n = len(ids[int(s["request_id"])])
        assert s["position_index"] == [n - 1, n, n + 1, n + 2]
    worst, rel = assert_parity(smollm2_dir, run, seqs, "generated")
    print(f"\nPARITY generated: max abs difference {worst:.2e}, max relative {rel:.2e}", flush=True)


def test_n_greater_than_one_gives_one_sample_and_unsampled_requests_none(smollm2_dir: Path, tmp_path: Path) -> None:
    """A sampled request with n=3 completions is one sample (its prompt); at rate 0 the others
    are skipped and counted by reason."""
    ids = _ids(smollm2_dir)
    batch = [{"prompt_token_ids": ids[0], "force": True, "n": 3, "max_tokens": 2, "temperature": 1.0},
             {"prompt_token_ids": ids[2], "max_tokens": 2}]
    run = run_engine(tmp_path, engine_args(smollm2_dir), [batch], env=tap_env(positions="last"))
    assert [s["request_id"] for s in run.samples] == ["0"]
    assert run.stats["sampled"] == 1 and run.stats["skipped"]["rate"] == 1


def test_request_control_is_ignored_unless_the_operator_allows_it(smollm2_dir: Path, tmp_path: Path) -> None:
    """With allow_request_control off (the default), a client's 'force' samples nothing."""
    ids = _ids(smollm2_dir)
    env = tap_env(positions="last", allow_request_control="false")
    run = run_engine(tmp_path, engine_args(smollm2_dir), [_batch(ids[:2], {0, 1})], env=env)
    assert run.samples == [] and run.stats["sampled"] == 0 and run.stats["skipped"]["rate"] == 2


def test_greedy_outputs_identical_with_and_without_the_plugin(smollm2_dir: Path, tmp_path: Path) -> None:
    """Eager mode: the same greedy completions and logprobs without the plugin, with it at rate
    0 and with it sampling every request (hooks only read the residual stream)."""
    ids = _ids(smollm2_dir)
    batch = [{"prompt_token_ids": t, "max_tokens": 12, "logprobs": 2} for t in ids]
    off = run_engine(tmp_path, engine_args(smollm2_dir), [batch], env={"VLLM_PLUGINS": ""})
    rate0 = run_engine(tmp_path, engine_args(smollm2_dir), [batch], env=tap_env(positions="last+mean"))
    rate1 = run_engine(tmp_path, engine_args(smollm2_dir), [batch], env=tap_env(sample_rate="1.0"))
    assert off.doc["taps"] == 0 and rate0.doc["taps"] == 1 and rate1.stats["exported"] == len(ids)
    assert rate0.outputs == off.outputs
    assert rate1.outputs == off.outputs
