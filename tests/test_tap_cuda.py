"""The tap's CUDA capture path (pinned host buffers, non-blocking copies, one event per device,
no stream synchronisation on the serving thread).

Every test here needs a CUDA device and is skipped without one (CPU-only CI skips the whole
file). Models are tiny random Llamas (d=64, 3 blocks, vocab 256) on ``cuda``; each test takes
seconds. Run on a GPU machine with ``python -m pytest -q -rs tests/test_tap_cuda.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from conftest import assert_same_generation, drain_samples, generate_plain_then_tapped

import monitor
from monitor.adapters import find_parts
from monitor.tap import Tap
from monitor.transport import MemoryTransport, Transport
from monitor.wire import Sample

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device: exercises the tap's CUDA capture path (torch.cuda.is_available() is False)",
)

N_BLOCKS = 3
HIDDEN = 64
VOCAB = 256
CUDA = torch.device("cuda")
POSITION_MODES = ["last", "all", "mean", "last+mean", "generated"]


# --------------------------------------------------------------------------- helpers
def _tiny(dtype: torch.dtype = torch.float32, attn: str = "eager", device: torch.device | str = CUDA,
          seed: int = 0) -> torch.nn.Module:
    """A tiny random-weight Llama in eval mode on ``device``. ``eager`` attention by default:
    transformers' sdpa mask path itself calls ``.all()`` on a padding mask (a host sync that is
    none of the tap's business)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(num_hidden_layers=N_BLOCKS, hidden_size=HIDDEN, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, vocab_size=VOCAB,
                         attn_implementation=attn)
    model = tf.LlamaForCausalLM(cfg).eval()
    return model.to(device=device, dtype=dtype)


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = torch.nn.LayerNorm(HIDDEN)
        self.up = torch.nn.Linear(HIDDEN, 2 * HIDDEN)
        self.down = torch.nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.ln(h) * keep
        causal = x.cumsum(1) / keep.cumsum(1).clamp(min=1.0)  # a causal mean over real tokens
        return h + self.down(torch.nn.functional.gelu(self.up(causal)))


class _Inner(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(VOCAB, HIDDEN)
        self.layers = torch.nn.ModuleList([_Block() for _ in range(N_BLOCKS)])
        self.norm = torch.nn.LayerNorm(HIDDEN)


class _TorchLM(torch.nn.Module):
    """A tiny decoder in plain torch with Llama's module paths (model.layers, model.norm,
    lm_head), so the adapter ladder finds it. Its forward never synchronises with the host,
    unlike the installed transformers' (which may, e.g. in its mask preparation), so a whole
    forward can run under sync debug mode "error" and keep a busy stream busy."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _Inner()
        self.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)
        keep = torch.ones_like(h[..., :1]) if attention_mask is None else attention_mask[..., None].to(h.dtype)
        for blk in self.model.layers:
            h = blk(h, keep)
        return self.lm_head(self.model.norm(h))  # type: ignore[no-any-return]


def _model(kind: str) -> torch.nn.Module:
    if kind == "torch-lm":
        torch.manual_seed(0)
        return _TorchLM().eval().to(CUDA)
    return _tiny()


def _block_states(model: torch.nn.Module, **inputs: Any) -> list[torch.Tensor]:
    """An untapped forward's N+1 residual states read by hooks (block 0's input, then each
    block's output; state N is the final norm's input)."""
    from monitor.adapters import block_output

    parts = find_parts(model)
    seen: list[torch.Tensor] = []
    hooks = [parts.blocks[0].register_forward_pre_hook(lambda _m, a: seen.append(a[0].clone()))]
    hooks += [b.register_forward_hook(lambda _m, _a, o: seen.append(block_output(o).clone())) for b in parts.blocks]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == N_BLOCKS + 1
    return seen


def _attach(model: torch.nn.Module, transport: Transport, **kw: Any) -> Tap:
    kw.setdefault("sample_rate", 1.0)
    return monitor.attach(model, transport=transport, **kw)


def _padded_batch(side: str, device: torch.device | str = CUDA) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Three rows of 7, 5 and 2 real tokens padded (id 0) on ``side``."""
    lengths = [7, 5, 2]
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for r, n in enumerate(lengths):
        sl = slice(0, n) if side == "right" else slice(7 - n, 7)
        ids[r, sl] = torch.randint(3, VOCAB - 1, (n,), generator=g)
        mask[r, sl] = 1
    return ids.to(device), mask.to(device), lengths


