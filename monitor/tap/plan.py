"""The capture core shared by both tap front ends: a step plan and the copy it drives.

A :class:`StepPlan` says, for one forward pass, which vectors every layer hook takes out of the
hidden state. Both front ends see a layer's hidden state as ``flat = hidden.reshape(-1, d)``
(Hugging Face: ``[batch, seq, d]`` flattened, so row ``r``'s token ``t`` is ``r * seq + t``;
vLLM: its flattened ``[num_tokens, d]`` batch as it is), so one plan shape serves both:

* ``gather``: ``index[P]`` rows of ``flat`` (last token, every token, generated tokens);
* ``mean``: ``weights @ rows`` (the prompt mean, or this step's share of it under chunked
  prefill), with ``last`` the rows of the last token for ``last+mean``;
* beside either, prompt *windows* (:mod:`monitor.windows`): ``window_weights [S, W, T]`` over
  the sampled rows, one more batched product into a float32 buffer ``[L, S*W, d]``.

:func:`take` copies one layer's vectors into the step buffer ``[L, P, d]`` with one
``index_select`` (or one matrix product for a mean); :func:`seal` casts the buffer to float16 and
takes it off the device without a host synchronisation (CUDA: pinned memory, non-blocking copy,
one event per device that the exporter thread waits on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from monitor.tap.exporter import CapturedStep

_HOST = torch.device("cpu")


@dataclass(slots=True, kw_only=True)
class StepPlan:
    """Which vectors every hook of one forward takes (built once per forward, by a front end)."""

    mode: str  # "gather" or "mean"
    device: torch.device
    per_slot: int  # vectors per sampled row (1; 2 for last+mean; k for "all")
    n_out: int  # P: rows of the step buffer
    index: torch.Tensor  # gather: [P] rows of flat; mean: [N] rows of flat the weights read
    weights: torch.Tensor | None = None  # mean: [S, N] float32 (None for gather)
    last: torch.Tensor | None = None  # last+mean: [S] rows of flat holding each slot's last token
    seq: int = 0  # Hugging Face: the padded length (the flat row stride); vLLM: 0
    rows: torch.Tensor | None = None  # Hugging Face: [P] batch row of each vector (logits_to_keep)
    pos: torch.Tensor | None = None  # Hugging Face: [P] padded position of each vector
    positions: torch.Tensor | None = None  # [P] position in the request's own tokens (None: fixed)
    fixed_positions: list[int] | None = None
    valid: torch.Tensor | None = None  # [P] bool, None = all valid
    all_rows: bool = False  # mean: every flat row is read (skip the index_select)
    bmm_weights: torch.Tensor | None = None  # Hugging Face mean: [S, 1, T] over [S, T, d]
    copies: dict[torch.device, tuple[Any, ...]] = field(default_factory=dict)
    views: tuple[torch.Tensor, ...] = ()
    buf: torch.Tensor | None = None
    topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
    # prompt windows (Hugging Face, step 0): [S, W, T] averaging rows over each sampled row's
    # tokens (zero rows past that row's own window count), the batch rows they read, and each
    # row's prompt length (the exporter derives the bounds from it, off the serving thread)
    window_weights: torch.Tensor | None = None
    window_rows: torch.Tensor | None = None
    window_lengths: torch.Tensor | None = None
    max_windows: int = 0
    window_min_tokens: int = 1
    wbuf: torch.Tensor | None = None
    wviews: tuple[torch.Tensor, ...] = ()

    def on(self, dev: torch.device) -> tuple[Any, ...]:
        """The plan's index tensors on ``dev`` (a model split over devices), moved once per step."""
        got = self.copies.get(dev)
        if got is None:
            got = (to_device(self.index, dev),
                   None if self.weights is None else to_device(self.weights, dev),
                   None if self.bmm_weights is None else to_device(self.bmm_weights, dev),
                   None if self.last is None else to_device(self.last, dev),
                   None if self.window_weights is None else to_device(self.window_weights, dev),
                   None if self.window_rows is None else to_device(self.window_rows, dev))
            self.copies[dev] = got
        return got


