"""Lens-bank throughput on CPU against the roofline: ``python -m benchmarks.lens_throughput``.

For the real SmolLM2 bundle (the cached reference bundle, or ``--bundle``), on real hidden states
of held-out English prose:

- samples/s of the full ONNX bank (all 31 states, tuned lens, probes), single thread and all
  threads, at batch sizes 8 and 16;
- the roofline measured in the same run: one ``[B*L, d] x [d, V]`` float32 matrix product (the
  faster of torch and ONNX Runtime), i.e. the unavoidable work of any exact bank;
- a plain PyTorch implementation of the same bank (:class:`monitor.lenses.model.TorchLensBank`);
- cheaper modes, with their speed-up and fidelity cost against the full bank (KL from the full
  bank's lens distribution to the cheap one, top-1 agreement, on the kept layers): a layer subset
  (every third state + the last) and an int8 unembedding.

Prints a table and writes ``bench-results/lens_throughput.json``. Timings are medians of
``--repeats`` runs; the machine's load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _median_time(fn: Any, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _ort_matmul_session(w_t: np.ndarray, threads: int) -> Any:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    d, v = w_t.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "roofline",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", v])],
        initializer=[numpy_helper.from_array(w_t, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _debug_log_probs(readout: Any, tr: Any, probes: Any, layers: tuple[int, ...], k: int, threads: int,
                     precision: str) -> Any:
    """A session of the bank's graph that also returns full log-probs (fidelity measurement)."""
    import onnxruntime as ort

    from monitor.lenses.export import build_bank_graph
    from monitor.lenses.runtime import DISABLED_OPTIMIZERS, quantise_unembedding, specialise

    model = specialise(build_bank_graph(readout, tr, probes, k, debug=True),
                       np.array([tr.layers.index(x) for x in layers], dtype=np.int64))
    if precision == "int8":
        model = quantise_unembedding(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=DISABLED_OPTIMIZERS)


