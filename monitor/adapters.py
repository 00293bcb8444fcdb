"""Model adapters: find the blocks, final norm and unembedding of a served model.

Layer numbering, used everywhere (wire format, lenses, metrics): a model with N blocks has
N+1 states. State 0 is the embedding output (the input of block 0); state ``l`` is the residual
stream after block ``l-1``, *before* the final norm (the final norm belongs to the lens). So
states 0..N-1 equal what ``output_hidden_states=True`` returns and state N is the input of the
final norm (Hugging Face returns it already normed).

The ladder below is explicit and ends in a loud :class:`UnsupportedArchitecture` error that says
how to pass the module paths by hand (``find_parts(model, blocks="model.layers", ...)``).
This module imports torch only; it is shared by the tap and the lens trainer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monitor.errors import UnsupportedArchitecture

# (blocks, final_norm, unembed) dotted paths, tried in order. ``None`` means "not present".
# Paths are relative to the top-level model; the base-model variants (no LM head) come after
# the LM variants so a bare LlamaModel still resolves.
_LADDER: list[tuple[str, str, str | None, str | None]] = [
    # (family, blocks, final_norm, unembed)
    ("llama/mistral/qwen2", "model.layers", "model.norm", "lm_head"),
    ("llama/mistral/qwen2 (base)", "layers", "norm", None),
    ("gpt2", "transformer.h", "transformer.ln_f", "lm_head"),
    ("gpt2 (base)", "h", "ln_f", None),
    ("gpt-neox", "gpt_neox.layers", "gpt_neox.final_layer_norm", "embed_out"),
    ("gpt-neox", "gpt_neox.layers", "gpt_neox.final_layer_norm", "lm_head"),
    ("gpt-neox (base)", "layers", "final_layer_norm", None),
    # Encoders are post-LN: every block ends in its own LayerNorm, there is no final norm.
    ("bert (masked LM)", "bert.encoder.layer", None, "cls.predictions"),
    ("bert (base)", "encoder.layer", None, None),
    ("roberta (masked LM)", "roberta.encoder.layer", None, "lm_head"),
    ("roberta (base)", "encoder.layer", None, None),
]


@dataclass(frozen=True)
class ModelParts:
    """What the tap and the lenses need to know about one model."""

    family: str
    blocks: tuple[nn.Module, ...]
    final_norm: nn.Module | None
    unembed: nn.Module | None
    hidden_size: int
    vocab_size: int | None

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def n_states(self) -> int:
        """N+1: embeddings plus one state after each block."""
        return len(self.blocks) + 1

    def final_logits(self, state_n: torch.Tensor) -> torch.Tensor:
        """The model's own output logits computed from captured state N (final norm + unembed)."""
        if self.unembed is None:
            raise UnsupportedArchitecture(f"{self.family}: this model has no LM head (unembedding)")
        h = self.final_norm(state_n) if self.final_norm is not None else state_n
        return self.unembed(h)  # type: ignore[no-any-return]