def _reference_states(model: torch.nn.Module, **inputs: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
    """An untapped forward's N+1 states (HF's ``output_hidden_states`` 0..N-1 plus the final
    norm's input, which is state N) and its logits."""
    parts = find_parts(model)
    assert parts.final_norm is not None
    seen: dict[str, torch.Tensor] = {}
    h = parts.final_norm.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0]))
    try:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
    finally:
        h.remove()
    return [*out.hidden_states[:-1], seen["x"]], out.logits


def _by_request(samples: Sequence[Sample]) -> dict[str, Sample]:
    return {s.request_id: s for s in samples}


def _f32(a: Any) -> torch.Tensor:
    return torch.from_numpy(a.astype("float32"))


def _assert_fp16_close(got: Any, expected: torch.Tensor) -> None:
    """Captured float16 vs a reference, to float16 rounding."""
    torch.testing.assert_close(_f32(got), expected.detach().float().cpu(), atol=2e-3, rtol=2e-3)


@contextmanager
def _sync_debug_error() -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode("error")``: a synchronising CUDA call raises."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _record_hook_errors(tap: Tap) -> list[str]:
    """Record the exception behind every hook error the tap counts (it swallows them: a hook
    never raises into the server), so a failing test shows what went wrong inside the tap."""
    errors: list[str] = []
    inner = tap._hook_failed

    def spy(cap: Any) -> None:
        exc = sys.exc_info()[1]
        errors.append(f"{type(exc).__name__}: {exc}" if exc is not None else "hook error")
        inner(cap)

    tap._hook_failed = spy  # type: ignore[method-assign]
    return errors


def _error_mode_inside_tap_code(tap: Tap) -> None:
    """Scope ``set_sync_debug_mode("error")`` to the tap's own capture code (for a model whose
    plain forward synchronises by itself, so the whole forward cannot run under it)."""
    def wrap(name: str) -> None:
        inner: Callable[..., Any] = getattr(tap, name)

        def scoped(*a: Any, **k: Any) -> Any:
            with _sync_debug_error():
                return inner(*a, **k)

        setattr(tap, name, scoped)

    for name in ("_plan_step", "_take", "_seal", "_unembed_post", "_finish"):
        wrap(name)


@pytest.fixture(autouse=True)
def _restore_sync_debug_mode() -> Iterator[None]:
    yield
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------- (a) values
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_capture_equals_output_hidden_states_at_every_layer(dtype: torch.dtype,
                                                                 memory_transport: MemoryTransport) -> None:
    """(a) A sampled forward on CUDA captures, for every layer 0..N and every sampled position
    (positions='all'), the states ``output_hidden_states=True`` returns for that forward (state N:
    the final norm's input) to float16 tolerance; the sample arrives through the in-memory
    transport with the right layers, shape, positions and the model's own top-1 token; the
    logits equal an untapped forward's bit for bit."""
    model = _tiny(dtype)
    ids = torch.randint(3, VOCAB - 1, (1, 9), device=CUDA)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    tap = _attach(model, memory_transport, positions="all", max_positions=9)
    errors = _record_hook_errors(tap)
    with tap.request("cuda-a") as handle:
        ref, logits = _reference_states(model, input_ids=ids)
    assert tap.flush(10.0)
    samples = drain_samples(memory_transport)
    stats = tap.stats()
    tap.close()
    assert errors == [] and stats["hook_errors"] == 0 and stats["exported"] == 1, (errors, stats)
    assert torch.equal(logits, plain)
    (s,) = samples
    assert s.request_id == "cuda-a" and s.sample_id == handle.sample_ids[0]
    assert s.layers == tuple(range(N_BLOCKS + 1)) and s.n_states == N_BLOCKS + 1
    assert s.hidden.shape == (N_BLOCKS + 1, 9, HIDDEN) and str(s.hidden.dtype) == "float16"
    assert s.position_index == tuple(range(9))
    for layer in range(N_BLOCKS + 1):
        _assert_fp16_close(s.hidden[layer], ref[layer][0])
    assert s.final_topk is not None
    top1 = torch.as_tensor(s.final_topk.ids[:, 0], device=CUDA).long()
    # (a float16 tie may pick either index: compare the logit value, not the index)
    assert torch.equal(logits[0].gather(-1, top1[:, None])[:, 0], logits[0].max(-1).values)


