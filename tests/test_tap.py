"""The tap: captured states, request/batch forms, bounded exporter, metrics, fork safety."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from conftest import assert_same_generation, drain_samples, generate_plain_then_tapped, make_tiny

import monitor
from monitor.tap import Tap
from monitor.transport import MemoryTransport, Transport, open_transport
from monitor.wire import Sample


def _attach(model: torch.nn.Module, transport: Transport, **kw: Any) -> Tap:
    kw.setdefault("sample_rate", 1.0)
    return monitor.attach(model, transport=transport, **kw)


def _norm_input(tap: Tap) -> tuple[dict[str, torch.Tensor], Any]:
    seen: dict[str, torch.Tensor] = {}
    assert tap.parts.final_norm is not None
    h = tap.parts.final_norm.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0]))
    return seen, h


def _states(out: Any, norm_in: torch.Tensor) -> list[torch.Tensor]:
    """The reference N+1 states of a decoder forward: HF's 0..N-1 plus the final norm's input."""
    return [*out.hidden_states[:-1], norm_in]


def _by_request(samples: Sequence[Sample]) -> dict[str, Sample]:
    return {s.request_id: s for s in samples}


def _padded_batch(side: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Three rows of 7, 5 and 2 real tokens padded (id 0) on ``side``."""
    lengths = [7, 5, 2]
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for r, n in enumerate(lengths):
        toks = torch.randint(3, 120, (n,), generator=g)
        sl = slice(0, n) if side == "right" else slice(7 - n, 7)
        ids[r, sl] = toks
        mask[r, sl] = 1
    return ids, mask, lengths


def _real_index(mask_row: torch.Tensor) -> list[int]:
    """Padded indices of a row's real tokens, in order."""
    return torch.nonzero(mask_row).flatten().tolist()


# --------------------------------------------------------------------------- outputs untouched
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_forward_outputs_are_bit_identical_when_sampled(family: str, memory_transport: Any) -> None:
    """At sample rate 1.0 the logits equal those of the unhooked model, bit for bit."""
    model = make_tiny(family)
    ids = torch.randint(3, 120, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    tap = _attach(model, memory_transport, positions="all")
    with tap.request("r"), torch.no_grad():
        got = model(input_ids=ids).logits
    assert tap.flush(5.0) and tap.stats()["exported"] == 2
    tap.close()
    assert torch.equal(got, ref)


def test_generate_outputs_are_bit_identical_when_sampled(memory_transport: Any) -> None:
    """generate() returns the same tokens and scores with the tap sampling every step."""
    model = make_tiny("llama")
    ids = torch.randint(3, 120, (1, 5))
    ref, got, tap = generate_plain_then_tapped(
        model, lambda m: _attach(m, memory_transport, positions="generated"), ids, 6, "g")
    assert tap.flush(5.0)
    tap.close()
    assert_same_generation(got, ref)


def test_unsampled_requests_capture_nothing(memory_transport: Any, monkeypatch: Any) -> None:
    """At rate 0 no hook takes a slice, nothing is queued and nothing is published."""
    model = make_tiny("llama")
    tap = _attach(model, memory_transport, sample_rate=0.0)
    calls = []
    monkeypatch.setattr(tap, "_take", lambda *a: calls.append(a))
    monkeypatch.setattr(tap, "_plan_step", lambda *a: calls.append(a))
    for i in range(5):
        with tap.request(f"r{i}") as h, torch.no_grad():
            model(input_ids=torch.randint(3, 120, (2, 6)))
        assert not h.sampled and h.sample_ids == ()
    assert calls == []
    assert tap.flush(1.0)
    assert tap.stats()["queue_depth"] == 0 and tap.exporter.exported == 0
    assert drain_samples(memory_transport) == []
    assert tap.skipped["rate"] == 5
    tap.close()


def _layer_hook_count(model: torch.nn.Module, tap: Tap) -> int:
    return sum(len(b._forward_hooks) + len(b._forward_pre_hooks) for b in tap.parts.blocks)


def test_layer_hooks_are_installed_only_while_a_sampled_forward_runs(memory_transport: Any) -> None:
    """Unsampled forwards run with no per-layer hook (PyTorch's fast path); a sampled forward has
    them, they are gone after it, also after a forward that raised, and the capture is complete."""
    model = make_tiny("llama")
    tap = _attach(model, memory_transport, sample_rate=0.0)
    seen: list[int] = []
    probe = tap.parts.blocks[-1].register_forward_hook(lambda *_: seen.append(_layer_hook_count(model, tap)))
    with tap.request("quiet"), torch.no_grad():
        model(input_ids=torch.randint(3, 120, (1, 5)))
    with tap.request("loud", force=True), torch.no_grad():
        model(input_ids=torch.randint(3, 120, (1, 5)))
    assert seen[0] == 1  # only the test's own probe hook
    assert seen[1] > 1 + len(tap.parts.blocks) - 1  # every block hooked during the sampled forward
    assert _layer_hook_count(model, tap) == 1
    with pytest.raises(RuntimeError, match="mid-forward"), tap.request("boom", force=True), torch.no_grad():
        h = tap.parts.blocks[0].register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("mid-forward")))
        try:
            model(input_ids=torch.randint(3, 120, (1, 5)))
        finally:
            h.remove()
    assert _layer_hook_count(model, tap) == 1 and tap._layer_refs == 0
    probe.remove()
    assert tap.flush(5.0)
    got = drain_samples(memory_transport)
    assert [s.request_id for s in got] == ["loud"] and got[0].hidden.shape[0] == len(tap.parts.blocks) + 1
    tap.close()


