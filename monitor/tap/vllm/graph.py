"""Capture inside vLLM's compiled graph: one opaque op per decoder layer.

A step with a sampled request used to run uncompiled (hooks need eager modules). On the CPU
backend that costs the whole step about 16% (inductor fuses the norms, activations and rotary
embeddings; ``/work/bench``-style measurement in README), which every row of the step pays. Here
each decoder layer is wrapped (before vLLM compiles the model) so that its output, and the first
layer's input, pass through ``torch.ops.layerwatch.tap``: an opaque custom op registered as
*effectful* (never dead-code eliminated, kept in program order), so Dynamo and Inductor leave it
in the graph and call it on every step. Its body is Python: with no sampled request in the step
it returns at once (one dispatch per layer); with one, it runs the same
:func:`monitor.tap.plan.take` copy as the hooks, on the very tensors the compiled graph holds.

Only where the compiled graph is actually *executed* each step: a CUDA graph replays kernels
without calling Python, so the tap keeps the uncompiled step wherever CUDA graphs are on (GPU
default) and uses this path where they are off (the CPU backend; GPU with
``cudagraph_mode=NONE``). The op is harmless in eager mode too (hooks are not needed then).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_SINKS: dict[int, Callable[[int, torch.Tensor, torch.Tensor | None], None]] = {}
_LIB: Any = None


def _tap(hidden: torch.Tensor, residual: torch.Tensor | None, owner: int, slot: int) -> None:
    sink = _SINKS.get(owner)
    if sink is not None:
        sink(slot, hidden, residual)


def register_op() -> None:
    """Define ``layerwatch::tap`` once per process (idempotent).

    The plain ``torch.library.Library`` API, not ``custom_op``: its Python kernel dispatches in
    about 4 us against 20 us, and the op runs 31 times in every step (measured in a compiled
    30-layer toy: 5 us per call inside the graph).
    """
    global _LIB
    if _LIB is not None:
        return
    from torch._higher_order_ops.effects import _EffectType, _register_effectful_op

    lib = torch.library.Library("layerwatch", "FRAGMENT")
    lib.define("tap(Tensor hidden, Tensor? residual, int owner, int slot) -> ()")
    lib.impl("tap", _tap, "CompositeExplicitAutograd")
    torch.library.register_fake("layerwatch::tap", lib=lib)(lambda hidden, residual, owner, slot: None)
    _register_effectful_op(torch.ops.layerwatch.tap.default, _EffectType.ORDERED)
    _LIB = lib


def set_sink(owner: int, sink: Callable[[int, torch.Tensor, torch.Tensor | None], None] | None) -> None:
    """Where the op of tap ``owner`` sends each layer's tensors (None: nowhere)."""
    if sink is None:
        _SINKS.pop(owner, None)
    else:
        _SINKS[owner] = sink


class TapLayer(nn.Module):
    """A decoder layer whose output (and, for the first layer, input) goes through the op.

    vLLM's decoder layers return ``(out, residual)``; the op gets both (the residual stream is
    their sum, added inside :func:`take` on the planned rows only).
    """

    def __init__(self, inner: nn.Module, owner: int, slot: int | None, input_slot: int | None) -> None:
        super().__init__()
        self.inner = inner
        self.owner = owner
        self.slot = -1 if slot is None else slot
        self.input_slot = -1 if input_slot is None else input_slot

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.input_slot >= 0:
            h = kwargs.get("hidden_states")
            if h is None:
                h = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
            if h is not None:
                torch.ops.layerwatch.tap(h, None, self.owner, self.input_slot)
        out = self.inner(*args, **kwargs)
        if self.slot >= 0:
            if isinstance(out, torch.Tensor):
                torch.ops.layerwatch.tap(out, None, self.owner, self.slot)
            elif isinstance(out, (tuple, list)) and len(out) >= 2 and isinstance(out[1], torch.Tensor) \
                    and out[1].shape == out[0].shape:
                torch.ops.layerwatch.tap(out[0], out[1], self.owner, self.slot)
            else:
                torch.ops.layerwatch.tap(out[0], None, self.owner, self.slot)
        return out


def wrap_layers(model: nn.Module, blocks: tuple[nn.Module, ...], owner: int,
                slot: dict[int, int]) -> tuple[nn.Module, ...]:
    """Replace each block in its parent container with a :class:`TapLayer` (state ``i + 1`` is
    block ``i``'s output; state 0 the first block's input). Returns the wrappers."""
    register_op()
    parents: dict[int, tuple[nn.Module, str]] = {}
    for _name, mod in model.named_modules():
        for child_name, child in mod.named_children():
            parents.setdefault(id(child), (mod, child_name))
    wrapped = []
    for i, blk in enumerate(blocks):
        if id(blk) not in parents:
            raise RuntimeError(f"decoder layer {i} has no parent module to wrap it in")
        parent, name = parents[id(blk)]
        w = TapLayer(blk, owner, slot.get(i + 1), slot.get(0) if i == 0 else None)
        if isinstance(parent, (nn.ModuleList, nn.Sequential)):
            parent[int(name)] = w
        else:
            setattr(parent, name, w)
        wrapped.append(w)
    return tuple(wrapped)
