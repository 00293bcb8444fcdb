"""``layerwatch lens ...``: fit, export, measure, verify and read lens bundles."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from monitor.refmodel import load_model


def register(sub: Any) -> None:
    """Add the ``lens`` command and its subcommands."""
    p = sub.add_parser("lens", help="train, export, measure and inspect lens bundles",
                       description="Lens bundles: tuned lens + concept probes exported to ONNX.")
    lsub = p.add_subparsers(dest="lens_command", metavar="SUBCOMMAND")

    fit = lsub.add_parser("fit", help="train the tuned lens and probes, measure them, export a bundle")
    fit.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    fit.add_argument("--model", default="smollm2", help="'smollm2' (the reference model) or a local HF model directory")
    fit.add_argument("--budget", choices=("demo", "full"), default="full",
                     help="training budget: full (~25 min tuned lens, default) or demo (~4 min)")
    fit.add_argument("--seconds", type=float, default=None, help="override the tuned-lens time budget (seconds)")
    fit.add_argument("--work", type=Path, default=None,
                     help="work directory for caches and checkpoints (default: OUT.work); rerun to resume")
    fit.add_argument("--probe", action="append", default=[], metavar="NAME=TRAIN.jsonl:HELDOUT.jsonl",
                     help="an extra probe set from labelled JSONL files ({'text':..., 'label':...} per line)")
    fit.add_argument("--no-builtin-probes", action="store_true", help="skip the shipped language and topic probes")
    fit.add_argument("--k", type=int, default=5, help="top-k tokens per layer in the readings (default 5)")
    fit.add_argument("--heldout-tokens", type=int, default=None, help="held-out positions for the quality report")
    fit.add_argument("--no-progress", action="store_true", help="no progress bars")
    fit.set_defaults(handler=_fit)

    exp = lsub.add_parser("export-logit", help="export a logit-lens bundle (no training)")
    exp.add_argument("--out", required=True, type=Path)
    exp.add_argument("--model", default="smollm2")
    exp.add_argument("--k", type=int, default=5)
    exp.set_defaults(handler=_export_logit)

    rx = lsub.add_parser("reexport", help="re-export a bundle's trained lenses with this version's ONNX graph")
    rx.add_argument("bundle", type=Path)
    rx.add_argument("--out", required=True, type=Path)
    rx.add_argument("--model", default="smollm2")
    rx.add_argument("--k", type=int, default=None, help="top-k (default: the bundle's)")
    rx.set_defaults(handler=_reexport)

    q = lsub.add_parser("quality", help="held-out quality per layer (KL, top-1 agreement, cross-entropy)")
    q.add_argument("bundle", type=Path)
    q.add_argument("--model", default="smollm2")
    q.add_argument("--tokens", type=int, default=4096, help="held-out token positions (default 4096)")
    q.add_argument("--json", type=Path, default=None, help="also write the report to this file")
    q.add_argument("--no-manifest", action="store_true", help="do not store the report in the bundle manifest")
    q.add_argument("--work", type=Path, default=None, help="where to cache held-out states (default: a temp dir)")
    q.set_defaults(handler=_quality)

    v = lsub.add_parser("verify", help="check a bundle's checksums, paths and (with --model) fingerprint")
    v.add_argument("bundle", type=Path)
    v.add_argument("--model", default=None, help="also check the fingerprint against this model")
    v.add_argument("--fingerprint", default=None, help="expected model fingerprint (sha256:...)")
    v.set_defaults(handler=_verify)

    s = lsub.add_parser("show", help="print a bundle's manifest summary and quality table")
    s.add_argument("bundle", type=Path)
    s.set_defaults(handler=_show)

    r = lsub.add_parser("read", help="run a prompt through the model and print each layer's lens reading")
    r.add_argument("bundle", type=Path)
    r.add_argument("text", help="the prompt; the last token's states are read")
    r.add_argument("--model", default="smollm2")
    r.add_argument("--threads", type=int, default=None)
    r.set_defaults(handler=_read)

    ref = lsub.add_parser("reference", help="get or build the cached bundle of the reference model")
    ref.add_argument("--budget", choices=("demo", "full"), default="demo")
    ref.add_argument("--cache-dir", type=Path, default=None)
    ref.set_defaults(handler=_reference)

    p.set_defaults(handler=lambda _a: (p.print_help(), 2)[1])


def _parse_probe(spec: str) -> tuple[str, tuple[str, str]]:
    from monitor.errors import ConfigError

    name, sep, rest = spec.partition("=")
    train, sep2, held = rest.partition(":")
    if not sep or not sep2 or not name or not train or not held:
        raise ConfigError(f"--probe {spec!r}: expected NAME=TRAIN.jsonl:HELDOUT.jsonl")
    return name, (train, held)


def _fit(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from monitor.lenses.build import fit_bundle
    from monitor.lenses.tuned import PLANS

    probes = dict(_parse_probe(s) for s in args.probe)
    plan = PLANS[args.budget]
    if args.seconds is not None:
        plan = replace(plan, budget_s=float(args.seconds))
    model, tok, name = load_model(args.model)
    fit_bundle(args.out, model, tok, budget=plan if args.seconds is not None else args.budget, work=args.work,
               builtin_probes=() if args.no_builtin_probes else ("language", "topic"), probe_files=probes,
               k=args.k, model_name=name, heldout_tokens=args.heldout_tokens, progress=not args.no_progress)
    return 0


def _export_logit(args: argparse.Namespace) -> int:
    from monitor.lenses.writer import export_logit_lens

    model, tok, name = load_model(args.model)
    man = export_logit_lens(args.out, model, tok, model_name=name, k=args.k)
    print(f"logit-lens bundle {man['bundle_id']} written to {args.out}")
    return 0


def _reexport(args: argparse.Namespace) -> int:
    from monitor.adapters import model_fingerprint
    from monitor.lenses.bundle import verify_bundle
    from monitor.lenses.writer import load_weights, write_bundle

    model, tok, name = load_model(args.model)
    b = verify_bundle(args.bundle, model_fingerprint(model))
    tr, probes = load_weights(b.root, b.manifest)
    m = b.manifest
    man = write_bundle(args.out, model, tr, probes, tokenizer=tok, model_name=m["model"].get("name", name),
                       k=args.k or int(m["lens"]["k"]), quality=m.get("quality"), training=m.get("training"))
    print(f"bundle {b.bundle_id} re-exported as {man['bundle_id']} to {args.out}")
    return 0


def _quality(args: argparse.Namespace) -> int:
    import tempfile

    from monitor.adapters import find_parts, model_fingerprint
    from monitor.lenses.build import HELDOUT_SOURCE, _texts
    from monitor.lenses.bundle import update_manifest, verify_bundle
    from monitor.lenses.cache import StateCache, fill_cache
    from monitor.lenses.model import Translators
    from monitor.lenses.quality import evaluate_lenses, format_quality_table, write_report
    from monitor.lenses.readout import readout_spec
    from monitor.lenses.writer import load_weights

    model, tok, _ = load_model(args.model)
    parts = find_parts(model)
    bundle = verify_bundle(args.bundle, model_fingerprint(model, parts))
    tr, _ = load_weights(bundle.root, bundle.manifest)
    if tr.layers != tuple(range(parts.n_states)):
        from monitor.errors import ConfigError

        raise ConfigError("quality: the bundle must cover every state 0..N")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        held = StateCache.open(work / "heldout-states", args.tokens, parts.n_states, parts.hidden_size, HELDOUT_SOURCE)
        fill_cache(held, model, parts, tok, _texts("heldout"))
        states, tokens = held.view()
        lenses = {"logit": Translators.identity(tr.layers, parts.hidden_size)}
        if tr.kind == "tuned":
            lenses["tuned"] = tr
        report = evaluate_lenses(readout_spec(parts), lenses, states, tokens)
    report["heldout_source"] = HELDOUT_SOURCE
    print(format_quality_table(report))
    if args.json:
        write_report(report, args.json)
    if not args.no_manifest:
        update_manifest(bundle.root, quality=report)
        print(f"quality report stored in {bundle.root / 'manifest.json'}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from monitor.lenses.bundle import verify_bundle

    expected = args.fingerprint
    if args.model is not None:
        from monitor.adapters import model_fingerprint

        model, _, _ = load_model(args.model)
        expected = model_fingerprint(model)
    b = verify_bundle(args.bundle, expected)
    print(f"bundle {b.bundle_id} OK: {len(b.manifest['files'])} files verified"
          + (f", fingerprint matches {expected}" if expected else ""))
    return 0


def _show(args: argparse.Namespace) -> int:
    from monitor.lenses.bundle import read_manifest
    from monitor.lenses.quality import format_quality_table
    from monitor.lenses.trust import probe_bars

    m = read_manifest(args.bundle)
    print(json.dumps({k: m[k] for k in ("bundle_id", "created_at", "model", "tokenizer", "lens") if k in m}, indent=1))
    bars = probe_bars(m)
    for p in m.get("probes", []):
        bar = bars[p["name"]]
        print(f"probe {p['name']}: labels {p['labels']}; best held-out accuracy "
              f"{max(p.get('heldout_accuracy', [0])):.3f}, bag-of-tokens {p.get('bag_of_tokens_accuracy')}; "
              f"{bar.role}, printed at layers {sorted(bar.reliable_layers) or 'none'} (last token; prompt mean: "
              f"{sorted(bars[p['name'] + '@mean'].reliable_layers) or 'none'}), abstains below {bar.min_confidence}"
              + ("" if bar.source == "bundle" else f" [bar {bar.source}]"))
    if m.get("quality", {}).get("layers"):
        print(format_quality_table(m["quality"]))
    return 0


def _read(args: argparse.Namespace) -> int:
    from monitor.adapters import collect_states, find_parts, model_fingerprint
    from monitor.lenses.runtime import LensBank

    model, tok, _ = load_model(args.model)
    parts = find_parts(model)
    bank = LensBank.load(args.bundle, expected_fingerprint=model_fingerprint(model, parts), threads=args.threads)
    ids = tok(args.text, return_tensors="pt").input_ids
    states = collect_states(model, parts, ids)[:, 0, -1]  # [S, d]
    reading = bank.read(states[list(bank.layers)].numpy()[None])[0]
    print(f"{args.text!r} -> model: {tok.decode([reading.final_top1])!r} ({reading.final_topk_probs[0]:.2f}); "
          f"lens bank {bank.bundle_id} on {bank.provider}")
    for layer in reading.layers:
        probes = " ".join(_probe_text(bank, n, layer.layer, v) for n, v in layer.probes.items())
        print(f"L{layer.layer:>2}: {tok.decode([layer.top1])!r:>14} {layer.confidence:.2f}  "
              f"KL {layer.kl_to_final:6.2f}  rank {layer.final_top1_rank:>5}  {probes}")
    return 0


def _probe_text(bank: Any, name: str, layer: int, probs: tuple[float, ...]) -> str:
    """'name=label(p)' where the probe passes the bundle's quality bar, 'name=none(p)' where it
    abstains, 'name=-' where it has no reliable reading."""
    bar = bank.probe_bars.get(name)
    if bar is None or not bar.reliable(layer):
        return f"{name}=-"
    best = max(range(len(probs)), key=probs.__getitem__)
    label = "none" if probs[best] < bar.min_confidence else bank.probe_labels[name][best]
    return f"{name}={label}({probs[best]:.2f})"


def _reference(args: argparse.Namespace) -> int:
    from monitor.lenses.build import ensure_reference_bundle

    path = ensure_reference_bundle(args.cache_dir, args.budget, progress=sys.stderr.isatty())
    print(path)
    return 0