# --------------------------------------------------------------------------- positions
@pytest.mark.parametrize("side,rows", [("right", (0, 1, 2)), ("left", (0, 1, 2)), ("right", (1, 2)),
                                       ("left", (0, 2))])
def test_last_position_of_a_padded_batch(side: str, rows: tuple[int, ...], memory_transport: Any) -> None:
    """positions='last' takes each sampled row's last real token of a padded batch (attention_mask)."""
    model = make_tiny("llama")
    ids, mask, lengths = _padded_batch(side)
    tap = _attach(model, memory_transport, positions="last", sample_rate=0.0)
    seen, hook = _norm_input(tap)
    with tap.batch(["a", "b", "c"], force=[r in rows for r in range(3)]), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hook.remove()
    assert tap.flush(5.0)
    got = _by_request(drain_samples(memory_transport))
    tap.close()
    assert set(got) == {"abc"[r] for r in rows}
    ref = _states(out, seen["x"])
    for row in rows:
        rid = "abc"[row]
        s = got[rid]
        last = _real_index(mask[row])[-1]
        assert s.position_index == (lengths[row] - 1,)
        assert s.hidden.shape == (3, 1, 32)
        for layer in range(3):
            assert torch.equal(torch.from_numpy(s.hidden[layer, 0].copy()), ref[layer][row, last].half())
        assert s.final_topk is not None
        assert int(s.final_topk.ids[0, 0]) == int(out.logits[row, last].argmax())


@pytest.mark.parametrize("side", ["right", "left"])
def test_all_positions_up_to_the_cap(side: str, memory_transport: Any) -> None:
    """positions='all' takes each row's last max_positions real tokens, padding excluded."""
    model = make_tiny("llama")
    ids, mask, lengths = _padded_batch(side)
    tap = _attach(model, memory_transport, positions="all", max_positions=3)
    seen, hook = _norm_input(tap)
    with tap.batch(["a", "b", "c"]), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hook.remove()
    assert tap.flush(5.0)
    got = _by_request(drain_samples(memory_transport))
    tap.close()
    ref = _states(out, seen["x"])
    for row, rid in enumerate("abc"):
        s = got[rid]
        real = _real_index(mask[row])[-3:]
        assert s.position_index == tuple(range(lengths[row] - len(real), lengths[row]))
        assert s.hidden.shape == (3, len(real), 32)
        for layer in range(3):
            assert torch.equal(torch.from_numpy(s.hidden[layer].copy()), ref[layer][row, real].half())


