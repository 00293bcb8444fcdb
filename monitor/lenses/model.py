"""The lens bank's parameters in PyTorch, and a plain PyTorch implementation of the bank.

A bank watches states ``layers`` (sorted, ending with state N, the model's last state). For each
watched state it holds an affine *translator* ``x -> x @ matrix[i] + bias[i]`` (identity for the
logit lens and for state N, whose lens is the model's own output) and, per concept probe, a linear
classifier on the raw state. :class:`TorchLensBank` computes exactly what the exported ONNX graph
computes, with the model's read-out, in float32: it is the reference of the parity test and the
"plain PyTorch" line of the throughput benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from monitor.lenses.readings import CONTEXT_SUFFIX, BankOutput, SampleReadings, split_batch
from monitor.lenses.readout import ReadoutSpec
from monitor.lenses.trust import bar_of, probe_bars


@dataclass
class Translators:
    """Per watched state an affine map ``x @ matrix[i] + bias[i]`` (float32)."""

    kind: str  # "logit" (all identity) or "tuned"
    layers: tuple[int, ...]
    matrix: torch.Tensor  # [S, d, d]
    bias: torch.Tensor  # [S, d]

    @classmethod
    def identity(cls, layers: tuple[int, ...], hidden_size: int) -> Translators:
        """The logit lens: every translator is the identity."""
        s = len(layers)
        eye = torch.eye(hidden_size).expand(s, hidden_size, hidden_size).contiguous()
        return cls("logit", tuple(layers), eye, torch.zeros(s, hidden_size))

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """Translate states ``h`` [B, S, d] (one per watched layer) to [B, S, d]."""
        if self.kind == "logit":
            return h.float()
        return torch.einsum("bsd,sde->bse", h.float(), self.matrix) + self.bias

    def select(self, layers: tuple[int, ...]) -> Translators:
        """The translators of a subset of the watched layers."""
        idx = [self.layers.index(layer) for layer in layers]
        return Translators(self.kind, tuple(layers), self.matrix[idx], self.bias[idx])


@dataclass
class ProbeSet:
    """A linear concept probe per watched state: ``softmax((h @ weight[i] + bias[i]) / temperature[i])``.

    ``temperature`` (one per state, fitted on calibration texts; 1 when absent) makes a reading's
    probability mean what it says. ``mean`` is the same concept's probe trained on prompt-mean
    states (the tap's second position); ``None`` for a probe trained on last-token states only."""

    name: str
    labels: tuple[str, ...]
    layers: tuple[int, ...]
    weight: torch.Tensor  # float32 [S, d, C]
    bias: torch.Tensor  # float32 [S, C]
    metrics: dict[str, Any] = field(default_factory=dict)
    temperature: torch.Tensor | None = None  # float32 [S]
    mean: ProbeSet | None = None

    def calibrated(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights and biases with the temperature folded in (what the exported graph holds):
        ``(h @ W + b) / T == h @ (W / T) + b / T``."""
        if self.temperature is None:
            return self.weight.float(), self.bias.float()
        t = self.temperature.float()
        return self.weight.float() / t[:, None, None], self.bias.float() / t[:, None]

    def probabilities(self, h: torch.Tensor) -> torch.Tensor:
        """Class probabilities [B, S, C] of states ``h`` [B, S, d]."""
        w, b = self.calibrated()
        return torch.softmax(torch.einsum("bsd,sdc->bsc", h.float(), w) + b, dim=-1)

    def select(self, layers: tuple[int, ...]) -> ProbeSet:
        """The probes of a subset of the watched layers."""
        idx = [self.layers.index(layer) for layer in layers]
        return ProbeSet(self.name, self.labels, tuple(layers), self.weight[idx], self.bias[idx], self.metrics,
                        None if self.temperature is None else self.temperature[idx],
                        None if self.mean is None else self.mean.select(layers))


class TorchLensBank:
    """The lens bank in plain PyTorch (float32): same inputs, same outputs as the ONNX graph."""

    provider = "torch-cpu"

    def __init__(
        self,
        readout: ReadoutSpec,
        translators: Translators,
        probes: tuple[ProbeSet, ...] = (),
        k: int = 5,
    ) -> None:
        self.readout = readout
        self.translators = translators
        self.probes = probes
        self.layers = translators.layers
        self.hidden_size = readout.hidden_size
        self.k = k
        self.probe_labels = {p.name: p.labels for p in probes}
        # the same quality bar a bundle of these probes records (monitor.lenses.trust)
        self.probe_bars = probe_bars({"lens": {"layers": list(self.layers)}, "probes": [
            {"name": p.name, **p.metrics, "quality_bar": bar_of(p.metrics, p.layers)} for p in probes]})

    @torch.no_grad()
    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary lens log-probabilities [B, L, V] (the last layer is the model's output)."""
        return self.readout.logits(self.translators.apply(hidden)).log_softmax(-1)

    @torch.no_grad()
    def read_arrays(self, hidden: np.ndarray | torch.Tensor) -> BankOutput:
        """Readings of ``hidden`` [B, L, d] (states of ``self.layers``, the last one state N)."""
        h = torch.as_tensor(np.asarray(hidden, dtype=np.float32)) if isinstance(hidden, np.ndarray) else hidden
        h = h.float()
        logq = self.log_probs(h)  # [B, L, V]
        final = logq[:, -1]
        q = logq.exp()
        entropy = -(q * logq).sum(-1)
        kl = (final.exp()[:, None] * (final[:, None] - logq)).sum(-1).clamp_min(0)
        top_p, top_i = q.topk(self.k, dim=-1)
        f_top = final.argmax(-1)
        at = logq.gather(-1, f_top[:, None, None].expand(-1, logq.shape[1], 1))
        rank = (logq > at).sum(-1)
        probes = {p.name: p.probabilities(h).numpy() for p in self.probes}
        return BankOutput(
            layers=tuple(self.layers),
            topk_ids=top_i.numpy(),
            topk_probs=top_p.numpy(),
            entropy=entropy.numpy(),
            kl_to_final=kl.numpy(),
            final_top1_rank=rank.numpy(),
            final_topk_ids=top_i[:, -1].numpy(),
            final_topk_probs=top_p[:, -1].numpy(),
            final_entropy=entropy[:, -1].numpy(),
            probes=probes,
        )

    @property
    def context_probe_labels(self) -> dict[str, tuple[str, ...]]:
        """Labels of the prompt-mean readings (:meth:`read_context`)."""
        return {p.name + CONTEXT_SUFFIX: p.labels for p in self.probes}

    @torch.no_grad()
    def read_context(self, hidden: np.ndarray) -> dict[str, np.ndarray]:
        """The probes on prompt-mean states [B, L, d]: each probe's ``mean`` probe (its last-token
        probe when it has none, as bundles built before the prompt-mean probes)."""
        h = torch.as_tensor(np.asarray(hidden, dtype=np.float32))
        return {p.name + CONTEXT_SUFFIX: (p.mean or p).probabilities(h).numpy() for p in self.probes}

    def read(self, hidden: np.ndarray) -> list[SampleReadings]:
        """Per-sample readings of ``hidden`` [B, L, d]."""
        return split_batch(self.read_arrays(hidden), self.probe_labels)