@pytest.mark.parametrize("positions", POSITION_MODES)
def test_cuda_capture_equals_cpu_capture_for_every_position_mode(positions: str,
                                                                 memory_transport: MemoryTransport) -> None:
    """(a) For every position mode, a left-padded batch with rows 0 and 2 sampled gives on CUDA
    the same samples as the same model on CPU: request ids, position indices, states (to float16
    tolerance) and top-k ids where shipped."""
    ids, mask, _ = _padded_batch("left", device="cpu")
    got: dict[str, dict[str, Sample]] = {}
    for dev in ("cpu", "cuda"):
        model = _tiny(device=dev)
        tap = _attach(model, memory_transport, positions=positions, sample_rate=0.0)
        with tap.batch(["a", "b", "c"], force=[True, False, True]), torch.no_grad():
            model(input_ids=ids.to(dev), attention_mask=mask.to(dev))
        assert tap.flush(10.0)
        got[dev] = _by_request(drain_samples(memory_transport))
        assert tap.hook_errors == 0
        tap.close()
    assert set(got["cuda"]) == set(got["cpu"]) == {"a", "c"}
    for rid in "ac":
        c, g = got["cpu"][rid], got["cuda"][rid]
        assert g.position_index == c.position_index and g.hidden.shape == c.hidden.shape
        assert g.metadata == c.metadata
        torch.testing.assert_close(_f32(g.hidden), _f32(c.hidden), atol=2e-3, rtol=2e-3)
        assert (g.final_topk is None) == (c.final_topk is None)
        if g.final_topk is not None and c.final_topk is not None:
            assert g.final_topk.ids[:, 0].tolist() == c.final_topk.ids[:, 0].tolist()


# --------------------------------------------------------------------------- (b) no host sync
@pytest.mark.parametrize("positions", POSITION_MODES)
@pytest.mark.parametrize("form", ["batch-subset", "request-unpadded"])
@pytest.mark.parametrize("kind", ["torch-lm", "llama"])
def test_sampled_forward_makes_no_host_device_synchronisation(kind: str, positions: str, form: str,
                                                              memory_transport: MemoryTransport) -> None:
    """(b) The sampled forward, request entry and exit included, runs under
    ``torch.cuda.set_sync_debug_mode("error")`` (a synchronising CUDA call raises) without any
    error inside the tap's code: no hook error, and the sample is still exported complete.
    ``batch-subset``: a left-padded batch with rows 0 and 2 sampled (device row indices from a
    host list, masks); ``request-unpadded``: one request over a 2-row batch without a mask.
    ``torch-lm``: a sync-free plain-torch decoder, the whole forward under "error". ``llama``:
    transformers' Llama; should its plain forward synchronise by itself (transformers 5.17 does),
    the error mode is scoped to the tap's capture code instead, and the test says so in a warning."""
    model = _model(kind)
    if form == "batch-subset":
        ids, mask, _ = _padded_batch("left")
        inputs: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
    else:
        inputs = {"input_ids": torch.randint(3, VOCAB - 1, (2, 6), device=CUDA)}
    with torch.no_grad():
        model(**inputs)  # warm-up: cuBLAS handles, allocator pools
    torch.cuda.synchronize()
    whole_forward = True
    try:
        with _sync_debug_error(), torch.no_grad():
            model(**inputs)
    except RuntimeError as exc:  # the model itself syncs: none of the tap's business
        assert kind == "llama", f"the plain-torch decoder synchronised by itself: {exc}"
        whole_forward = False
        import warnings

        warnings.warn(f"plain forward synchronises ({exc}); error mode scoped to the tap's code", stacklevel=1)
    tap = _attach(model, memory_transport, positions=positions, sample_rate=0.0,
                  export_interval_s=60.0)  # the exporter thread stays asleep until flush()
    errors = _record_hook_errors(tap)
    if not whole_forward:
        _error_mode_inside_tap_code(tap)

    def sampled(tag: str) -> None:
        if form == "batch-subset":
            ctx: Any = tap.batch([f"a{tag}", f"b{tag}", f"c{tag}"], force=[True, False, True])
        else:
            ctx = tap.request(f"r{tag}", force=True)
        with ctx, torch.no_grad():
            model(**inputs)

    sampled("0")  # warms the tap's path (pinned host pool, index tensors' kernels)
    if whole_forward:
        with _sync_debug_error():
            sampled("1")
    else:
        sampled("1")
    assert errors == [], errors
    assert tap.hook_errors == 0
    assert tap.flush(10.0)
    samples = drain_samples(memory_transport)
    stats = tap.stats()
    tap.close()
    assert stats["exported"] == 4 and sum(stats["drops"].values()) == 0, stats
    got = _by_request(samples)
    want = {"a1", "c1"} if form == "batch-subset" else {"r1"}
    assert want <= set(got)
    for rid in want:
        assert got[rid].hidden.shape[0] == N_BLOCKS + 1