@pytest.mark.parametrize("rows", [(0, 1, 2), (1,)])
def test_mean_over_real_positions(rows: tuple[int, ...], memory_transport: Any) -> None:
    """positions='mean' is the mean over each sampled row's real tokens (to float16 rounding)."""
    model = make_tiny("llama")
    ids, mask, _ = _padded_batch("right")
    tap = _attach(model, memory_transport, positions="mean", sample_rate=0.0)
    seen, hook = _norm_input(tap)
    with tap.batch(["a", "b", "c"], force=[r in rows for r in range(3)]), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hook.remove()
    assert tap.flush(5.0)
    got = _by_request(drain_samples(memory_transport))
    tap.close()
    assert set(got) == {"abc"[r] for r in rows}
    ref = _states(out, seen["x"])
    for row in rows:
        rid = "abc"[row]
        s = got[rid]
        assert s.hidden.shape == (3, 1, 32) and s.position_index == () and s.final_topk is None
        real = _real_index(mask[row])
        for layer in range(3):
            expected = ref[layer][row, real].mean(0)
            torch.testing.assert_close(torch.from_numpy(s.hidden[layer, 0].astype("float32")), expected,
                                       atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_plus_mean_ships_the_mean_then_the_last_token(side: str, memory_transport: Any) -> None:
    """positions='last+mean' gives, per layer, [the 'mean' payload, the 'last' payload] bit for bit
    (the drift benchmark assembles it from the two single-mode captures on that guarantee)."""
    model = make_tiny("llama")
    ids, mask, _ = _padded_batch(side)
    got: dict[str, dict[str, Sample]] = {}
    for mode in ("last", "mean", "last+mean"):
        tap = _attach(model, memory_transport, positions=mode)
        with tap.batch(["a", "b", "c"]), torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        assert tap.flush(5.0)
        got[mode] = _by_request(drain_samples(memory_transport))
        tap.close()
        tap.detach()
    for rid in "abc":
        both = got["last+mean"][rid]
        assert both.positions == "last+mean" and both.hidden.shape == (3, 2, 32) and both.final_topk is None
        assert (both.hidden[:, 0] == got["mean"][rid].hidden[:, 0]).all()
        assert (both.hidden[:, 1] == got["last"][rid].hidden[:, 0]).all()


@pytest.mark.parametrize("n_new,cap", [(5, 16), (6, 3)])
def test_generated_tokens(n_new: int, cap: int, memory_transport: Any) -> None:
    """positions='generated' captures the state that produced each generated token, up to the cap."""
    model = make_tiny("llama")
    prompt = torch.randint(3, 120, (1, 4))
    tap = _attach(model, memory_transport, positions="generated", max_positions=cap)
    with tap.request("gen"), torch.no_grad():
        seq = model.generate(input_ids=prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                             pad_token_id=0)
    assert tap.flush(5.0)
    (s,) = drain_samples(memory_transport)
    tap.close()
    taken = min(n_new, cap)
    assert s.position_index == tuple(range(3, 3 + taken))
    assert s.hidden.shape == (3, taken, 32)
    # the full sequence recomputed without a cache gives the same states (to float16 and cache rounding)
    seen, hook = _norm_input(tap)
    with torch.no_grad():
        out = model(input_ids=seq, output_hidden_states=True, use_cache=False)
    hook.remove()
    ref = _states(out, seen["x"])
    for layer in range(3):
        torch.testing.assert_close(torch.from_numpy(s.hidden[layer].astype("float32")),
                                   ref[layer][0, 3 : 3 + taken], atol=3e-3, rtol=3e-3)
    assert s.final_topk is not None  # row i: the distribution generated token i came from
    assert s.final_topk.ids[:, 0].tolist() == seq[0, 4 : 4 + taken].tolist()


_SYNCING_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::masked_select",
                "aten::repeat_interleave", "aten::unique", "aten::_unique2", "aten::bincount"}


