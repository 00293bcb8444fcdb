"""The Hugging Face front end's step planner: padded ``[batch, seq]`` forwards -> a StepPlan.

Which rows and positions every layer hook of one forward takes, built with torch ops on the
inputs' device (no ``.tolist()``/``int()`` of a device tensor, so no host synchronisation on
CUDA). Positions are counted in each row's own tokens, padding excluded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from monitor.config import TapSettings
from monitor.tap.exporter import CapturedStep
from monitor.tap.plan import StepPlan, to_device
from monitor.windows import FIRST_POSITION


@dataclass(slots=True)
class Capture:
    """Per-request capture state, held in a ContextVar while the request runs."""

    request_ids: list[str]
    sample_ids: list[str]
    rows: list[int] | None  # sampled batch rows (None: every row of the call, known at plan time)
    metadata: list[dict[str, Any]]
    batch_size: int | None  # tap.batch(): the batch size the caller announced
    started: float
    step: int = 0
    failed: bool = False
    plan: StepPlan | None = None
    rows_dev: dict[torch.device, torch.Tensor] = field(default_factory=dict)
    lengths: torch.Tensor | list[int] | None = None  # tokens per sampled row at step 0
    steps: list[CapturedStep] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    nbytes: int = 0
    hooked: bool = False  # holds a reference on the per-layer hooks (see Tap._hold_layer_hooks)


def plan_padded_step(cap: Capture, settings: TapSettings, new_ids: Callable[[int], list[str]],
                     args: tuple[Any, ...], kwargs: dict[str, Any]) -> StepPlan | None:
    """Decide, once per forward, which rows and positions every hook of this step takes.

    Everything is built with torch ops on the inputs' device: no ``.tolist()``/``int()`` of a
    device tensor, so there is no host synchronisation on CUDA. The first step (the prompt's
    prefill) also plans the prompt windows when ``settings.windows`` > 0.
    """
    plan = _plan_positions(cap, settings, new_ids, args, kwargs)
    if plan is not None and cap.step == 0 and settings.windows > 0:
        mask = kwargs.get("attention_mask")
        m = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == plan.seq:
            rows = cap.rows_dev[plan.device]
            m = (mask if plan.all_rows else mask.index_select(0, rows.to(mask.device))).to(plan.device) != 0
        n_slots = len(cap.rows or ())
        plan.window_weights, plan.window_lengths = window_plan(
            m, n_slots, plan.seq, plan.device, settings.windows, settings.window_min_tokens)
        plan.window_rows = None if plan.all_rows else cap.rows_dev[plan.device]
        plan.max_windows, plan.window_min_tokens = settings.windows, settings.window_min_tokens
    return plan


def window_plan(m: torch.Tensor | None, n_slots: int, seq: int, dev: torch.device, max_windows: int,
                min_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[S, max_windows, seq]`` averaging weights of each row's prompt windows and ``[S]`` prompt
    lengths, on ``dev`` without a host synchronisation.

    Row ``s`` of ``n`` real tokens (``m``: the padding mask; None = all ``seq`` real) gets the
    windows of :func:`monitor.windows.window_bounds` ``(n, max_windows, min_tokens)`` over its own
    token positions (padding excluded), the same formula in torch ops; rows past its window count
    are zero (the exporter ships only the first ``W``).
    """
    if m is None:
        real = torch.arange(seq, device=dev).expand(n_slots, seq)
        n = torch.full((n_slots,), seq, device=dev, dtype=torch.long)
        valid = torch.ones((n_slots, seq), dtype=torch.bool, device=dev)
    else:
        real = m.long().cumsum(-1) - 1  # each token's position among its row's real tokens
        n = m.long().sum(-1)
        valid = m
    span = (n - FIRST_POSITION).clamp(min=0)  # tokens in windows (position 0 is in none)
    count = torch.where(span >= 1, (span // min_tokens).clamp(min=1, max=max_windows), 0)
    j = torch.arange(max_windows + 1, device=dev)
    edges = FIRST_POSITION + (j.unsqueeze(0) * span.unsqueeze(1)) // count.clamp(min=1).unsqueeze(1)
    start, end = edges[:, :-1, None], edges[:, 1:, None]  # [S, W, 1]
    inside = (real.unsqueeze(1) >= start) & (real.unsqueeze(1) < end) & valid.unsqueeze(1)
    inside &= (j[:-1].view(1, -1, 1) < count.view(-1, 1, 1))
    weights = inside.float() / (end - start).clamp(min=1).float()
    return weights, n


def _plan_positions(cap: Capture, settings: TapSettings, new_ids: Callable[[int], list[str]],
                    args: tuple[Any, ...], kwargs: dict[str, Any]) -> StepPlan | None:
    """The positions part of :func:`plan_padded_step` (the ``positions`` setting)."""
    mode = settings.positions
    step = cap.step
    if step > 0 and (mode != "generated" or step >= settings.max_positions):
        return None
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if not isinstance(ids, torch.Tensor) or ids.dim() < 2:
        raise ValueError("cannot find input_ids or inputs_embeds of shape [batch, seq, ...]")
    bsz, seq = int(ids.shape[0]), int(ids.shape[1])
    dev = ids.device
    if cap.rows is None:  # tap.request(): every row of the call belongs to the request
        cap.rows = list(range(bsz))
        if bsz > len(cap.sample_ids):
            cap.sample_ids.extend(new_ids(bsz - len(cap.sample_ids)))
        if bsz > 1:
            base_meta = cap.metadata[0]
            cap.request_ids = cap.request_ids * bsz
            cap.metadata = [{**base_meta, "row": r} for r in range(bsz)]
    elif cap.batch_size is not None and bsz != cap.batch_size:
        raise ValueError(f"tap.batch() got {cap.batch_size} request ids but the model ran {bsz} rows")
    n_slots = len(cap.rows)
    all_rows = n_slots == bsz
    rows = cap.rows_dev.get(dev)
    if rows is None:
        rows = torch.arange(bsz, device=dev) if all_rows else to_device(torch.tensor(cap.rows), dev)
        cap.rows_dev[dev] = rows
    mask = kwargs.get("attention_mask")
    m = None
    if step == 0 and isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == seq:
        m = (mask if all_rows else mask.index_select(0, rows.to(mask.device))).to(dev) != 0
    common: dict[str, Any] = {"device": dev, "seq": seq, "all_rows": all_rows}
    if mode in ("mean", "last+mean"):
        if m is None:
            weights = torch.full((n_slots, 1, seq), 1.0 / seq, device=dev)
        else:
            w = m.float()
            weights = (w / w.sum(-1, keepdim=True).clamp(min=1.0)).unsqueeze(1)
        last = None
        if mode == "last+mean":  # vector 0: the mean, vector 1: the last real token
            last_pos = torch.full((n_slots,), seq - 1, device=dev) if m is None else _last_valid(m)
            last = rows * seq + last_pos
        k = 1 if last is None else 2
        return StepPlan(mode="mean", per_slot=k, n_out=n_slots * k, index=rows, bmm_weights=weights,
                        last=last, fixed_positions=[], **common)
    if mode == "all":
        k = min(settings.max_positions, seq)
        rows_k = rows.unsqueeze(1).expand(n_slots, k).reshape(-1)  # (repeat_interleave may sync)
        if m is None:
            pos = torch.arange(seq - k, seq, device=dev).repeat(n_slots)
            return _gather(rows_k, pos, k, n_slots * k, common,
                                fixed_positions=list(range(seq - k, seq)) * n_slots)
        idx = _last_valid(m).unsqueeze(1) - (k - 1) + torch.arange(k, device=dev)  # [S, k] windows
        idxc = idx.clamp(min=0)
        valid = (idx >= 0) & m.gather(1, idxc)
        real = m.long().cumsum(-1).gather(1, idxc) - 1
        return _gather(rows_k, idxc.reshape(-1), k, n_slots * k, common,
                            positions=real.reshape(-1), valid=valid.reshape(-1))
    # "last", or "generated" (step 0: the last prompt token; then each token fed back)
    if step == 0:
        if m is None:
            cap.lengths = [seq] * n_slots
            pos = torch.full((n_slots,), seq - 1, device=dev)
            return _gather(rows, pos, 1, n_slots, common, fixed_positions=[seq - 1] * n_slots)
        row_len = m.sum(-1)
        cap.lengths = row_len
        return _gather(rows, _last_valid(m), 1, n_slots, common, positions=(row_len - 1).clamp(min=0))
    pos = torch.full((n_slots,), seq - 1, device=dev)
    lengths = cap.lengths
    if isinstance(lengths, torch.Tensor):
        return _gather(rows, pos, 1, n_slots, common, positions=lengths + (step - 1))
    fixed = [n + step - 1 for n in lengths or [seq] * n_slots]
    return _gather(rows, pos, 1, n_slots, common, fixed_positions=fixed)

def _gather(rows: torch.Tensor, pos: torch.Tensor, k: int, n_out: int, common: dict[str, Any],
            **where: Any) -> StepPlan:
    """A gather plan: vector ``i`` is token ``pos[i]`` of batch row ``rows[i]``."""
    return StepPlan(mode="gather", per_slot=k, n_out=n_out, index=rows * common["seq"] + pos,
                    rows=rows, pos=pos, **common, **where)

def _last_valid(m: torch.Tensor) -> torch.Tensor:
    """Index of each row's last non-padding position ([S, T] bool -> [S]; 0 for an empty row)."""
    ar = torch.arange(m.shape[1], device=m.device)
    return torch.where(m, ar, 0).amax(-1)