def real_states(n: int) -> np.ndarray:
    """[n, 31, d] float16 hidden states of held-out prose (last positions of short texts)."""
    from monitor import corpora
    from monitor.adapters import find_parts
    from monitor.lenses.probes import last_token_states
    from monitor.refmodel import load_reference_model

    model, tok = load_reference_model()
    texts = corpora.english_prose("heldout", unit="short")[:n]
    states, _ = last_token_states(model, find_parts(model), tok, texts, max_tokens=48)
    return states.astype(np.float16)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="bundle to measure (default: the cached reference bundle)")
    ap.add_argument("--budget", default="demo", help="budget of the reference bundle to build/use if --bundle is absent")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("bench-results/lens_throughput.json"))
    args = ap.parse_args(argv)

    import torch

    from monitor.lenses.build import ensure_reference_bundle
    from monitor.lenses.bundle import verify_bundle
    from monitor.lenses.model import TorchLensBank
    from monitor.lenses.readout import ReadoutSpec
    from monitor.lenses.runtime import LensBank
    from monitor.lenses.writer import load_weights

    bundle_dir = args.bundle or ensure_reference_bundle(budget=args.budget, progress=False)
    b = verify_bundle(bundle_dir)
    tr, probes = load_weights(b.root, b.manifest)
    # the read-out arrays, rebuilt from the graph's own weights (no model needed to time the bank)
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(b.path(b.manifest["graph"]["file"])))
    inits = {i.name: i for i in g.graph.initializer}
    vocab = int(b.manifest["model"]["vocab_size"])
    w_t = np.ascontiguousarray(numpy_helper.to_array(inits["unembed_t"])[:, :vocab])  # the graph pads V
    bias = numpy_helper.to_array(inits["unembed_bias"])[:vocab] if "unembed_bias" in inits else None
    if bias is not None and not bias.any():  # only padding: the model has no bias
        bias = None
    ro = b.manifest["lens"]["readout"]
    readout = ReadoutSpec(ro["norm"], float(ro["eps"]), torch.from_numpy(np.ascontiguousarray(w_t.T)),
                          torch.from_numpy(bias) if bias is not None else None)
    del g, inits
    n_cores = os.cpu_count() or 1
    max_b = max(args.batches)
    states = real_states(max(64, max_b * 4))
    layers = b.layers
    subset = tuple(sorted({*layers[::3], layers[-1]}))
    rows: list[dict[str, Any]] = []
    load1 = os.getloadavg()[0]
    for threads in sorted({1, n_cores}):
        torch.set_num_threads(threads)
        bank = LensBank.load(bundle_dir, threads=threads, max_batch=max_b)
        sub = LensBank.load(bundle_dir, threads=threads, max_batch=max_b, layers=subset)
        q8 = LensBank.load(bundle_dir, threads=threads, max_batch=max_b, precision="int8")
        plain = TorchLensBank(readout, tr, probes, k=bank.k)
        ort_mm = _ort_matmul_session(np.ascontiguousarray(w_t), threads)
        w_torch = torch.from_numpy(np.ascontiguousarray(w_t))
        for bsz in args.batches:
            h = states[:bsz]
            h32 = h.astype(np.float32)
            x = np.ascontiguousarray(h32.reshape(-1, h32.shape[-1]))
            xt = torch.from_numpy(x)
            t_bank = _median_time(lambda: bank.read_arrays(h), args.repeats)  # noqa: B023
            t_ort = _median_time(lambda: ort_mm.run(None, {"x": x}), args.repeats)  # noqa: B023
            t_tmm = _median_time(lambda: xt @ w_torch, args.repeats)  # noqa: B023
            t_plain = _median_time(lambda: plain.read_arrays(h32), max(2, args.repeats // 3))  # noqa: B023
            t_sub = _median_time(lambda: sub.read_arrays(h[:, [layers.index(x) for x in subset]]), args.repeats)  # noqa: B023
            t_q8 = _median_time(lambda: q8.read_arrays(h), args.repeats)  # noqa: B023
            roof = min(t_ort, t_tmm)
            rows.append({
                "threads": threads, "batch": bsz, "layers": len(layers),
                "bank_samples_per_s": bsz / t_bank, "roofline_samples_per_s": bsz / roof,
                "roofline_backend": "onnxruntime" if t_ort <= t_tmm else "torch",
                "torch_matmul_samples_per_s": bsz / t_tmm, "ort_matmul_samples_per_s": bsz / t_ort,
                "fraction_of_roofline": roof / t_bank,
                "plain_torch_samples_per_s": bsz / t_plain,
                "layer_subset_samples_per_s": bsz / t_sub, "int8_samples_per_s": bsz / t_q8,
            })
    load2 = os.getloadavg()[0]

    # fidelity of the cheaper modes against the full bank, on all captured samples
    full_lp = _debug_log_probs(readout, tr, probes, layers, bank.k, n_cores, "fp32")
    q8_lp = _debug_log_probs(readout, tr, probes, layers, bank.k, n_cores, "int8")
    h = states.astype(np.float32)
    kls, agree = [], []
    for i in range(0, len(h), 8):
        a = full_lp.run(["log_probs"], {"hidden": h[i : i + 8]})[0]
        c = q8_lp.run(["log_probs"], {"hidden": h[i : i + 8]})[0]
        kls.append((np.exp(a) * (a - c)).sum(-1))
        agree.append(a.argmax(-1) == c.argmax(-1))
    kl_q8 = np.concatenate(kls)
    ag_q8 = np.concatenate(agree)
    fidelity = {
        "int8": {"mean_kl_full_to_int8_nats": float(kl_q8.mean()), "max_kl_nats": float(kl_q8.max()),
                 "top1_agreement": float(ag_q8.mean()), "samples": len(h)},
        "layer_subset": {"layers": list(subset), "kept_layers_identical": True,
                         "dropped_layers": [x for x in layers if x not in subset],
                         "note": "kept layers read exactly as in the full bank; the cost is coverage"},
    }
    # check the subset claim on the data
    full_out = LensBank.load(bundle_dir).read_arrays(states[:8])
    sub_out = LensBank.load(bundle_dir, layers=subset).read_arrays(states[:8, [layers.index(x) for x in subset]])
    idx = [layers.index(x) for x in subset]
    fidelity["layer_subset"]["kept_layers_identical"] = bool(
        np.array_equal(full_out.topk_ids[:, idx], sub_out.topk_ids)
        and np.allclose(full_out.kl_to_final[:, idx], sub_out.kl_to_final, atol=1e-5))

    print(f"lens bank {b.bundle_id} ({b.manifest['lens']['kind']}, {len(layers)} states, "
          f"{len(probes)} probes, vocab {w_t.shape[1]}); load average {load1:.1f} -> {load2:.1f} on {n_cores} cores")
    head = (f"{'thr':>3} {'B':>3} {'bank':>7} {'roofline':>8} {'frac':>5} {'torch':>7} {'subset':>7} "
            f"{'int8':>7}   (samples/s)")
    print(head)
    for r in rows:
        print(f"{r['threads']:>3} {r['batch']:>3} {r['bank_samples_per_s']:>7.1f} {r['roofline_samples_per_s']:>8.1f} "
              f"{r['fraction_of_roofline']:>5.2f} {r['plain_torch_samples_per_s']:>7.1f} "
              f"{r['layer_subset_samples_per_s']:>7.1f} {r['int8_samples_per_s']:>7.1f}")
    print(f"layer subset {list(subset)}: kept layers identical to the full bank: "
          f"{fidelity['layer_subset']['kept_layers_identical']}")
    print(f"int8 unembedding: KL(full || int8) mean {fidelity['int8']['mean_kl_full_to_int8_nats']:.4f} nats "
          f"(max {fidelity['int8']['max_kl_nats']:.4f}), top-1 agreement {fidelity['int8']['top1_agreement']:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "bundle_id": b.bundle_id, "bundle": str(bundle_dir), "cores": n_cores, "load_average": [load1, load2],
        "repeats": args.repeats, "rows": rows, "fidelity": fidelity,
        "command": "python -m benchmarks.lens_throughput",
    }, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
