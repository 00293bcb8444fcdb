"""How the vLLM tap assembles each sampled request's capture from the steps that carry it.

A prompt split over steps by chunked prefill is planned step by step from the runner's host-side
arrays (request index, query start offsets, computed-token counts: no device read) and assembled
across steps: the mean and the prompt windows accumulate in float32 (a recomputed prefix after
preemption is not counted twice), gathered positions are kept by position. A request is exported
once every planned vector is in. :class:`Assembly` is the part of
:class:`monitor.tap.vllm.frontend.VllmTap` that does this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from monitor.config import TapSettings
from monitor.tap.core import TapCore
from monitor.tap.exporter import CapturedStep
from monitor.tap.plan import StepPlan, record_events, to_device, to_host

@dataclass
class _Req:
    """A sampled request's capture, assembled over the steps that carry its tokens."""

    req_id: str
    request_id: str
    sample_id: str
    prompt_len: int
    metadata: dict[str, Any]
    started: float
    mean: torch.Tensor | None = None  # [L, d] float32 running sum / prompt_len
    mean_upto: int = 0  # prompt positions [0, mean_upto) are in `mean`
    mean_from: int = 0  # first prompt position the mean covers (> 0 only without the engine mark)
    vecs: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> [L, d]
    bounds: np.ndarray | None = None  # [W, 2] prompt windows (monitor.windows), None: not captured
    windows: torch.Tensor | None = None  # [L, W, d] float32 running window means
    windows_upto: int = 0  # prompt positions [0, windows_upto) are in `windows`


@dataclass
class _StepWork:
    gather: StepPlan | None
    owners: list[tuple[_Req, int]]  # gather row j -> (request, position)
    mean: StepPlan | None
    mean_owners: list[_Req]
    mean_ends: list[int]
    windows: StepPlan | None = None  # this step's share of each request's window means
    window_owners: list[tuple[_Req, int]] = field(default_factory=list)  # row j -> (request, window)
    window_ends: list[tuple[_Req, int]] = field(default_factory=list)


