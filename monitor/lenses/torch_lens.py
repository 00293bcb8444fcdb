"""A PyTorch logit lens with the lens bank's interface, for models without an exported bundle.

It applies the served model's own final norm and unembedding to every watched state (the
"logit lens": no training) and computes the same readings as the ONNX lens bank. The sidecar
uses it when no bundle is configured and the model is at hand (embedded mode, tests); the
production path is the ONNX bank of :mod:`monitor.lenses`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from monitor.adapters import find_parts, model_fingerprint
from monitor.lenses.readings import BankOutput, SampleReadings, split_batch


class TorchLogitLens:
    """Logit-lens readings in PyTorch (final norm + unembedding on every watched state)."""

    provider = "torch-cpu"

    def __init__(self, model: nn.Module, layers: tuple[int, ...] | None = None, k: int = 5) -> None:
        self.parts = find_parts(model)
        if self.parts.unembed is None:
            raise ValueError("the logit lens needs a model with an LM head")
        self.layers = layers or tuple(range(self.parts.n_states))
        self.hidden_size = self.parts.hidden_size
        self.fingerprint = model_fingerprint(model, self.parts)
        self.bundle_id = "logit-lens:" + self.fingerprint[7:19]
        self.probe_labels: dict[str, tuple[str, ...]] = {}
        cfg = getattr(model, "config", None)  # the same default label as the tap's
        self.model_name = str(getattr(cfg, "name_or_path", "") or type(model).__name__)
        self.k = k

    @torch.no_grad()
    def read_arrays(self, hidden: np.ndarray) -> BankOutput:
        """``hidden``: [B, L, d] states of ``self.layers`` (the last one is state N)."""
        h = torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32))
        logp = self.parts.final_logits(h).float().log_softmax(-1)  # [B, L, V]
        final = logp[:, -1]  # state N through the final norm and unembedding = the model's output
        p = logp.exp()
        entropy = -(p * logp).sum(-1)
        kl = (final.exp().unsqueeze(1) * (final.unsqueeze(1) - logp)).sum(-1)
        top_p, top_i = p.topk(self.k, dim=-1)
        f_top = final.argmax(-1)
        f_lp = logp.gather(-1, f_top[:, None, None].expand(-1, logp.shape[1], 1))
        rank = (logp > f_lp).sum(-1)
        fp, fi = final.exp().topk(self.k, dim=-1)
        return BankOutput(
            layers=self.layers, topk_ids=top_i.numpy(), topk_probs=top_p.numpy(), entropy=entropy.numpy(),
            kl_to_final=kl.clamp_min(0).numpy(), final_top1_rank=rank.numpy(), final_topk_ids=fi.numpy(),
            final_topk_probs=fp.numpy(), final_entropy=entropy[:, -1].numpy(), probes={},
        )

    def read(self, hidden: np.ndarray) -> list[SampleReadings]:
        return split_batch(self.read_arrays(hidden), self.probe_labels)
