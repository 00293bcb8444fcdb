"""The model's read-out (final norm + unembedding) as plain arrays, checked against the model.

Every lens ends in the model's own read-out: ``logits = unembed(final_norm(h))``. The ONNX lens
bank and the trainers do not call the Hugging Face modules; they use the arrays extracted here,
and :func:`readout_spec` refuses a model whose read-out these arrays do not reproduce (a norm
flavour or a non-linear head we do not know) with :class:`UnsupportedArchitecture`, so an
exported bank is never silently different from the served model.

The norm gain is folded into the unembedding (``W_g = W * g``): ``logits = s(h) @ W_g.T + c``
where ``s`` is the gain-free normalisation (RMS or LayerNorm statistics only) and ``c`` collects
the LayerNorm bias and the head's bias. One matrix product per layer, nothing else per vocabulary
entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from monitor.adapters import ModelParts, unembedding_weight
from monitor.errors import UnsupportedArchitecture

NORM_KINDS = ("rms", "layer", "none")


@dataclass(frozen=True)
class ReadoutSpec:
    """``logits = s(h) @ weight.T + bias`` with ``s`` the gain-free final normalisation."""

    norm: str  # "rms" | "layer" | "none"
    eps: float
    weight: torch.Tensor  # float32 [V, d], the unembedding with the norm gain folded in
    bias: torch.Tensor | None  # float32 [V] or None

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    def normalise(self, h: torch.Tensor) -> torch.Tensor:
        """The gain-free final normalisation ``s(h)`` (float32)."""
        return normalise(h, self.norm, self.eps)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits of residual states ``h`` [..., d] (float32)."""
        z = self.normalise(h.float()) @ self.weight.T
        return z + self.bias if self.bias is not None else z


def normalise(h: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """RMS or LayerNorm statistics without gain and bias; ``"none"`` returns ``h``."""
    h = h.float()
    if kind == "rms":
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if kind == "layer":
        c = h - h.mean(-1, keepdim=True)
        return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)
    return h


def _norm_kind(norm: torch.nn.Module | None) -> tuple[str, float, torch.Tensor | None, torch.Tensor | None]:
    if norm is None:
        return "none", 0.0, None, None
    gain = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    if isinstance(norm, torch.nn.LayerNorm):
        return "layer", float(norm.eps), gain, bias
    name = type(norm).__name__.lower()
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
    if "rms" in name and eps is not None:
        return "rms", float(eps), gain, bias
    if "layernorm" in name and eps is not None:
        return "layer", float(eps), gain, bias
    raise UnsupportedArchitecture(
        f"final norm {type(norm).__name__} is neither an RMSNorm nor a LayerNorm; the lens bank "
        "cannot reproduce it"
    )


@torch.no_grad()
def readout_spec(parts: ModelParts, *, check: bool = True, seed: int = 0) -> ReadoutSpec:
    """Extract the read-out of ``parts`` and (by default) check it against the model's own.

    The check feeds random residual states through ``parts.final_logits`` and through the
    arrays; a relative mismatch above 1e-4 raises :class:`UnsupportedArchitecture` (for example
    Gemma's ``1 + weight`` RMSNorm or BERT's non-linear prediction head).
    """
    w = unembedding_weight(parts)
    if w is None or parts.unembed is None:
        raise UnsupportedArchitecture(f"{parts.family}: the model has no linear unembedding (LM head)")
    kind, eps, gain, nbias = _norm_kind(parts.final_norm)
    w = w.detach().float().cpu()
    head_bias = getattr(parts.unembed, "bias", None)
    bias = head_bias.detach().float().cpu().clone() if isinstance(head_bias, torch.Tensor) else None
    if isinstance(nbias, torch.Tensor):
        extra = w @ nbias.detach().float().cpu()
        bias = extra if bias is None else bias + extra
    if isinstance(gain, torch.Tensor):
        w = w * gain.detach().float().cpu()[None, :]
    spec = ReadoutSpec(kind, eps, w.contiguous(), bias)
    if check:
        gen = torch.Generator().manual_seed(seed)
        h = torch.randn(4, parts.hidden_size, generator=gen) * 3.0
        param = next(iter(parts.unembed.parameters()))
        ref = parts.final_logits(h.to(param.device, param.dtype)).float().cpu()
        got = spec.logits(h)
        err = float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-6))
        if not err <= 1e-4:
            raise UnsupportedArchitecture(
                f"{parts.family}: the read-out (final norm {type(parts.final_norm).__name__}, head "
                f"{type(parts.unembed).__name__}) is not 'norm + linear' (relative error {err:.2e}); "
                "the lens bank cannot reproduce it"
            )
    return spec