def test_capture_adds_no_host_synchronising_ops(memory_transport: Any, monkeypatch: Any) -> None:
    """A sampled forward (padded batch, every position mode's plan) adds no op that would make
    the host wait for a CUDA stream: no item()/int()/tolist() and no data-dependent shapes.

    (CPU proxy for the CUDA path, which cannot run here.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: Counter[str] = Counter()

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.names[func._schema.name] += 1
            return func(*args, **(kwargs or {}))

    tolist_calls = [0]
    real_tolist = torch.Tensor.tolist

    def counting_tolist(self: torch.Tensor) -> Any:
        tolist_calls[0] += 1
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    model = make_tiny("llama")
    ids, mask, _ = _padded_batch("left")

    def ops_of(run: Any) -> tuple[Counter[str], int]:
        tolist_calls[0] = 0
        with Ops() as mode, torch.no_grad():
            run()
        return mode.names, tolist_calls[0]

    plain, plain_tolist = ops_of(lambda: model(input_ids=ids, attention_mask=mask))
    for positions in ("last", "all", "mean", "generated"):
        tap = _attach(model, memory_transport, positions=positions, sample_rate=0.0)

        def sampled() -> None:
            with tap.batch(["a", "b", "c"], force=[True, False, True]):  # noqa: B023
                model(input_ids=ids, attention_mask=mask)

        names, n_tolist = ops_of(sampled)
        tap.close()
        added = {op: n for op, n in (names - plain).items() if op in _SYNCING_OPS}
        assert not added, (positions, added)
        assert n_tolist == plain_tolist, positions


# --------------------------------------------------------------------------- batch form
def test_batch_exports_only_sampled_rows_with_their_ids_and_metadata(memory_transport: Any) -> None:
    """tap.batch() samples rows independently; only sampled rows are exported, each with its
    request id, its own metadata and its own states."""
    model = make_tiny("llama")
    ids = torch.randint(3, 120, (3, 6))
    tap = _attach(model, memory_transport, sample_rate=0.0)
    seen, hook = _norm_input(tap)
    metas = [{"route": "/a", "n": 1}, {"route": "/b"}, {"route": "/c", "n": 3}]
    with tap.batch(["ra", None, "rc"], metadata=metas, force=[True, False, True]) as handles, torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    hook.remove()
    assert tap.flush(5.0)
    got = _by_request(drain_samples(memory_transport))
    tap.close()
    assert [h.sampled for h in handles] == [True, False, True]
    assert handles[1].request_id and len(handles[1].request_id) == 32 and handles[1].sample_ids == ()
    assert set(got) == {"ra", "rc"}
    assert got["ra"].metadata == {"route": "/a", "n": 1, "row": 0}
    assert got["rc"].metadata == {"route": "/c", "n": 3, "row": 2}
    assert got["ra"].sample_id == handles[0].sample_ids[0] and got["rc"].sample_id == handles[2].sample_ids[0]
    ref = _states(out, seen["x"])
    for row, rid in ((0, "ra"), (2, "rc")):
        for layer in range(3):
            assert torch.equal(torch.from_numpy(got[rid].hidden[layer, -1].copy()), ref[layer][row, -1].half())
    assert tap.sampled == 2 and tap.skipped["rate"] == 1


def test_request_with_several_rows_exports_one_sample_per_row(memory_transport: Any) -> None:
    """tap.request() around a 2-row batch exports two samples of that request, rows in metadata."""
    model = make_tiny("gpt2")
    tap = _attach(model, memory_transport)
    with tap.request("multi", metadata={"route": "/x"}) as h, torch.no_grad():
        model(input_ids=torch.randint(3, 120, (2, 5)))
    assert tap.flush(5.0)
    got = drain_samples(memory_transport)
    tap.close()
    assert sorted(s.metadata["row"] for s in got) == [0, 1]
    assert {s.request_id for s in got} == {"multi"} and len(h.sample_ids) == 2
    assert {s.sample_id for s in got} == set(h.sample_ids)


def test_batch_size_mismatch_is_a_counted_hook_error(memory_transport: Any) -> None:
    """A batch whose row count differs from its request ids is not captured; the request still runs."""
    model = make_tiny("gpt2")
    tap = _attach(model, memory_transport)
    ids = torch.randint(3, 120, (3, 5))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    with tap.batch(["a", "b"]), torch.no_grad():
        got = model(input_ids=ids).logits
    assert tap.flush(5.0)
    assert torch.equal(got, ref)
    assert tap.hook_errors == 1 and tap.stats()["drops"]["hook_error"] == 2
    tap.close()


# --------------------------------------------------------------------------- faults in-process
def test_exception_inside_a_hook_is_counted_and_the_request_succeeds(memory_transport: Any,
                                                                     monkeypatch: Any) -> None:
    """A hook that raises drops that request's sample as hook_error; the output is unchanged and
    the next request is captured normally."""
    model = make_tiny("llama")
    ids = torch.randint(3, 120, (1, 6))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    tap = _attach(model, memory_transport)
    real_take = tap._take
    calls = [0]

    def flaky(*a: Any) -> None:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("boom")
        real_take(*a)

    monkeypatch.setattr(tap, "_take", flaky)
    with tap.request("bad"), torch.no_grad():
        got = model(input_ids=ids).logits
    assert torch.equal(got, ref)
    with tap.request("good"), torch.no_grad():
        model(input_ids=ids)
    assert tap.flush(5.0)
    assert [s.request_id for s in drain_samples(memory_transport)] == ["good"]
    assert tap.hook_errors == 1 and tap.stats()["drops"]["hook_error"] == 1
    tap.close()


def test_request_that_raises_is_counted_as_request_error(memory_transport: Any) -> None:
    """A request whose body raises exports nothing and counts request_error; the error propagates."""
    model = make_tiny("gpt2")
    tap = _attach(model, memory_transport)
    with pytest.raises(ValueError, match="client"), tap.request("x"), torch.no_grad():
        model(input_ids=torch.randint(3, 120, (1, 4)))
        raise ValueError("client went away")
    assert tap.flush(5.0)
    assert tap.stats()["drops"]["request_error"] == 1 and tap.exporter.exported == 0
    tap.close()


class _GatedTransport(MemoryTransport):
    """A memory transport whose publish waits until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__(f"memory://gated-{os.urandom(4).hex()}")
        self.entered = threading.Event()
        self.gate = threading.Event()

    def publish(self, payloads: Sequence[bytes]) -> list[str]:
        self.entered.set()
        self.gate.wait(30)
        return super().publish(payloads)