@pytest.mark.parametrize("positions", ["last", "last+mean"])
@pytest.mark.parametrize("kind", ["torch-lm", "llama"])
def test_serving_thread_does_not_wait_for_the_gpu_and_exporter_waits_for_the_copy(
        kind: str, positions: str, memory_transport: MemoryTransport) -> None:
    """(b) With the stream kept busy by a long GPU sleep, a sampled request returns to the caller
    while the GPU is still working (the stream has not drained: the serving thread never waited
    on it), and the exporter, which waits on the tap's CUDA event, still publishes the correct
    values (not the pinned buffers' uninitialised contents). Skipped for a model whose own
    plain forward drains the stream (then nothing can tell whether the tap waited)."""
    model = _model(kind)
    ids, mask, _ = _padded_batch("right")
    ref = _block_states(model, input_ids=ids, attention_mask=mask)
    stream = torch.cuda.current_stream()
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # ~0.5 s of GPU clock cycles queued ahead of the forward
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    plain_returned_early = not stream.query()
    torch.cuda.synchronize()
    if not plain_returned_early:
        assert kind == "llama", "the plain-torch decoder's own forward drained the stream"
        pytest.skip("the installed transformers' Llama forward synchronises by itself (drains the stream)")
    tap = _attach(model, memory_transport, positions=positions, export_interval_s=60.0)
    errors = _record_hook_errors(tap)
    with tap.batch(["w0", "w1", "w2"]), torch.no_grad():  # warm-up of the tap's path
        model(input_ids=ids, attention_mask=mask)
    assert tap.flush(10.0)
    drain_samples(memory_transport)
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)
    with tap.batch(["x", "y", "z"]), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    still_busy = not stream.query()
    assert tap.flush(30.0)
    samples = _by_request(drain_samples(memory_transport))
    tap.close()
    assert errors == [], errors
    assert still_busy, "the stream had drained when the request returned: the serving thread waited"
    assert set(samples) == {"x", "y", "z"}
    for row, rid in enumerate("xyz"):
        last = int(mask[row].nonzero().max())
        for layer in range(N_BLOCKS + 1):
            _assert_fp16_close(samples[rid].hidden[layer, -1], ref[layer][row, last])
            if positions == "last+mean":
                real = mask[row].bool()
                _assert_fp16_close(samples[rid].hidden[layer, 0], ref[layer][row, real].mean(0))