def take(plan: StepPlan, n_layers: int, slot: int, hidden: torch.Tensor,
         residual: torch.Tensor | None = None) -> None:
    """Copy this layer's planned vectors into the step buffer ``[n_layers, P, d]``.

    ``residual``: a layer that returns ``(out, residual)`` (vLLM) has the residual stream
    ``out + residual``; only the planned rows of each are read and added.
    """
    h = hidden.detach() if hidden.requires_grad else hidden
    d = int(h.shape[-1])
    buf = plan.buf
    if buf is None:  # first hook of the step: allocate on the device the model runs on
        dtype = h.dtype if plan.mode == "gather" else torch.float32
        buf = plan.buf = torch.empty((n_layers, plan.n_out, d), dtype=dtype, device=h.device)
        plan.views = buf.unbind(0)
    index, weights, bmm_weights, last, window_weights, window_rows = plan.copies.get(h.device) or plan.on(h.device)
    if window_weights is not None:
        _take_windows(plan, n_layers, slot, h, window_weights, window_rows)
    view = plan.views[slot]
    flat = h.reshape(-1, d)
    res = None if residual is None else residual.reshape(-1, d)

    def rows(idx: torch.Tensor) -> torch.Tensor:
        x = flat.index_select(0, idx)
        return x if res is None else x + res.index_select(0, idx)

    if plan.mode == "gather":
        if res is None and h.dtype == buf.dtype and h.device == buf.device:
            torch.index_select(flat, 0, index, out=view)
        else:
            view.copy_(rows(index))
        return
    if bmm_weights is not None:  # Hugging Face: [S, 1, T] weights over the sampled rows [S, T, d]
        sel = h if plan.all_rows else h.index_select(0, index)
        mean = torch.bmm(bmm_weights, sel.float()).reshape(-1, d)  # [S, d]
    else:  # flat layout: [S, N] weights over the N rows the plan reads
        sel = flat if plan.all_rows and res is None else rows(index)
        mean = weights @ sel.float()
    if last is None:
        view.copy_(mean)
        return
    # last+mean: each vector by the very op its single mode uses, so [mean, last] equal the
    # "mean" and "last" payloads bit for bit (one bmm over [mean; one-hot] weights did not:
    # the BLAS may pick another kernel, another summation order, for 2 rows than for 1)
    pair = view.view(-1, 2, d)
    pair[:, 0].copy_(mean)
    pair[:, 1].copy_(rows(last))


def _take_windows(plan: StepPlan, n_layers: int, slot: int, h: torch.Tensor, weights: torch.Tensor,
                  rows: torch.Tensor | None) -> None:
    """This layer's window means: ``[S, W, T] @ [S, T, d]`` accumulated in float32, written
    straight into the window buffer (cast to the wire dtype once, in :func:`seal`)."""
    s, w, _ = weights.shape
    d = int(h.shape[-1])
    if plan.wbuf is None:
        plan.wbuf = torch.empty((n_layers, s * w, d), dtype=torch.float32, device=h.device)
        plan.wviews = plan.wbuf.unbind(0)
    sel = h if rows is None else h.index_select(0, rows)
    torch.bmm(weights, sel.float(), out=plan.wviews[slot].view(s, w, d))


def seal(plan: StepPlan, events: list[Any], dtype: torch.dtype = torch.float16) -> CapturedStep | None:
    """End of a forward: one cast to the wire dtype, then the step off the device (CUDA: async).

    Appends one CUDA event per device to ``events`` (recorded after every copy was enqueued);
    the exporter thread waits on them, the serving thread never does.
    """
    if plan.buf is None:
        return None
    devs: dict[torch.device, Any] = {}
    topk = plan.topk
    hidden = plan.buf if plan.buf.dtype == dtype else plan.buf.to(dtype)
    st = CapturedStep(
        hidden=to_host(hidden, devs), per_slot=plan.per_slot,
        positions=None if plan.positions is None else to_host(plan.positions, devs),
        fixed_positions=plan.fixed_positions,
        valid=None if plan.valid is None else to_host(plan.valid, devs),
        topk_ids=None if topk is None else to_host(topk[0], devs),
        topk_logprobs=None if topk is None else to_host(topk[1], devs),
        topk_valid=None if topk is None or topk[2] is None else to_host(topk[2], devs),
    )
    if plan.wbuf is not None and plan.window_lengths is not None:
        st.windows = to_host(plan.wbuf if plan.wbuf.dtype == dtype else plan.wbuf.to(dtype), devs)
        st.window_lengths = to_host(plan.window_lengths, devs)
        st.max_windows, st.window_min_tokens = plan.max_windows, plan.window_min_tokens
    record_events(devs, events)
    return st


def final_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids and log-probabilities of ``logits [P, V]`` without a full log_softmax."""
    vals, ids = logits.topk(min(k, int(logits.shape[-1])), dim=-1)
    return ids, vals.float() - logits.float().logsumexp(-1, keepdim=True)


def record_events(devs: dict[torch.device, Any], events: list[Any]) -> None:
    """One CUDA event per device that received a copy (recorded after all of them)."""
    for dev in devs:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(dev))
        events.append(ev)


def to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Move a small tensor without a host synchronisation (pinned + non-blocking from the CPU)."""
    if t.device == dev:
        return t
    if t.device.type == "cpu" and dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev, non_blocking=True)


def to_host(t: torch.Tensor, devs: dict[torch.device, Any]) -> torch.Tensor:
    """Small tensor -> host memory. CUDA: a non-blocking copy into pinned memory (the caller
    records an event per device after all copies); the serving thread never waits."""
    if t.device.type == "cpu":
        return t
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        devs.setdefault(t.device, None)
        return host
    return t.to(_HOST)  # other accelerators: a plain copy