def test_queue_full_by_items_is_counted() -> None:
    """With the exporter stuck, samples beyond queue_max_items are dropped as queue_full."""
    t = _GatedTransport()
    t.ensure_group("g")
    model = make_tiny("gpt2")
    tap = _attach(model, t, queue_max_items=2, export_batch=1)
    ids = torch.randint(3, 120, (1, 4))
    for i in range(5):
        with tap.request(f"r{i}"), torch.no_grad():
            model(input_ids=ids)
    assert tap.stats()["drops"]["queue_full"] == 3
    assert tap.stats()["queue_depth"] == 2
    t.gate.set()
    assert tap.flush(5.0)
    assert tap.exporter.exported == 2 and len(drain_samples(t)) == 2
    tap.close()


def test_queue_full_by_bytes_is_counted(memory_transport: Any) -> None:
    """A sample bigger than queue_max_bytes is dropped as queue_bytes, never queued."""
    model = make_tiny("gpt2")
    tap = _attach(model, memory_transport, positions="all", queue_max_bytes=1024)
    with tap.request("big"), torch.no_grad():
        model(input_ids=torch.randint(3, 120, (1, 8)))  # 3 states x 8 positions x 32 x 2 bytes = 1536
    assert tap.stats()["drops"]["queue_bytes"] == 1 and tap.stats()["queue_bytes"] == 0
    assert tap.flush(1.0) and tap.exporter.exported == 0
    tap.close()


def test_flush_and_close_respect_their_deadlines() -> None:
    """With the transport hung, flush(t) and close(t) return False within t; leftovers count as closed."""
    t = _GatedTransport()
    model = make_tiny("gpt2")
    tap = _attach(model, t, export_batch=1)
    for i in range(3):
        with tap.request(f"r{i}"), torch.no_grad():
            model(input_ids=torch.randint(3, 120, (1, 4)))
    assert t.entered.wait(5.0)
    t0 = time.monotonic()
    assert tap.flush(0.2) is False
    assert tap.close(0.3) is False
    assert time.monotonic() - t0 < 2.0
    assert tap.stats()["drops"]["closed"] == 2  # the in-flight one is still being published
    t.gate.set()


def test_closed_tap_leaves_the_model_unhooked(memory_transport: Any) -> None:
    """After close() the model has no hooks left and requests are not sampled."""
    model = make_tiny("gpt2")
    tap = _attach(model, memory_transport)
    tap.close()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with tap.request("late") as h:
        pass
    assert not h.sampled and tap.close() is True


@pytest.mark.parametrize("kwargs,field", [
    ({"transport": "redsi://localhost:6379"}, "transport"), ({"sample_rate": 1.5}, "sample_rate"),
    ({"layers": [0, 99]}, "layers"), ({"positions": "first"}, "positions"), ({"queue_max_items": 0}, "queue_max_items"),
    ({"backoff_initial_s": 2.0, "backoff_max_s": 1.0}, "backoff_max_s"), ({"sampel_rate": 0.5}, "sampel_rate"),
])
def test_bad_settings_fail_at_attach_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    """A wrong setting raises ConfigError at attach() naming the field, before any hook is installed."""
    from monitor.errors import ConfigError

    model = make_tiny("gpt2")
    with pytest.raises(ConfigError, match=field):
        monitor.attach(model, **kwargs)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --------------------------------------------------------------------------- metrics and headers
