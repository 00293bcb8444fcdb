"""Prompt windows in the Hugging Face tap (issue 19): exact window means, their bounds in the
header, bad prompts that never fail the server, and the wire budget at the real model's size."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from conftest import drain_samples, make_tiny

import monitor
from monitor.config import TapSettings
from monitor.errors import ConfigError
from monitor.tap.exporter import CapturedRequest, CapturedStep
from monitor.windows import DEFAULT_MAX_WINDOWS, pool_windows, window_bounds
from monitor.wire import Sample, decode, encode


def _run(model: torch.nn.Module, transport: Any, ids: torch.Tensor, mask: torch.Tensor | None = None,
         **kw: Any) -> dict[str, Sample]:
    tap = monitor.attach(model, sample_rate=1.0, transport=transport, **kw)
    rids = [f"r{i}" for i in range(ids.shape[0])]
    with tap.batch(rids), torch.no_grad():
        model(input_ids=ids, **({} if mask is None else {"attention_mask": mask}))
    assert tap.flush(5.0)
    tap.close()
    return {s.request_id: s for s in drain_samples(transport)}


def _reference_states(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> np.ndarray:
    """``output_hidden_states`` [B, N+1, T, d] in float32, the final state before the final norm."""
    seen: dict[str, torch.Tensor] = {}
    norm = model.model.norm
    h = norm.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    h.remove()
    states = [*out.hidden_states[:-1], seen["x"]]
    return torch.stack(states, dim=1).float().numpy()


@pytest.mark.parametrize("side", ["right", "left"])
def test_windows_equal_pool_windows_of_the_hidden_states(side: str, memory_transport: Any) -> None:
    """Each row's window means are pool_windows of output_hidden_states over its own real tokens
    (padding excluded, either side), with the bounds of window_bounds in the header (float32 wire)."""
    model = make_tiny("llama")
    lengths = [40, 23, 9]
    ids = torch.zeros(3, 40, dtype=torch.long)
    mask = torch.zeros(3, 40, dtype=torch.long)
    g = torch.Generator().manual_seed(3)
    for r, n in enumerate(lengths):
        sl = slice(0, n) if side == "right" else slice(40 - n, 40)
        ids[r, sl] = torch.randint(3, 120, (n,), generator=g)
        mask[r, sl] = 1
    ref = _reference_states(model, ids, mask)
    got = _run(model, memory_transport, ids, mask, wire_dtype="float32", windows=8, window_min_tokens=4)
    for r, n in enumerate(lengths):
        s = got[f"r{r}"]
        bounds = window_bounds(n, 8, 4)
        assert s.window_bounds is not None and s.windows is not None and s.prompt_tokens == n
        assert s.window_bounds.tolist() == bounds.tolist() and s.windows.shape == (3, len(bounds), 32)
        real = ref[r][:, mask[r].bool().numpy()]  # [L, n, d]
        np.testing.assert_allclose(s.windows, pool_windows(real, bounds, axis=1), atol=1e-5, rtol=1e-5)


def test_windows_leave_last_and_mean_bit_identical(memory_transport: Any) -> None:
    """Capturing windows changes nothing in the last+mean payload, bit for bit."""
    model = make_tiny("llama")
    ids = torch.randint(3, 120, (2, 30))
    with_w = _run(model, memory_transport, ids, windows=64)
    without = _run(model, memory_transport, ids)  # windows=0, the default
    for rid, s in with_w.items():
        assert s.windows is not None and s.windows.shape[1] == 7  # (30 - 1) // 4
        assert without[rid].windows is None
        assert np.array_equal(s.hidden, without[rid].hidden)


def test_single_token_and_empty_prompts_ship_zero_windows(memory_transport: Any) -> None:
    """A one-token prompt and an all-padding row are sampled and exported with W = 0, no error."""
    model = make_tiny("llama")
    ids = torch.randint(3, 120, (2, 1))
    mask = torch.tensor([[1], [0]])
    got = _run(model, memory_transport, ids, mask, windows=64)
    assert set(got) == {"r0", "r1"}
    for n, s in zip((1, 0), (got["r0"], got["r1"]), strict=True):
        assert s.windows is not None and s.windows.shape == (3, 0, 32) and s.prompt_tokens == n


def test_a_long_prompt_gets_longer_windows_never_more(memory_transport: Any) -> None:
    """A prompt far longer than windows x min tokens keeps W at the setting; windows cover
    tokens 1..n-1 without gaps."""
    model = make_tiny("llama")
    got = _run(model, memory_transport, torch.randint(3, 120, (1, 300)), windows=16)
    b = got["r0"].window_bounds
    assert b is not None and len(b) == 16 and b[0, 0] == 1 and b[-1, 1] == 300
    assert (b[1:, 0] == b[:-1, 1]).all() and set((b[:, 1] - b[:, 0]).tolist()) <= {18, 19}


def test_windows_ride_beside_every_positions_mode(memory_transport: Any) -> None:
    """positions='last' and 'all' carry the same prompt windows as the default last+mean."""
    model = make_tiny("gpt2")
    ids = torch.randint(3, 120, (1, 17))
    ref = _run(model, memory_transport, ids, windows=64)["r0"]
    for mode in ("last", "all"):
        s = _run(model, memory_transport, ids, positions=mode, windows=64)["r0"]
        assert s.windows is not None and ref.windows is not None and np.array_equal(s.windows, ref.windows)


def test_window_settings_are_validated_at_attach() -> None:
    """Windows whose means alone exceed max_payload_bytes are refused when the tap attaches,
    naming the field; a negative count is refused by the settings."""
    model = make_tiny("llama")
    with pytest.raises(ConfigError, match="windows"):
        monitor.attach(model, transport="memory://w", windows=256, max_payload_bytes=4096)
    with pytest.raises(ConfigError, match="windows"):
        monitor.attach(model, transport="memory://w", windows=-1)
    with pytest.raises(ConfigError, match="window_min_tokens"):
        monitor.attach(model, transport="memory://w", window_min_tokens=0)


def test_sample_of_a_2048_token_prompt_fits_the_4_mb_budget() -> None:
    """At the default settings with windows on (64, the setting the budget is sized for; off is
    the default), the encoded sample of a 2,048-token prompt on SmolLM2-135M's shape (31 states x
    576, float16) is at most 4 MB: measured through the exporter and encoder."""
    settings = TapSettings(windows=64)
    n_states, d, n = 31, 576, 2048
    w = settings.windows
    rng = np.random.default_rng(0)
    step = CapturedStep(
        hidden=torch.from_numpy(rng.standard_normal((n_states, 2, d)).astype(np.float16)), per_slot=2,
        fixed_positions=[], windows=torch.from_numpy(rng.standard_normal((n_states, w, d)).astype(np.float16)),
        window_lengths=torch.tensor([n]), max_windows=w, window_min_tokens=settings.window_min_tokens)
    header = {"schema": 1, "model": "SmolLM2-135M-Instruct", "model_fingerprint": "sha256:x" + "0" * 63,
              "layers": list(range(n_states)), "n_states": n_states, "positions": settings.positions}
    item = CapturedRequest(header, ["s" * 40], ["r" * 64], [{"route": "/v1/chat/completions"}], [step])
    [(hdr, hidden, windows)] = list(item.samples())
    hdr["tap"] = {"instance": "0" * 16, "pid": 1, "sampled": 10**9, "skipped": {"rate": 10**9},
                  "exported": 10**9, "drops": {}}
    data = encode(hdr, hidden, windows=windows, max_bytes=settings.max_payload_bytes)
    s = decode(data)
    assert s.windows is not None and s.windows.shape == (n_states, DEFAULT_MAX_WINDOWS, d)
    assert len(data) <= 4 * 1024 * 1024, len(data)  # 2,358,401 bytes (2.25 MiB) on 2026-12-07