# --------------------------------------------------------------------------- (c) batches
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_rows_map_to_their_requests_on_cuda(side: str, memory_transport: MemoryTransport) -> None:
    """(c) tap.batch() on CUDA: only the sampled rows (0 and 2 of a padded batch) are exported,
    each with its own request id, sample id, metadata (with its row), last real token's position
    and that row's states at every layer; the top-1 token is that row's own argmax."""
    model = _tiny()
    ids, mask, lengths = _padded_batch(side)
    ref, logits = _reference_states(model, input_ids=ids, attention_mask=mask)
    tap = _attach(model, memory_transport, positions="last", sample_rate=0.0)
    metas = [{"route": "/a"}, {"route": "/b"}, {"route": "/c"}]
    with tap.batch(["ra", "rb", "rc"], metadata=metas, force=[True, False, True]) as handles, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert tap.flush(10.0)
    got = _by_request(drain_samples(memory_transport))
    assert tap.hook_errors == 0
    tap.close()
    assert [h.sampled for h in handles] == [True, False, True]
    assert set(got) == {"ra", "rc"}
    for row, rid in ((0, "ra"), (2, "rc")):
        s = got[rid]
        last = int(mask[row].nonzero().max())
        assert s.sample_id == handles[row].sample_ids[0]
        assert s.metadata == {**metas[row], "row": row}
        assert s.position_index == (lengths[row] - 1,)
        assert s.hidden.shape == (N_BLOCKS + 1, 1, HIDDEN)
        for layer in range(N_BLOCKS + 1):
            _assert_fp16_close(s.hidden[layer, 0], ref[layer][row, last])
        assert s.final_topk is not None
        assert int(s.final_topk.ids[0, 0]) == int(logits[row, last].argmax())


def test_request_over_a_cuda_batch_exports_one_sample_per_row(memory_transport: MemoryTransport) -> None:
    """(c) tap.request() around a 3-row CUDA batch exports three samples of that request, each
    row's own states (rows in metadata)."""
    model = _tiny()
    ids = torch.randint(3, VOCAB - 1, (3, 5), device=CUDA)
    ref, _ = _reference_states(model, input_ids=ids)
    tap = _attach(model, memory_transport, positions="last")
    with tap.request("multi", metadata={"k": "v"}) as handle, torch.no_grad():
        model(input_ids=ids)
    assert tap.flush(10.0)
    samples = drain_samples(memory_transport)
    tap.close()
    assert len(samples) == 3 and {s.request_id for s in samples} == {"multi"}
    assert sorted(s.sample_id for s in samples) == sorted(handle.sample_ids)
    for s in samples:
        row = s.metadata["row"]
        assert s.metadata == {"k": "v", "row": row}
        for layer in range(N_BLOCKS + 1):
            _assert_fp16_close(s.hidden[layer, 0], ref[layer][row, -1])


# --------------------------------------------------------------------------- (d) generate
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_on_cuda_is_bit_identical_and_captures_each_step(attn: str,
                                                                  memory_transport: MemoryTransport) -> None:
    """(d) generate() on CUDA with the tap sampling every step (rate 1.0, positions='generated')
    returns the same tokens and scores bit for bit as an untapped run, and the one exported
    sample holds the state that produced each generated token (top-1 = the generated token)."""
    model = _tiny(attn=attn)
    prompt = torch.randint(3, VOCAB - 1, (1, 5), device=CUDA)
    n_new = 4
    ref, got, tap = generate_plain_then_tapped(
        model, lambda m: _attach(m, memory_transport, positions="generated"), prompt, n_new, "gen")
    assert tap.flush(10.0)
    samples = drain_samples(memory_transport)
    assert tap.hook_errors == 0
    tap.close()
    assert_same_generation(got, ref)
    (s,) = samples
    assert s.position_index == tuple(range(4, 4 + n_new))
    assert s.hidden.shape == (N_BLOCKS + 1, n_new, HIDDEN)
    assert s.final_topk is not None
    assert s.final_topk.ids[:, 0].tolist() == got.sequences[0, 5 : 5 + n_new].tolist()
    # the full sequence recomputed without a cache gives the same states (float16 + cache rounding)
    full, _ = _reference_states(model, input_ids=got.sequences, use_cache=False)
    for layer in range(N_BLOCKS + 1):
        torch.testing.assert_close(_f32(s.hidden[layer]), full[layer][0, 4 : 4 + n_new].float().cpu(),
                                   atol=3e-3, rtol=3e-3)