def test_metrics_registry_reports_the_tap_counters(memory_transport: Any) -> None:
    """The tap's registry holds sampled/skipped/exported/drops/queue/latency values."""
    model = make_tiny("gpt2")
    tap = _attach(model, memory_transport, sample_rate=0.0, model_name="tiny", queue_max_bytes=1024,
                  positions="all", windows=0)  # byte sizes below are of the positions alone
    ids = torch.randint(3, 120, (1, 4))
    for i, force in enumerate([True, True, False, False, False]):
        with tap.request(f"m{i}", force=force), torch.no_grad():
            model(input_ids=ids)
        assert tap.flush(5.0)  # one 768-byte sample fits the 1024-byte bound at a time
    with tap.request("huge", force=True), torch.no_grad():
        model(input_ids=torch.randint(3, 120, (1, 8)))
    assert tap.flush(5.0)
    r = tap.registry
    lbl = {"model": "tiny"}
    assert r.get_sample_value("layerwatch_tap_requests_sampled_total", lbl) == 3
    assert r.get_sample_value("layerwatch_tap_requests_skipped_total", {**lbl, "reason": "rate"}) == 3
    assert r.get_sample_value("layerwatch_tap_samples_exported_total", lbl) == 2
    assert r.get_sample_value("layerwatch_tap_drops_total", {**lbl, "reason": "queue_bytes"}) == 1
    assert r.get_sample_value("layerwatch_tap_queue_depth", lbl) == 0
    assert r.get_sample_value("layerwatch_tap_queue_bytes", lbl) == 0
    assert r.get_sample_value("layerwatch_tap_export_latency_seconds_count", lbl) == 2
    assert r.get_sample_value("layerwatch_tap_transport_errors_total", lbl) == 0
    tap.close()


def test_tap_counters_ride_in_sample_headers(memory_transport: Any) -> None:
    """Every header carries this tap instance's cumulative counters."""
    model = make_tiny("gpt2")
    tap = _attach(model, memory_transport, sample_rate=0.0)
    for i in range(4):  # two skipped, then two forced: the last header has seen all four
        with tap.request(f"h{i}", force=i >= 2), torch.no_grad():
            model(input_ids=torch.randint(3, 120, (1, 4)))
    assert tap.flush(5.0)
    samples = drain_samples(memory_transport)
    tap.close()
    assert len(samples) == 2
    last = samples[-1].tap
    assert last["instance"] == tap.instance and last["pid"] == os.getpid()
    assert last["sampled"] == 2 and last["skipped"]["rate"] == 2 and last["skipped"]["budget"] == 0
    assert set(last["drops"]) >= {"queue_full", "transport_error", "hook_error"}
    assert len({s.sample_id for s in samples}) == 2


def test_stats_accounting_identity(memory_transport: Any) -> None:
    """Every sampled single-row request ends as exported or as exactly one counted drop."""
    model = make_tiny("gpt2")
    tap = _attach(model, memory_transport, queue_max_bytes=1024, positions="all", windows=0)
    for n in (3, 4, 8, 3, 9):
        with tap.request(f"len{n}"), torch.no_grad():
            model(input_ids=torch.randint(3, 120, (1, n)))
        assert tap.flush(5.0)  # each sample alone against the 1024-byte bound
    st = tap.stats()
    assert st["sampled"] == 5 and st["exported"] + sum(st["drops"].values()) == 5
    assert st["drops"]["queue_bytes"] == 2
    tap.close()


# --------------------------------------------------------------------------- process model
def test_attach_imports_nothing_of_the_sidecar() -> None:
    """`import monitor; monitor.attach(...)` with a memory transport never imports onnxruntime,
    redis, structlog or the sidecar, lenses, drift and audit packages."""
    code = """
import sys, torch, transformers as tf
import monitor
torch.manual_seed(0)
cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                     vocab_size=128, num_key_value_heads=1)
m = tf.LlamaForCausalLM(cfg).eval()
tap = monitor.attach(m, sample_rate=1.0, transport="memory://iso")
with tap.request("x"), torch.no_grad():
    m(input_ids=torch.tensor([[1, 2, 3]]))
assert tap.flush(5.0) and tap.stats()["exported"] == 1
tap.close()
banned = ("onnxruntime", "redis", "structlog")
pkgs = ("monitor.sidecar", "monitor.lenses", "monitor.drift", "monitor.audit", "monitor.narratives")
bad = sorted(k for k in sys.modules if k.split(".")[0] in banned or k.startswith(pkgs))
print("BAD", bad)
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "BAD []" in out.stdout


@pytest.mark.redis
def test_exit_without_close_flushes_at_exit(redis_url: str, stream_name: str) -> None:
    """A process that exits without tap.close() still publishes what it queued (atexit flush)."""
    code = f"""
