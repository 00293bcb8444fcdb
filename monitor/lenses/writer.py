"""Write a lens bundle: the ONNX graph, the translator and probe weights, and the manifest.

The weights are also stored as safetensors (never pickle) so a bundle can be re-exported, have
its quality re-measured, or seed further training without the ONNX file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from monitor.adapters import ModelParts, find_parts, model_fingerprint
from monitor.lenses.bundle import GRAPH_FILE, MANIFEST, write_manifest
from monitor.lenses.export import OPSET, OUTPUTS, build_bank_graph, save_model
from monitor.lenses.model import ProbeSet, Translators
from monitor.lenses.readout import ReadoutSpec, readout_spec
from monitor.lenses.trust import bar_of

WEIGHTS_FILE = "weights.safetensors"


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """Class, name, vocabulary size and a sha256 of the vocabulary (token -> id) of a tokenizer."""
    if tokenizer is None:
        return {}
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    digest = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    return {
        "class": type(tokenizer).__name__,
        "name": Path(name).name if name else "",
        "vocab_size": len(vocab),
        "vocab_sha256": digest,
    }


def model_identity(model: nn.Module, parts: ModelParts, name: str | None = None) -> dict[str, Any]:
    """The ``model`` section of a manifest."""
    cfg = getattr(model, "config", None)
    return {
        "name": name or str(getattr(cfg, "_name_or_path", "") or type(model).__name__).rsplit("/", 1)[-1],
        "class": type(model).__name__,
        "fingerprint": model_fingerprint(model, parts),
        "family": parts.family,
        "n_blocks": parts.n_blocks,
        "n_states": parts.n_states,
        "hidden_size": parts.hidden_size,
        "vocab_size": parts.vocab_size,
    }


def save_weights(path: Path, translators: Translators, probes: tuple[ProbeSet, ...]) -> None:
    """Translators and probes as safetensors (float32)."""
    from safetensors.torch import save_file

    tensors = {
        "translator.matrix": translators.matrix.detach().float().contiguous(),
        "translator.bias": translators.bias.detach().float().contiguous(),
    }
    for p in probes:
        for key, probe in ((f"probe.{p.name}", p), (f"probe.{p.name}.mean", p.mean)):
            if probe is None:
                continue
            tensors[f"{key}.weight"] = probe.weight.detach().float().contiguous()
            tensors[f"{key}.bias"] = probe.bias.detach().float().contiguous()
            if probe.temperature is not None:
                tensors[f"{key}.temperature"] = probe.temperature.detach().float().contiguous()
    # One metadata key: safetensors writes its metadata map in hash-map order, so several keys
    # would make identical weights give different bytes (and a different sha256 in the manifest).
    meta = json.dumps({"kind": translators.kind, "layers": list(translators.layers)}, sort_keys=True)
    save_file(tensors, str(path), metadata={"layerwatch": meta})


def load_weights(bundle_root: Path, manifest: dict[str, Any]) -> tuple[Translators, tuple[ProbeSet, ...]]:
    """Read back the translators and probes of a (verified) bundle."""
    from safetensors.torch import load_file

    t = load_file(str(bundle_root / WEIGHTS_FILE))
    layers = tuple(int(x) for x in manifest["lens"]["layers"])
    tr = Translators(manifest["lens"]["kind"], layers, t["translator.matrix"], t["translator.bias"])
    probes = []
    for p in manifest.get("probes", []):
        key, labels = f"probe.{p['name']}", tuple(p["labels"])
        metrics = {k: v for k, v in p.items() if k not in ("name", "labels")}
        mean = None
        if f"{key}.mean.weight" in t:
            mean = ProbeSet(p["name"], labels, layers, t[f"{key}.mean.weight"], t[f"{key}.mean.bias"],
                            metrics.get("positions", {}).get("mean", {}), t.get(f"{key}.mean.temperature"))
        probes.append(ProbeSet(p["name"], labels, layers, t[f"{key}.weight"], t[f"{key}.bias"], metrics,
                               t.get(f"{key}.temperature"), mean))
    return tr, tuple(probes)


def write_bundle(
    out: str | Path,
    model: nn.Module,
    translators: Translators,
    probes: tuple[ProbeSet, ...] = (),
    *,
    tokenizer: Any = None,
    model_name: str | None = None,
    k: int = 5,
    quality: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    parts: ModelParts | None = None,
    readout: ReadoutSpec | None = None,
    overwrite: bool = True,
) -> dict[str, Any]:
    """Export and write a complete bundle to ``out``: built in ``<out>.partial`` beside it and
    moved in only when complete (:func:`replace_dir`), so an interrupted build leaves the previous
    bundle intact. Each probe's quality bar (:mod:`monitor.lenses.trust`) is recorded in the
    manifest. Returns the manifest.
    """
    out = Path(out)
    _restore_previous(out)
    parts = parts or find_parts(model)
    readout = readout or readout_spec(parts)
    layers = tuple(translators.layers)
    if layers[-1] != parts.n_blocks:
        raise ValueError(f"the watched layers must end with the final state {parts.n_blocks}, got {layers}")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    graph = build_bank_graph(readout, translators, probes, k)
    save_model(graph, tmp / GRAPH_FILE)
    save_weights(tmp / WEIGHTS_FILE, translators, probes)
    manifest: dict[str, Any] = {
        "model": model_identity(model, parts, model_name),
        "tokenizer": tokenizer_identity(tokenizer),
        "lens": {
            "kind": translators.kind,
            "layers": list(layers),
            "final_layer": parts.n_blocks,
            "k": k,
            "readout": {"norm": readout.norm, "eps": readout.eps, "bias": readout.bias is not None},
            "numbering": "0 = embeddings, l = residual stream after block l-1 (before the final norm)",
        },
        "graph": {
            "file": GRAPH_FILE,
            "opset": OPSET,
            "inputs": {"hidden": "float32 [batch, layers, hidden]",
                       "layer_index": "int64 [layers] (positions in lens.layers; baked in at load)"},
            "outputs": list(OUTPUTS) + [f"probe_{p.name}" for p in probes],
        },
        "probes": [
            {"name": p.name, "labels": list(p.labels), **{k_: v for k_, v in p.metrics.items() if k_ != "labels"},
             # fixed here, at build: where the probe may be printed (a bar recorded before is kept)
             "quality_bar": bar_of(p.metrics, layers)}
            for p in probes
        ],
        "quality": quality or {},
        "training": training or {},
    }
    manifest = write_manifest(tmp, manifest)
    replace_dir(tmp, out, overwrite=overwrite)
    return manifest


def _restore_previous(out: Path) -> None:
    """An earlier replacement interrupted between its two renames left only ``<out>.previous``:
    put it back."""
    prev = out.with_name(out.name + ".previous")
    if prev.exists() and not out.exists():
        prev.rename(out)


def replace_dir(tmp: Path, out: Path, *, overwrite: bool = True) -> None:
    """Move the complete bundle ``tmp`` to ``out``. A previous bundle at ``out`` stays whole until
    the new one is in place (two renames; one interrupted between them is undone on the next
    build), and a directory that is not a lens bundle is never replaced."""
    _restore_previous(out)
    prev = out.with_name(out.name + ".previous")
    if out.exists():
        if not overwrite:
            shutil.rmtree(tmp)
            raise FileExistsError(f"{out} exists")
        if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
            shutil.rmtree(tmp)
            raise FileExistsError(f"{out} exists and is not a lens bundle (no {MANIFEST}); refusing to replace it: "
                                  "choose another output directory")
        if prev.exists():
            shutil.rmtree(prev)
        out.rename(prev)
        try:
            tmp.rename(out)
        except BaseException:
            prev.rename(out)  # the previous bundle goes back; a crash right here is undone next time
            raise
        shutil.rmtree(prev)
    else:
        tmp.rename(out)


def export_logit_lens(out: str | Path, model: nn.Module, tokenizer: Any = None, **kwargs: Any) -> dict[str, Any]:
    """A bundle with the logit lens on every state (no training)."""
    parts = find_parts(model)
    tr = Translators.identity(tuple(range(parts.n_states)), parts.hidden_size)
    return write_bundle(out, model, tr, (), tokenizer=tokenizer, parts=parts, **kwargs)
