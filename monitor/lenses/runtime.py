"""The lens bank at run time: a verified bundle in an ONNX Runtime session.

This module imports numpy, onnx and onnxruntime only (no torch): it is what the sidecar loads.

``LensBank.load(path, expected_fingerprint=..., providers="auto")`` verifies the bundle
(:func:`monitor.lenses.bundle.verify_bundle`), then opens one session. The CUDA execution provider
is chosen only when the created session really runs it: ``onnxruntime-gpu`` lists CUDA as
*available* even on a machine without a GPU and then silently runs on the CPU, so the provider is
read back from ``InferenceSession.get_providers()`` and exposed as :attr:`LensBank.provider`.

The graph takes a ``layer_index`` input so one file serves any subset of its layers; the loader
bakes the chosen subset in as a constant, so ONNX Runtime folds the gather of translator and
probe weights away once at load time instead of on every call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monitor.errors import BundleError, ConfigError
from monitor.lenses.bundle import MEAN_PROBE_SUFFIX, Bundle, verify_bundle
from monitor.lenses.readings import CONTEXT_SUFFIX, BankOutput, SampleReadings, split_batch
from monitor.lenses.trust import ProbeBar, probe_bars

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEFAULT_MAX_BATCH = 16
DISABLED_OPTIMIZERS = ["GatherSliceToSplitFusion"]


def _provider_list(providers: str | Sequence[str]) -> tuple[list[str], bool]:
    """Translate ``"auto"|"cpu"|"cuda"`` or an explicit list; second value: CUDA demanded."""
    import onnxruntime as ort

    if isinstance(providers, str):
        key = providers.lower()
        if key == "cpu":
            return [CPU], False
        if key == "cuda":
            return [CUDA, CPU], True
        if key != "auto":
            raise ConfigError(f"providers: {providers!r} is not one of 'auto', 'cpu', 'cuda' or a list")
        return ([CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]), False
    plist = list(providers)
    return plist, bool(plist) and plist[0] == CUDA


def specialise(model: Any, layer_index: np.ndarray) -> Any:
    """Bake the watched layers into ``model`` (an ``onnx.ModelProto``, changed in place).

    The ``layer_index`` input becomes a constant (ONNX Runtime folds the probe-weight gathers
    once), and the translator block (one batched [L, B, d] x [L, d, d] product, whose weights
    would be re-packed on every call) is replaced by one 2-D product per watched layer with a
    constant weight, which ONNX Runtime pre-packs at load; identity translators (state N) are
    skipped."""
    from onnx import helper, numpy_helper

    keep = [i for i in model.graph.input if i.name != "layer_index"]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    inits = {t.name: t for t in model.graph.initializer}
    if "translator_matrix" in inits:
        mats = numpy_helper.to_array(inits["translator_matrix"])[layer_index]
        bias = numpy_helper.to_array(inits["translator_bias"])[layer_index]
        old = [n for n in model.graph.node if any(o.startswith("tr_") or o == "translated" for o in n.output)]
        for n in old:
            model.graph.node.remove(n)
        for name in ("translator_matrix", "translator_bias"):
            model.graph.initializer.remove(inits[name])
        d = mats.shape[1]
        eye = np.eye(d, dtype=mats.dtype)
        new = [helper.make_node("Split", ["hidden", "tr_split"], [f"tr_h{i}" for i in range(len(layer_index))],
                                axis=1, name="tr_split_node")]
        model.graph.initializer.append(numpy_helper.from_array(np.ones(len(layer_index), np.int64), "tr_split"))
        outs = []
        for i in range(len(layer_index)):
            if np.array_equal(mats[i], eye) and not bias[i].any():
                outs.append(f"tr_h{i}")  # identity (the final state): no work, exact
                continue
            model.graph.initializer.extend([numpy_helper.from_array(mats[i], f"tr_w{i}"),
                                            numpy_helper.from_array(bias[i], f"tr_b{i}")])
            new += [helper.make_node("MatMul", [f"tr_h{i}", f"tr_w{i}"], [f"tr_mm{i}"], name=f"tr_mm_node{i}"),
                    helper.make_node("Add", [f"tr_mm{i}", f"tr_b{i}"], [f"tr_o{i}"], name=f"tr_add_node{i}")]
            outs.append(f"tr_o{i}")
        new.append(helper.make_node("Concat", outs, ["translated"], axis=1, name="tr_concat_node"))
        for j, n in enumerate(new):
            model.graph.node.insert(j, n)
    if any("layer_index" in node.input for node in model.graph.node):
        model.graph.initializer.append(numpy_helper.from_array(layer_index.astype(np.int64), "layer_index"))
    return model


def _release_freed_memory() -> None:
    """Hand the memory of the Python-side graph copies (the parsed and the serialised model,
    ~2x the weights) back to the operating system: glibc keeps freed large heaps otherwise, and
    the sidecar's resident set would carry them for its whole life."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def quantise_unembedding(model: Any) -> Any:
    """Dynamically quantise the logits product (``MatMul`` named ``logits``) to int8 weights."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    node = next((n.name for n in model.graph.node if "logits" in n.output), None)
    if node is None:
        raise BundleError("int8: the graph has no 'logits' product to quantise")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save_model(model, src)
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], nodes_to_quantize=[node],
                         per_channel=True, weight_type=QuantType.QInt8)
        return onnx.load(dst)


class LensBank:
    """Lens readings of hidden states, computed by ONNX Runtime from a verified bundle."""

    def __init__(
        self,
        bundle: Bundle,
        session: Any,
        layers: tuple[int, ...],
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        lens = bundle.manifest["lens"]
        self.bundle = bundle
        self.session = session
        self.layers = layers
        self.bundle_id = bundle.bundle_id
        self.fingerprint = bundle.fingerprint
        self.hidden_size = int(bundle.manifest["model"]["hidden_size"])
        self.vocab_size = int(bundle.manifest["model"]["vocab_size"])
        self.kind = str(lens["kind"])
        self.k = int(lens["k"])
        self.probe_labels: dict[str, tuple[str, ...]] = {
            p["name"]: tuple(p["labels"]) for p in bundle.manifest.get("probes", [])
        }
        # when each probe reading may be printed (the manifest's quality bar; monitor.lenses.trust)
        self.probe_bars: dict[str, ProbeBar] = probe_bars(bundle.manifest)
        self.provider: str = session.get_providers()[0]
        self.max_batch = max_batch
        self.precision = "fp32"
        self.workers = 1  # concurrent single-threaded runs per batch (see ``load(threads=...)``)
        self._pool: Any = None
        self._outputs = [o.name for o in session.get_outputs()]
        self._context: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # probe -> (W [L, d, C], b [L, C])

    @property
    def context_probe_labels(self) -> dict[str, tuple[str, ...]]:
        """Labels of the context readings (:meth:`read_context`): ``<probe>@mean`` per probe."""
        return {f"{name}{CONTEXT_SUFFIX}": lab for name, lab in self.probe_labels.items() if name in self._context}

    def read_context(self, hidden: np.ndarray) -> dict[str, np.ndarray]:
        """The concept probes on prompt-mean states [B, L, d]: ``{"<probe>@mean": [B, L, C]}``.

        The lens readings say what a layer predicts at the last token; the probes on the mean say
        what the whole prompt is about (language, topic), which is what a shift in traffic moves
        first. A linear probe is one [d, C] product per layer, so this costs ~1% of a bank pass
        and runs in numpy (the weights are the bundle's own, read from its verified graph)."""
        h = np.asarray(hidden, dtype=np.float32)
        want = (len(self.layers), self.hidden_size)
        if h.ndim != 3 or tuple(h.shape[1:]) != want:
            raise ValueError(f"context hidden must be [B, {want[0]}, {want[1]}], got {list(h.shape)}")
        out = {}
        for name, (w, b) in self._context.items():
            z = np.einsum("bld,ldc->blc", h, w, optimize=True) + b
            z -= z.max(axis=-1, keepdims=True)
            np.exp(z, out=z)
            z /= z.sum(axis=-1, keepdims=True)
            out[f"{name}{CONTEXT_SUFFIX}"] = z
        return out

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        expected_fingerprint: str | None = None,
        providers: str | Sequence[str] = "auto",
        threads: int | None = None,
        layers: Sequence[int] | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        precision: str = "fp32",
    ) -> LensBank:
        """Verify the bundle at ``path`` and open it.

        ``expected_fingerprint``: the served model's :func:`~monitor.adapters.model_fingerprint`;
        a bundle for another model is refused. ``providers``: ``"auto"`` (CUDA when it really
        runs, else CPU), ``"cpu"``, ``"cuda"`` (refused when CUDA does not come up) or an explicit
        ONNX Runtime provider list. ``threads``: intra-op threads (default: ONNX Runtime's).
        ``layers``: read only this subset of the bundle's layers (must end with state N: the
        cheaper mode of the throughput benchmark). ``max_batch``: larger batches are split, which
        bounds memory at about ``max_batch * layers * vocab * 4`` bytes per intermediate.
        ``precision``: ``"fp32"`` (exact, the default) or ``"int8"`` (the unembedding product
        dynamically quantised to int8 at load time: faster on CPUs with VNNI/AMX, at the
        fidelity cost the throughput benchmark reports).
        """
        import onnx
        import onnxruntime as ort

        bundle = verify_bundle(path, expected_fingerprint)
        all_layers = bundle.layers
        chosen = tuple(all_layers) if layers is None else tuple(int(x) for x in layers)
        unknown = [x for x in chosen if x not in all_layers]
        if unknown or not chosen or chosen[-1] != all_layers[-1] or list(chosen) != sorted(set(chosen)):
            raise ConfigError(
                f"layers: {list(chosen)} must be a sorted subset of the bundle's layers {list(all_layers)} "
                f"ending with the final state {all_layers[-1]}"
            )
        graph_path = bundle.path(bundle.manifest["graph"]["file"])
        try:
            model = onnx.load(str(graph_path), load_external_data=True)
        except Exception as exc:  # onnx raises DecodeError and friends
            raise BundleError(f"lens bundle {path}: cannot read {graph_path.name}: {exc}") from exc
        index = np.array([all_layers.index(x) for x in chosen], dtype=np.int64)
        context = _probe_weights(model, bundle.manifest, index)
        specialise(model, index)
        if precision == "int8":
            model = quantise_unembedding(model)
        elif precision != "fp32":
            raise ConfigError(f"precision: {precision!r} is not 'fp32' or 'int8'")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = 1 if int(threads) > 1 else int(threads)
            opts.inter_op_num_threads = 1
        plist, cuda_demanded = _provider_list(providers)
        try:
            # GatherSliceToSplitFusion would turn the per-chunk slices of the logits into one Split,
            # materialising every chunk before any is used: the cache locality the graph is built
            # for would be lost.
            session = ort.InferenceSession(model.SerializeToString(), opts, providers=plist,
                                           disabled_optimizers=DISABLED_OPTIMIZERS)
        except Exception as exc:  # onnxruntime's own exception types are not public
            raise BundleError(f"lens bundle {path}: ONNX Runtime cannot open {graph_path.name}: {exc}") from exc
        del model
        _release_freed_memory()
        if cuda_demanded and session.get_providers()[0] != CUDA:
            raise ConfigError(
                "providers: CUDA was requested but the session runs on "
                f"{session.get_providers()[0]} (no GPU, or onnxruntime-gpu missing / mismatched CUDA); "
                "use providers='auto' to fall back to the CPU"
            )
        bank = cls(bundle, session, chosen, max_batch=max_batch)
        bank.precision = precision
        bank._context = context
        if threads and int(threads) > 1 and bank.provider == CPU:
            bank.workers = int(threads)
        return bank

    # ------------------------------------------------------------------ reading
    @property
    def manifest(self) -> dict[str, Any]:
        """The bundle's manifest (read-only by convention)."""
        return self.bundle.manifest

    def _run(self, hidden: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self._outputs, {"hidden": hidden})
        return dict(zip(self._outputs, outs, strict=True))

    def read_arrays(self, hidden: np.ndarray) -> BankOutput:
        """Readings of ``hidden`` [B, L, d] (float16 or float32), L = ``len(self.layers)`` in
        the order of :attr:`layers` (the last one is state N)."""
        h = np.asarray(hidden)
        want = (len(self.layers), self.hidden_size)
        if h.ndim != 3 or tuple(h.shape[1:]) != want:
            raise ValueError(f"hidden must be [B, {want[0]}, {want[1]}] (layers {list(self.layers)}), got {list(h.shape)}")
        h = np.ascontiguousarray(h, dtype=np.float32)
        n = h.shape[0]
        if n == 0:
            return self._empty()
        step = min(self.max_batch, -(-n // self.workers))  # one part per worker, at most max_batch each
        pieces = [h[i : i + step] for i in range(0, n, step)]
        if len(pieces) > 1 and self.workers > 1:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="lens-bank")
            parts = list(self._pool.map(self._run, pieces))
        else:
            parts = [self._run(p) for p in pieces]
        cat = {name: np.concatenate([p[name] for p in parts]) if len(parts) > 1 else parts[0][name]
               for name in self._outputs}
        return self._to_output(cat)

    def warm_up(self, sizes: Sequence[int] | None = None) -> float:
        """Read zero states at every batch size up to ``max_batch`` (or at ``sizes``); returns the
        seconds it took. Default: the largest batch, then every size twice in two seeded random
        orders.

        ONNX Runtime's arena grows as it meets new tensor shapes: a sidecar whose micro-batches
        vary in size (any load below saturation) would otherwise keep growing its resident set
        for its first minute of mixed traffic. Meeting every size at start-up puts memory at its
        steady size before the first real sample (measured: +1% over 150 mixed batches after
        this warm-up, +22% without) and keeps first-request latency out of the served path."""
        import time

        t0 = time.perf_counter()
        d = (len(self.layers), self.hidden_size)
        if sizes is None:
            rng = np.random.default_rng(0)
            every = np.arange(1, self.max_batch + 1)
            todo = [self.max_batch, *rng.permutation(every).tolist(), *rng.permutation(every).tolist()]
        else:
            todo = list(sizes)
        for n in todo:
            self.read_arrays(np.zeros((int(n), *d), np.float32))
        return time.perf_counter() - t0

    def read(self, hidden: np.ndarray) -> list[SampleReadings]:
        """Per-sample typed readings of ``hidden`` [B, L, d]."""
        return split_batch(self.read_arrays(hidden), self.probe_labels)

    def _to_output(self, o: dict[str, np.ndarray]) -> BankOutput:
        probes = {name: o[f"probe_{name}"] for name in self.probe_labels}
        return BankOutput(
            layers=self.layers,
            topk_ids=o["topk_ids"],
            topk_probs=o["topk_probs"],
            entropy=o["entropy"],
            kl_to_final=o["kl_to_final"],
            final_top1_rank=o["final_top1_rank"],
            final_topk_ids=o["final_topk_ids"],
            final_topk_probs=o["final_topk_probs"],
            final_entropy=o["final_entropy"],
            probes=probes,
        )

    def _empty(self) -> BankOutput:
        L, k = len(self.layers), self.k
        return BankOutput(
            layers=self.layers,
            topk_ids=np.zeros((0, L, k), np.int64),
            topk_probs=np.zeros((0, L, k), np.float32),
            entropy=np.zeros((0, L), np.float32),
            kl_to_final=np.zeros((0, L), np.float32),
            final_top1_rank=np.zeros((0, L), np.int64),
            final_topk_ids=np.zeros((0, k), np.int64),
            final_topk_probs=np.zeros((0, k), np.float32),
            final_entropy=np.zeros((0,), np.float32),
            probes={name: np.zeros((0, L, len(lab)), np.float32) for name, lab in self.probe_labels.items()},
        )

    def __repr__(self) -> str:
        return (f"LensBank({self.bundle_id}, kind={self.kind}, layers={len(self.layers)}, "
                f"probes={list(self.probe_labels)}, provider={self.provider})")


def _probe_weights(model: Any, manifest: dict[str, Any], index: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each prompt-mean probe's weights [L, d, C] and biases [L, C] at the chosen layers, from the
    graph (temperature folded in), taken out of ``model``."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for p in manifest.get("probes", []):
        # the probe trained on prompt-mean states; a bundle built before them has only the last-token one
        mean = [inits.pop(f"probe_{p['name']}{MEAN_PROBE_SUFFIX}_{part}", None) for part in ("weight", "bias")]
        w, b = mean if None not in mean else (inits.get(f"probe_{p['name']}_weight"), inits.get(f"probe_{p['name']}_bias"))
        for t in mean:
            if t is not None:
                model.graph.initializer.remove(t)  # no node reads them: keep them out of the session
        if w is None or b is None:
            continue
        out[str(p["name"])] = (np.ascontiguousarray(numpy_helper.to_array(w)[index], dtype=np.float32),
                               np.ascontiguousarray(numpy_helper.to_array(b)[index], dtype=np.float32))
    return out


def load_bank(path: str | os.PathLike[str] | Path, **kwargs: Any) -> LensBank:
    """Shorthand for :meth:`LensBank.load`."""
    return LensBank.load(path, **kwargs)
