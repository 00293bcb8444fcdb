"""The vLLM tap's in-graph capture op (:mod:`monitor.tap.vllm.graph`), without vLLM: a toy
decoder whose layers return ``(out, residual)`` like vLLM's, compiled by Inductor."""

from __future__ import annotations

import torch
from torch import nn

from monitor.tap.vllm.graph import TapLayer, set_sink, wrap_layers


class _Layer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        res = hidden_states if residual is None else hidden_states + residual
        return torch.relu(self.lin(res)), res


class _Model(nn.Module):
    def __init__(self, n: int = 3, d: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(d) for _ in range(n))

    def forward(self, positions: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        residual = None
        for layer in self.layers:
            h, residual = layer(positions, h, residual)
        return h + residual


def _streams(model: _Model, x: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream before the first layer and after each (the eager reference)."""
    out, h, residual = [x], x, None
    for layer in model.layers:
        h, residual = layer(None, h, residual)
        out.append(h + residual)
    return out


def test_compiled_graph_calls_the_op_every_step_with_each_layers_stream() -> None:
    """Inductor keeps the effectful op (nothing uses its result) and calls it on every step,
    for every layer and the first layer's input, with tensors whose sum is the residual stream;
    the model's output is unchanged by the wrapping."""
    torch.manual_seed(0)
    model = _Model().eval()
    blocks = tuple(model.layers)
    wrapped = wrap_layers(model, blocks, owner=101, slot={0: 0, 1: 1, 2: 2, 3: 3})
    assert all(isinstance(m, TapLayer) for m in model.layers) and len(wrapped) == 3
    seen: list[tuple[int, torch.Tensor]] = []
    set_sink(101, lambda slot, h, r: seen.append((slot, (h if r is None else h + r).clone())))
    compiled = torch.compile(model, backend="inductor", dynamic=True)
    try:
        with torch.no_grad():
            for n in (5, 7, 9):
                x = torch.randn(n, 8)
                seen.clear()
                y = compiled(None, x)
                inner = _Model()
                inner.layers = nn.ModuleList(blocks)
                streams = _streams(inner, x)
                assert [s for s, _ in seen] == [0, 1, 2, 3]
                for (_, got), want in zip(seen, streams, strict=True):
                    torch.testing.assert_close(got, want)
                torch.testing.assert_close(y, inner(None, x))
    finally:
        set_sink(101, None)


def test_op_without_a_sink_does_nothing() -> None:
    """A wrapped layer whose tap has no sink (no sampled request, or rank > 0) only forwards."""
    model = _Model().eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        before = model(None, x)
        wrap_layers(model, tuple(model.layers), owner=202, slot={1: 1})
        torch.testing.assert_close(model(None, x), before, rtol=0, atol=0)