def _get(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def _hidden_size(model: nn.Module, blocks: tuple[nn.Module, ...]) -> int:
    cfg = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            return v
    for p in blocks[0].parameters():
        return int(p.shape[-1])
    raise UnsupportedArchitecture(f"{type(model).__name__}: cannot tell the hidden size")


def find_parts(
    model: nn.Module,
    *,
    blocks: str | None = None,
    final_norm: str | None = None,
    unembed: str | None = None,
) -> ModelParts:
    """Locate blocks, final norm and unembedding of ``model``.

    Pass dotted paths to override the ladder for an architecture it does not know, e.g.
    ``find_parts(model, blocks="backbone.layers", final_norm="backbone.norm_f", unembed="lm_head")``.
    """
    cls = type(model).__name__
    if blocks is not None:
        found = _get(model, blocks)
        if not isinstance(found, (nn.ModuleList, nn.Sequential)) or len(found) == 0:
            raise UnsupportedArchitecture(f"{cls}: blocks path {blocks!r} is not a non-empty ModuleList")
        norm = _get(model, final_norm) if final_norm else None
        head = _get(model, unembed) if unembed else None
        if final_norm and norm is None:
            raise UnsupportedArchitecture(f"{cls}: final_norm path {final_norm!r} not found")
        if unembed and head is None:
            raise UnsupportedArchitecture(f"{cls}: unembed path {unembed!r} not found")
        return _parts(model, "custom", tuple(found), norm, head)
    for family, bpath, npath, upath in _LADDER:
        found = _get(model, bpath)
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            continue
        norm = _get(model, npath) if npath else None
        if npath and not isinstance(norm, nn.Module):
            continue
        head = _get(model, upath) if upath else None
        if upath and not isinstance(head, nn.Module):
            continue
        return _parts(model, family, tuple(found), norm, head)
    raise UnsupportedArchitecture(
        f"layerwatch does not know where the blocks of {cls} are. Supported families: GPT-2, "
        "Llama/Mistral/Qwen2, GPT-NeoX, BERT, RoBERTa. Pass the module paths by hand: "
        "monitor.attach(model, blocks='path.to.layers', final_norm='path.to.norm', "
        "unembed='lm_head') (final_norm/unembed may be omitted when the model has none)."
    )


def _parts(
    model: nn.Module,
    family: str,
    blocks: tuple[nn.Module, ...],
    norm: nn.Module | None,
    head: nn.Module | None,
) -> ModelParts:
    vocab = None
    if head is not None:
        cfg = getattr(model, "config", None)
        vocab = getattr(cfg, "vocab_size", None)
        w = getattr(head, "weight", None)
        if w is None:
            w = getattr(getattr(head, "decoder", None), "weight", None)
        if isinstance(w, torch.Tensor):
            vocab = int(w.shape[0])
    return ModelParts(family, blocks, norm, head, _hidden_size(model, blocks), vocab)


def unembedding_weight(parts: ModelParts) -> torch.Tensor | None:
    """The [vocab, d] matrix that maps the (normed) residual stream to logits, if linear."""
    head = parts.unembed
    if head is None:
        return None
    for mod in (head, getattr(head, "decoder", None)):
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            return w
    return None


def model_fingerprint(model: nn.Module, parts: ModelParts | None = None) -> str:
    """A stable identity of the served model: architecture, sizes and a hash of the unembedding.

    The unembedding is hashed after rounding to float16, so the same weights served in float32
    or float16 give the same fingerprint. Lens bundles and baselines carry this value and are
    refused for any other model.
    """
    parts = parts or find_parts(model)
    w = unembedding_weight(parts)
    if w is None:  # encoders without an LM head: hash the token embedding instead
        get_emb = getattr(model, "get_input_embeddings", None)
        emb = get_emb() if callable(get_emb) else None
        w = getattr(emb, "weight", None)
    return _fingerprint(type(model).__name__, parts.family, parts.n_blocks, parts.hidden_size,
                        parts.vocab_size, w)


def _fingerprint(cls: str, family: str, n_blocks: int, hidden: int, vocab: int | None, w: Any) -> str:
    h = hashlib.sha256()
    if isinstance(w, torch.Tensor):
        h.update(w.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    ident = {
        "class": cls,
        "family": family,
        "n_blocks": n_blocks,
        "hidden_size": hidden,
        "vocab_size": vocab,
        "unembed_sha256": h.hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return "sha256:" + digest[:32]


# model_type in config.json -> the ladder family the Hugging Face adapter gives that model
_CHECKPOINT_FAMILIES = {
    "llama": "llama/mistral/qwen2", "mistral": "llama/mistral/qwen2", "qwen2": "llama/mistral/qwen2",
    "gpt2": "gpt2", "gpt_neox": "gpt-neox",
}
# where the unembedding lives in a checkpoint: LM heads first, then tied input embeddings
_UNEMBED_KEYS = ("lm_head.weight", "embed_out.weight", "model.embed_tokens.weight",
                 "transformer.wte.weight", "wte.weight", "embed_tokens.weight")


def checkpoint_fingerprint(model_dir: str | Path) -> str:
    """:func:`model_fingerprint` of a Hugging Face checkpoint folder, read from its files.

    For servers that load the weights themselves (vLLM, possibly sharded over tensor-parallel
    ranks): the value equals ``model_fingerprint(AutoModelForCausalLM.from_pretrained(dir))``,
    so bundles trained on the Hugging Face model are accepted. Only safetensors checkpoints of
    the decoder families the ladder knows are supported; anything else raises
    :class:`UnsupportedArchitecture` with the reason.
    """
    from safetensors import safe_open

    root = Path(model_dir)
    cfg = json.loads((root / "config.json").read_text())
    arch = (cfg.get("architectures") or [None])[0]
    family = _CHECKPOINT_FAMILIES.get(str(cfg.get("model_type")))
    if arch is None or family is None:
        raise UnsupportedArchitecture(
            f"{root}: model_type {cfg.get('model_type')!r} ({arch}) is not a decoder family layerwatch "
            f"knows ({', '.join(sorted(_CHECKPOINT_FAMILIES))}); encoder models cannot be served by vLLM's tap")
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise UnsupportedArchitecture(f"{root}: no .safetensors files (GGUF and .bin checkpoints are not supported)")
    tied = bool(cfg.get("tie_word_embeddings", family != "gpt-neox"))
    keys = [k for k in _UNEMBED_KEYS if tied or "embed" not in k or k == "embed_out.weight"]
    for key in keys:
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                if key in st.keys():  # noqa: SIM118 (safe_open has no __contains__)
                    w = st.get_tensor(key)
                    break
        else:
            continue
        break
    else:
        raise UnsupportedArchitecture(f"{root}: no unembedding weight among {keys}")
    n_blocks = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    hidden = cfg.get("hidden_size", cfg.get("n_embd"))
    return _fingerprint(arch, family, int(n_blocks), int(hidden), int(w.shape[0]), w)


def block_output(output: Any) -> torch.Tensor:
    """The residual stream from a block's forward output (a tensor in transformers 5, a tuple in 4)."""
    if isinstance(output, torch.Tensor):
        return output
    return output[0]  # type: ignore[no-any-return]


def block_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The residual stream a block receives (positional or ``hidden_states=`` keyword)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return kwargs["hidden_states"]  # type: ignore[no-any-return]


@torch.no_grad()
def collect_states(
    model: nn.Module,
    parts: ModelParts,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run one forward pass and return all N+1 states as a [N+1, B, T, d] tensor (offline use).

    This is the reference the tap is checked against and what lens training consumes.
    """
    states: list[torch.Tensor | None] = [None] * parts.n_states
    handles = []

    def pre0(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        states[0] = block_input(args, kwargs)

    handles.append(parts.blocks[0].register_forward_pre_hook(pre0, with_kwargs=True))
    for i, blk in enumerate(parts.blocks):
        def post(_m: nn.Module, _a: Any, out: Any, i: int = i) -> None:
            states[i + 1] = block_output(out)

        handles.append(blk.register_forward_hook(post))
    try:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        model(**kwargs)
    finally:
        for hd in handles:
            hd.remove()
    return torch.stack([s for s in states if s is not None])
