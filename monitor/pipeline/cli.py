"""``layerwatch baseline build|show|list|promote|rollback`` and ``layerwatch score`` (backtests).

Texts run through the tap, the wire format and the lens bank exactly as in the sidecar (see
:mod:`monitor.pipeline.offline`). Heavy imports (torch, transformers) happen inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from monitor.drift.baseline import baseline_positions
from monitor.pipeline.offline import POSITIONS


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis", metavar="URL", default=None,
                   help="Redis holding the shared baselines (e.g. redis://127.0.0.1:6379/0)")
    p.add_argument("--dir", metavar="DIR", default=None, help="directory of baseline JSON files")
    p.add_argument("--model-name", default="SmolLM2-135M-Instruct",
                   help="model name the baselines are filed under (default: %(default)s)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", required=True, metavar="FILE.jsonl", help='one {"text": ...} per line')
    p.add_argument("--model", default="smollm2", help="'smollm2' (reference) or a local HF model directory")
    p.add_argument("--bundle", default=None, help="lens bundle directory (default: the logit lens)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128, help="truncate prompts to this many tokens")
    p.add_argument("--positions", choices=POSITIONS, default=None,
                   help="what the tap ships per text, as the tap setting 'positions' (build default: last+mean, "
                        "the lens bank reads the last token and the probes also the prompt mean; score default: "
                        "the baseline's)")


def register(subparsers: Any) -> None:
    """Add ``baseline`` and ``score`` to the ``layerwatch`` command."""
    bl = subparsers.add_parser("baseline", help="build, inspect, promote and roll back drift baselines")
    sub = bl.add_subparsers(dest="baseline_command", metavar="ACTION")

    b = sub.add_parser("build", help="build a baseline from a JSONL corpus of normal texts")
    _model_args(b)
    _store_args(b)
    b.add_argument("--out", metavar="FILE.json", default=None, help="also write the baseline here")
    b.add_argument("--promote", action="store_true", help="make it the active baseline")
    b.add_argument("--min-samples", type=int, default=None)
    b.add_argument("--calibration-fraction", type=float, default=0.3)
    b.add_argument("--components", type=int, default=None,
                   help="factors of the detector's covariance model (0 = Ledoit-Wolf; default 16)")
    b.add_argument("--clip", type=float, default=None,
                   help="winsorise standardised features at this many SDs (0 = not; default 4)")
    b.set_defaults(handler=_build)

    s = sub.add_parser("show", help="summarise a baseline (id, file, or 'active')")
    s.add_argument("ref", nargs="?", default="active")
    _store_args(s)
    s.add_argument("--json", action="store_true", help="print the whole baseline document")
    s.set_defaults(handler=_show)

    ls = sub.add_parser("list", help="list stored baselines and the active one")
    _store_args(ls)
    ls.set_defaults(handler=_list)

    pr = sub.add_parser("promote", help="make a stored baseline the active one (running sidecars follow)")
    pr.add_argument("id")
    _store_args(pr)
    pr.set_defaults(handler=_promote)

    rb = sub.add_parser("rollback", help="re-activate the previously promoted baseline (running sidecars follow)")
    _store_args(rb)
    rb.set_defaults(handler=_rollback)
    for p in (pr, rb):  # written into the sidecars' baseline_changed audit records
        p.add_argument("--reason", default=None, help="why (recorded in the audit trails)")
        p.add_argument("--by", default=None, help="who (default: user@host)")
    bl.set_defaults(handler=lambda _a: bl.print_help() or 2)

    sc = subparsers.add_parser("score", help="score a JSONL corpus against a baseline (backtest)")
    _model_args(sc)
    _store_args(sc)
    sc.add_argument("--baseline", required=True, help="baseline id, JSON file, or 'active'")
    sc.add_argument("--json", dest="json_out", required=True, metavar="OUT", help="write per-text results here")
    sc.add_argument("--alpha", type=float, default=0.01, help="p-value threshold (false-positive rate)")
    sc.add_argument("--watch", action="append", default=[], metavar="PROBE=LABEL",
                    help="watch a concept (repeatable; e.g. topic@mean=legal), as the sidecar's baseline.watch")
    sc.add_argument("--local-score", action="store_true",
                    help="fold in the local (prompt-window) score, as the sidecar's baseline.local_score")
    sc.set_defaults(handler=_score)


def _store(args: argparse.Namespace) -> Any:
    from monitor.drift.store import BaselineStore
    from monitor.errors import BaselineError

    if not args.redis and not args.dir:
        raise BaselineError("say where baselines live: --redis URL and/or --dir DIR")
    client = None
    if args.redis:  # with the sidecar's Redis credentials and TLS files (LAYERWATCH_REDIS__*)
        from monitor.backends.redis import connect
        from monitor.config import redis_settings_from_environment
        from monitor.urls import parse_url

        parse_url(args.redis, field="--redis")
        client = connect(args.redis, settings=redis_settings_from_environment())
    return BaselineStore(args.model_name, redis=client, directory=args.dir)


def _load_ref(args: argparse.Namespace, ref: str) -> Any:
    from pathlib import Path

    from monitor.drift.baseline import Baseline
    from monitor.errors import BaselineError

    if ref.endswith(".json") and Path(ref).exists():
        return Baseline.loads(Path(ref).read_text())
    store = _store(args)
    if ref == "active":
        bl = store.active()
        if bl is None:
            raise BaselineError(f"no active baseline for model {args.model_name!r}")
        return bl
    return store.load(ref)


def _progress(done: int, total: int) -> None:
    print(f"\r  {done}/{total} texts", end="" if done < total else "\n", file=sys.stderr, flush=True)


def _readings(args: argparse.Namespace, window_layers: tuple[int, ...] | None = None
              ) -> tuple[Any, Any, str, list[str], Any]:
    """Readings and prompt windows (of ``window_layers``; default: the local score's) of the corpus."""
    from monitor.adapters import model_fingerprint
    from monitor.pipeline.offline import lens_bank_for, read_corpus, readings_and_windows
    from monitor.refmodel import load_model

    texts = read_corpus(args.corpus)
    model, tok, _name = load_model(args.model)
    bank = lens_bank_for(model, args.bundle)
    a, windows = readings_and_windows(model, tok, bank, texts, args.batch_size, max_tokens=args.max_tokens,
                                      positions=args.positions or "last+mean", window_layers=window_layers,
                                      progress=_progress)
    return a, bank, model_fingerprint(model), texts, windows


def _build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from monitor.drift.baseline import MIN_SAMPLES

    a, bank, fp, _, windows = _readings(args)
    store = _store(args) if (args.redis or args.dir) else None
    from monitor.drift.baseline import DEFAULT_CLIP, build_baseline

    bl = build_baseline(a, model=args.model_name, model_fingerprint=fp, bundle_id=bank.bundle_id,
                        source=f"corpus {Path(args.corpus).name}", min_samples=args.min_samples or MIN_SAMPLES,
                        calibration_fraction=args.calibration_fraction, components=args.components,
                        clip=DEFAULT_CLIP if args.clip is None else (args.clip or None),
                        extra={"positions": args.positions or "last+mean", "max_tokens": args.max_tokens},
                        windows=windows)
    if args.out:
        Path(args.out).write_text(bl.dumps())
    if store is not None:
        store.save(bl)
        if args.promote:
            store.promote(bl.id)
    elif args.promote:
        print("layerwatch: --promote needs --redis or --dir", file=sys.stderr)
        return 2
    print(json.dumps({"id": bl.id, "n_samples": bl.n_samples, "promoted": bool(args.promote and store),
                      "out": args.out}, indent=2))
    return 0


def _show(args: argparse.Namespace) -> int:
    bl = _load_ref(args, args.ref)
    print(json.dumps(bl.to_json() if args.json else bl.summary(), indent=2))
    return 0


def _list(args: argparse.Namespace) -> int:
    store = _store(args)
    active = store.active_id()
    for bid in store.ids():
        print(("* " if bid == active else "  ") + bid)
    return 0


def _promote(args: argparse.Namespace) -> int:
    _store(args).promote(args.id, by=args.by, reason=args.reason)
    print(f"active baseline for {args.model_name}: {args.id}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    bid = _store(args).rollback(by=args.by, reason=args.reason)
    print(f"rolled back; active baseline for {args.model_name}: {bid}")
    return 0


def _score(args: argparse.Namespace) -> int:
    import numpy as np

    from monitor.drift.score import AnomalyScorer

    bl = _load_ref(args, args.baseline)
    AnomalyScorer(bl, alpha=args.alpha, watch=args.watch)  # refuse a bad watch list before the model loads
    if args.positions is None:  # score texts the way the baseline's were read
        args.positions = str(bl.extra.get("positions") or baseline_positions(bl))
    local = bl.local if args.local_score else None
    a, bank, fp, texts, windows = _readings(args, local.layers if local is not None else None)
    bl.check_compatible(bundle_id=bank.bundle_id, model_fingerprint=fp)
    scorer = AnomalyScorer(bl, alpha=args.alpha, watch=args.watch, local=args.local_score)
    if args.local_score and bl.local is None:
        print(f"layerwatch: baseline {bl.id} holds no local anomaly model (built without prompt windows): "
              "segments inside prompts are not scored", file=sys.stderr)
    scores = scorer.score(a, windows if local is not None else None)
    results = [{"index": i, "text": text, **s.to_dict()} for i, (text, s) in enumerate(zip(texts, scores, strict=True))]
    with open(args.json_out, "w", encoding="utf-8") as fh:
        json.dump({"baseline": bl.id, "bundle_id": bank.bundle_id, "model_fingerprint": fp, "alpha": args.alpha,
                   "watch": list(scorer.watch), "results": results}, fh, indent=1)
    p = np.array([s.p_value for s in scores])
    print(json.dumps({"baseline": bl.id, "texts": len(texts), "anomalous": int(np.sum(p < args.alpha)),
                      "alpha": args.alpha, "out": args.json_out}, indent=2))
    return 0