class Assembly:
    """Step planning and per-request assembly (mixed into the tap; attributes set by it)."""

    runner: Any
    settings: TapSettings
    core: TapCore | None
    mode: str
    active: dict[str, _Req | None]

    def _plan(self) -> _StepWork | None:
        """Which rows of this step's flat batch each hook takes (host arrays only)."""
        runner = self.runner
        ib = runner.input_batch
        starts = runner.query_start_loc.np
        computed = ib.num_computed_tokens_cpu
        index = ib.req_id_to_index
        gather: list[int] = []
        owners: list[tuple[_Req, int]] = []
        mean_rows: list[list[int]] = []
        mean_owners: list[_Req] = []
        mean_ends: list[int] = []
        win_cols: list[list[int]] = []  # per window row: the flat rows it reads
        win_w: list[float] = []
        window_owners: list[tuple[_Req, int]] = []
        window_ends: list[tuple[_Req, int]] = []
        present = False
        for rid, r in self.active.items():
            i = index.get(rid)
            if i is None:
                continue
            s, e = int(starts[i]), int(starts[i + 1])
            if e <= s:
                continue
            present = True
            if r is None:
                continue
            p0 = int(computed[i])
            for pos in self._gather_positions(r, p0, p0 + e - s):
                gather.append(s + pos - p0)
                owners.append((r, pos))
            if self.mode in ("mean", "last+mean"):
                lo, hi = max(p0, r.mean_upto, r.mean_from), min(p0 + e - s, r.prompt_len)
                if hi > lo:
                    mean_rows.append(list(range(s + lo - p0, s + hi - p0)))
                    mean_owners.append(r)
                    mean_ends.append(hi)
            if r.bounds is not None and len(r.bounds):
                lo, hi = max(p0, r.windows_upto), min(p0 + e - s, r.prompt_len)
                if hi > lo:
                    for k, (a, b) in enumerate(r.bounds):
                        wa, wb = max(lo, int(a)), min(hi, int(b))
                        if wb > wa:
                            win_cols.append(list(range(s + wa - p0, s + wb - p0)))
                            win_w.append(1.0 / float(b - a))
                            window_owners.append((r, k))
                    window_ends.append((r, hi))
        if not present:
            return None
        dev = self.runner.device
        gplan = mplan = None
        if gather:
            gplan = StepPlan(mode="gather", device=dev, per_slot=1, n_out=len(gather),
                             index=to_device(torch.tensor(gather, dtype=torch.long), dev))
        if mean_rows:
            mplan = _mean_plan(mean_rows, [1.0 / max(1, r.prompt_len - r.mean_from) for r in mean_owners], dev)
        wplan = None
        if win_cols:
            wplan = _mean_plan(win_cols, win_w, dev)
        return _StepWork(gplan, owners, mplan, mean_owners, mean_ends, wplan, window_owners, window_ends)

    def _gather_positions(self, r: _Req, lo: int, hi: int) -> range:
        """Positions in [lo, hi) this request's mode gathers (in its own token numbering)."""
        p = r.prompt_len
        if self.mode in ("last", "last+mean"):
            first, end = p - 1, p
        elif self.mode == "all":
            first, end = max(0, p - self.settings.max_positions), p
        elif self.mode == "generated":
            first, end = p - 1, p - 1 + self.settings.max_positions
        else:
            return range(0)
        return range(max(lo, first), min(hi, end))

    # ------------------------------------------------------------------------- hooks

    def _collect(self, work: _StepWork) -> None:
        """Move this step's vectors into their requests; export the requests now complete."""
        if work.gather is not None and work.gather.buf is not None:
            for j, (r, pos) in enumerate(work.owners):
                r.vecs[pos] = work.gather.buf[:, j]
        if work.mean is not None and work.mean.buf is not None:
            for k, r in enumerate(work.mean_owners):
                part = work.mean.buf[:, k]
                r.mean = part if r.mean is None else r.mean + part
                r.mean_upto = work.mean_ends[k]
        if work.windows is not None and work.windows.buf is not None:
            for j, (r, k) in enumerate(work.window_owners):
                if r.windows is None:
                    assert r.bounds is not None
                    r.windows = torch.zeros((work.windows.buf.shape[0], len(r.bounds), work.windows.buf.shape[2]),
                                            dtype=torch.float32, device=work.windows.buf.device)
                r.windows[:, k] += work.windows.buf[:, j]
        for r, end in work.window_ends:
            r.windows_upto = end
        done = {id(r): r for r, _ in work.owners} | {id(r): r for r in work.mean_owners} \
            | {id(r): r for r, _ in work.window_ends}
        for r in done.values():
            if self._complete(r):
                self.active.pop(r.req_id, None)
                self._export(r)

    def _complete(self, r: _Req) -> bool:
        last = r.prompt_len - 1
        if self.mode == "generated":
            return len(r.vecs) >= self.settings.max_positions
        if self.mode in ("mean", "last+mean") and r.mean_upto < r.prompt_len:
            return False
        if r.bounds is not None and len(r.bounds) and r.windows_upto < int(r.bounds[-1, 1]):
            return False
        if self.mode in ("last", "last+mean", "all"):
            return last in r.vecs
        return True

    def _export(self, r: _Req) -> None:
        assert self.core is not None
        if self.mode in ("mean", "last+mean"):
            assert r.mean is not None
            vecs = [r.mean] + ([r.vecs[r.prompt_len - 1].float()] if self.mode == "last+mean" else [])
            positions: list[int] = []
            if r.mean_from:
                r.metadata["mean_from_position"] = r.mean_from
        else:
            positions = sorted(r.vecs)
            vecs = [r.vecs[p] for p in positions]
        hidden = torch.stack(vecs, dim=1).to(self.core.wire_dtype)  # [L, k, d]
        devs: dict[torch.device, Any] = {}
        events: list[Any] = []
        host = to_host(hidden, devs)
        st = CapturedStep(hidden=host, per_slot=int(hidden.shape[1]), fixed_positions=positions)
        if r.bounds is not None:  # [L, W, d] (W may be 0: a one-token prompt); the exporter names the bounds
            wins = r.windows if r.windows is not None else hidden.new_zeros((hidden.shape[0], 0, hidden.shape[2]))
            st.windows = to_host(wins.to(self.core.wire_dtype), devs)
            st.window_lengths = torch.tensor([r.prompt_len])
            st.max_windows, st.window_min_tokens = self.settings.windows, self.settings.window_min_tokens
        record_events(devs, events)
        self.core.finish([r.sample_id], [r.request_id], [r.metadata], [st], events=events,
                         nbytes=int(host.numel()) * host.element_size(), started=r.started)


def _mean_plan(rows: list[list[int]], weight: list[float], dev: torch.device) -> StepPlan:
    """A flat mean plan: output row k is ``weight[k]`` times the sum of flat rows ``rows[k]``."""
    flat = [j for rs in rows for j in rs]
    w = torch.zeros((len(rows), len(flat)), dtype=torch.float32)
    col = 0
    for k, rs in enumerate(rows):
        w[k, col:col + len(rs)] = weight[k]
        col += len(rs)
    return StepPlan(mode="mean", device=dev, per_slot=1, n_out=len(rows),
                    index=to_device(torch.tensor(flat, dtype=torch.long), dev), weights=to_device(w, dev))