import torch
from torch import nn
import monitor

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
    def forward(self, h):
        return h + self.lin(h)

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.layers = nn.ModuleList([Block(), Block()])
    def forward(self, input_ids):
        h = self.emb(input_ids)
        for b in self.layers:
            h = b(h)
        return h

net = Net().eval()
tap = monitor.attach(net, sample_rate=1.0, transport={redis_url!r}, stream={stream_name!r}, blocks="layers",
                     export_interval_s=60)
with tap.request("at-exit"), torch.no_grad():
    net(torch.tensor([[1, 2, 3]]))
assert tap.stats()["queue_depth"] == 1  # not exported yet: the exporter waits for a batch or 60 s
"""
    reader = open_transport(redis_url, stream=stream_name)
    reader.ensure_group("g")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    got = drain_samples(reader)
    reader.close()
    assert [s.request_id for s in got] == ["at-exit"] and got[0].n_states == 3


def _child_serves(tap: Tap, model: torch.nn.Module, ids: torch.Tensor, q: Any) -> None:
    try:
        for i in range(3):
            with tap.request(f"child-{i}"), torch.no_grad():
                model(input_ids=ids)
        ok = tap.flush(10.0)
        q.put((os.getpid(), tap.instance, ok, tap.stats()))
    except BaseException as exc:  # report rather than hang the parent
        q.put(("error", repr(exc), False, {}))


@pytest.mark.redis
def test_forked_child_keeps_sampling_and_publishing(redis_url: str, stream_name: str) -> None:
    """A child forked after the tap started (a prefork worker) samples and publishes to Redis on
    its own exporter, as a new tap instance, and the parent keeps working."""
    model = make_tiny("gpt2")
    torch.set_num_threads(1)  # keep OpenMP out of the way of fork
    tap = monitor.attach(model, sample_rate=1.0, transport=redis_url, stream=stream_name)
    reader = open_transport(redis_url, stream=stream_name)
    reader.ensure_group("g")
    ids = torch.randint(3, 120, (1, 5))
    with tap.request("parent-0"), torch.no_grad():
        model(input_ids=ids)
    assert tap.flush(10.0) and tap.exporter.exported == 1  # exporter thread and connection are live
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=_child_serves, args=(tap, model, ids, q))
    proc.start()
    pid, instance, ok, stats = q.get(timeout=60)
    proc.join(30)
    assert pid == proc.pid and ok and proc.exitcode == 0, (pid, instance)
    assert stats["exported"] == 3 and stats["sampled"] == 3 and instance != tap.instance
    with tap.request("parent-1"), torch.no_grad():
        model(input_ids=ids)
    assert tap.flush(10.0) and tap.exporter.exported == 2
    samples = _by_request(drain_samples(reader))
    reader.close()
    tap.close()
    assert set(samples) == {"parent-0", "parent-1", "child-0", "child-1", "child-2"}
    assert samples["child-2"].tap["pid"] == proc.pid and samples["child-2"].tap["instance"] == instance
    assert samples["parent-1"].tap["pid"] == os.getpid()


def test_concurrent_requests_from_threads_are_counted_exactly(memory_transport: Any) -> None:
    """Requests served from several threads at once are each captured once and counted exactly."""
    model = make_tiny("gpt2")
    tap = _attach(model, memory_transport, export_batch=4)
    ids = torch.randint(3, 120, (1, 5))
    errors: list[BaseException] = []

    def serve(k: int) -> None:
        try:
            for i in range(10):
                with tap.request(f"t{k}-{i}"), torch.no_grad():
                    model(input_ids=ids)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and tap.flush(10.0)
    samples = drain_samples(memory_transport)
    tap.close()
    assert len({s.request_id for s in samples}) == 40 and tap.sampled == 40 and tap.exporter.exported == 40
    assert tap.stats()["queue_bytes"] == 0
