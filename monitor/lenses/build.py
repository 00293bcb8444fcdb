"""Build a complete lens bundle: tuned lens, concept probes, held-out quality, ONNX export.

:func:`fit_bundle` is what ``layerwatch lens fit`` runs; :func:`ensure_reference_bundle` is what
the demo and the sidecar call to get (or build once, within a time budget) the bundle of the
reference model, SmolLM2-135M-Instruct. Every stage keeps its results in a work directory, so an
interrupted run resumes where it stopped.

Budgets (``--budget``):

- ``demo``: 4 minutes of tuned-lens training on 16k token positions; probes on 60 training, 15
  calibration and 15 held-out prompts per label (1,350 prompts: the forward passes take ~4-7
  minutes on two cores, busy or quiet); made for the first demo run (the whole demo must finish
  within ~15 minutes on 2 cores);
- ``full``: the default, ~25 minutes of tuned-lens training on up to 65k token positions; probes
  on 300/60/60 prompts per label (6,300 prompts).

The probes' states (last token and prompt mean of every prompt, float16) are cached in the work
directory (``probe-states``), so a resumed build runs no prompt twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monitor.adapters import find_parts, model_fingerprint
from monitor.errors import BundleError
from monitor.lenses.cache import StateCache, fill_cache
from monitor.lenses.model import ProbeSet, Translators
from monitor.lenses.probe_data import LabelledTexts, check_probe_set, read_labelled_jsonl, write_probe_jsonl
from monitor.lenses.probe_states import PromptStateCache
from monitor.lenses.probes import builtin_probe_texts, format_probe_table, train_probe_set
from monitor.lenses.quality import evaluate_lenses, format_quality_table
from monitor.lenses.readout import readout_spec
from monitor.lenses.trust import DRIFT_FEATURE, quality_bar
from monitor.lenses.tuned import PLANS, TunedPlan, fit_tuned_lens
from monitor.lenses.writer import write_bundle


@dataclass(frozen=True)
class ProbePlan:
    """Sizes of the shipped probe sets, per label: training, calibration (temperature) and
    held-out (the quality bar) prompts, and the token cap of a prompt."""

    train_per_label: int
    calibration_per_label: int
    heldout_per_label: int
    max_tokens: int


# Forward passes are the cost (0.8-3.6 prompts/s on two shared cores): see the module docstring.
PROBE_PLANS = {"demo": ProbePlan(60, 15, 15, 96), "full": ProbePlan(300, 60, 60, 96)}
HELDOUT_TOKENS = {"demo": 1024, "full": 4096}
CALIBRATION_SOURCE = "monitor.corpora.english_prose('train') packed into 128-token chunks"
HELDOUT_SOURCE = "monitor.corpora.english_prose('heldout') packed into 128-token chunks"


def _bar_factory(enabled: bool) -> Callable[..., Any] | None:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the train and sidecar extras
        return None

    def make(**kwargs: Any) -> Any:
        return tqdm(dynamic_ncols=True, leave=False, **kwargs)

    return make


def _progress(factory: Callable[..., Any] | None, **kwargs: Any) -> Any:
    return factory(**kwargs) if factory is not None else None


def _texts(split: str) -> list[str]:
    from monitor import corpora

    return corpora.english_prose(split)


def fit_bundle(
    out: str | Path,
    model: nn.Module,
    tokenizer: Any,
    *,
    budget: str | TunedPlan = "full",
    work: str | Path | None = None,
    builtin_probes: Sequence[str] = ("language", "topic"),
    probe_files: dict[str, tuple[str, str]] | None = None,
    k: int = 5,
    model_name: str | None = None,
    calibration_texts: Sequence[str] | None = None,
    heldout_texts: Sequence[str] | None = None,
    heldout_tokens: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the tuned lens and probes of ``model``, measure them, export the bundle to ``out``.

    ``probe_files``: name -> (train JSONL, held-out JSONL) of extra probe sets. Returns the
    manifest."""
    plan = PLANS[budget] if isinstance(budget, str) else budget
    key = budget if isinstance(budget, str) else "full"
    probe_plan = PROBE_PLANS.get(key, PROBE_PLANS["full"])
    out = Path(out)
    work = Path(work) if work is not None else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    bars = _bar_factory(progress)
    model.eval()
    parts = find_parts(model)
    readout = readout_spec(parts)
    n = parts.n_blocks
    fingerprint = model_fingerprint(model, parts)
    stamp = work / "model.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") != fingerprint:
        raise BundleError(f"work directory {work} belongs to another model; pass a fresh --work")
    stamp.write_text(json.dumps({"fingerprint": fingerprint}))
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    # 0. every probe set read and checked before any training: a bad file fails in seconds
    sets = _probe_sets(work / "probe-data", builtin_probes, probe_files or {}, probe_plan)

    # 1. states of all layers, cached once
    cache = StateCache.open(work / "train-states", plan.train_tokens, parts.n_states, parts.hidden_size,
                            CALIBRATION_SOURCE if calibration_texts is None else "custom")
    remaining = max(0.0, plan.budget_s * plan.collect_share - float(cache.meta["seconds"]))
    bar = _progress(bars, total=cache.capacity, initial=cache.rows, desc="tuned lens: states", unit="tok")
    t0 = time.monotonic()
    fill_cache(cache, model, parts, tokenizer, calibration_texts or _texts("train"),
               deadline=time.monotonic() + remaining, progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    timings["collect_s"] = round(time.monotonic() - t0, 1)
    log(f"tuned lens: {cache.rows} token positions of all {parts.n_states} states cached "
        f"({float(cache.meta['seconds']):.0f}s of forward passes)")

    # 2. tuned lens
    spent = float(cache.meta["seconds"])
    t0 = time.monotonic()
    translators, training = fit_tuned_lens(
        readout, cache, work / "tuned", plan=plan, deadline=time.monotonic() + max(0.0, plan.budget_s - spent),
        n_layers=n, log=log, progress_factory=bars,
    )
    timings["tuned_fit_s"] = round(time.monotonic() - t0, 1)
    training["tuned_lens_seconds"] = round(spent + timings["tuned_fit_s"], 1)

    # 3. concept probes, each position on its own states (cached: a resumed build reruns no prompt)
    probes: list[ProbeSet] = []
    t0 = time.monotonic()
    prompt_cache = PromptStateCache(work / "probe-states", fingerprint, probe_plan.max_tokens)
    for name, (tr_texts, cal_texts, he_texts) in sets.items():
        bar = _progress(bars, total=len(tr_texts.texts) + len(cal_texts.texts if cal_texts else []) + len(he_texts.texts),
                        desc=f"probe {name}", unit="text")
        probes.append(train_probe_set(name, tr_texts, he_texts, model, parts, tokenizer, calibration=cal_texts,
                                      cache=prompt_cache, max_tokens=probe_plan.max_tokens,
                                      progress=bar.update if bar is not None else None))
        if bar is not None:
            bar.close()
        log(format_probe_table(probes[-1]))
        qbar = quality_bar(probes[-1].metrics, probes[-1].layers)
        if qbar["role"] == DRIFT_FEATURE:
            log(f"probe {name}: no layer passes the quality bar ({qbar['rule']}, margin {qbar['margin']}); it is "
                "shipped as a drift feature only and never printed in a narrative")
        else:
            log(f"probe {name}: reliable (printed) at layers {qbar['positions']['last']['reliable_layers']} "
                f"(last token), {qbar['positions']['mean']['reliable_layers']} (prompt mean)")
    timings["probes_s"] = round(time.monotonic() - t0, 1)

    # 4. held-out quality of the logit and tuned lenses
    t0 = time.monotonic()
    n_held = heldout_tokens or HELDOUT_TOKENS.get(key, 4096)
    held = StateCache.open(work / "heldout-states", n_held, parts.n_states, parts.hidden_size,
                           HELDOUT_SOURCE if heldout_texts is None else "custom")
    bar = _progress(bars, total=held.capacity, initial=held.rows, desc="held-out states", unit="tok")
    fill_cache(held, model, parts, tokenizer, heldout_texts or _texts("heldout"),
               progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    states, tokens = held.view()
    bar = _progress(bars, total=states.shape[0], desc="quality report", unit="tok")
    quality = evaluate_lenses(readout, {"logit": Translators.identity(translators.layers, parts.hidden_size),
                                        "tuned": translators}, states, tokens,
                              progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    quality["heldout_source"] = HELDOUT_SOURCE if heldout_texts is None else "custom"
    timings["quality_s"] = round(time.monotonic() - t0, 1)
    log(format_quality_table(quality))

    # 5. export
    t0 = time.monotonic()
    training["calibration_source"] = CALIBRATION_SOURCE if calibration_texts is None else "custom"
    training["budget"] = key
    training["probe_plan"] = asdict(probe_plan)
    training["timings"] = timings
    manifest = write_bundle(out, model, translators, tuple(probes), tokenizer=tokenizer, model_name=model_name,
                            k=k, quality=quality, training=training, parts=parts, readout=readout)
    timings["export_s"] = round(time.monotonic() - t0, 1)
    log(f"bundle {manifest['bundle_id']} written to {out} in {time.monotonic() - t_start:.0f}s "
        f"(tuned lens {training['tuned_lens_seconds']:.0f}s, probes {timings['probes_s']:.0f}s, "
        f"quality {timings['quality_s']:.0f}s)")
    return manifest


def _probe_sets(
    pdir: Path, builtin: Sequence[str], files: dict[str, tuple[str, str]], plan: ProbePlan,
) -> dict[str, tuple[LabelledTexts, LabelledTexts | None, LabelledTexts]]:
    """Every probe set (shipped and from files) as (training, calibration, held-out), read and
    checked (:func:`check_probe_set`); the shipped sets are also written to ``pdir`` as JSONL,
    which their errors name. A set from files has no calibration file: the training takes its
    calibration texts from the training file."""
    sets: dict[str, tuple[LabelledTexts, LabelledTexts | None, LabelledTexts]] = {}
    splits = (("train", plan.train_per_label), ("calibration", plan.calibration_per_label),
              ("heldout", plan.heldout_per_label))
    for name in builtin:
        pair = []
        for split, per_label in splits:
            texts = builtin_probe_texts(name, split, per_label)
            pdir.mkdir(parents=True, exist_ok=True)
            write_probe_jsonl(texts, pdir / f"{name}.{split}.jsonl")
            pair.append(replace(texts, provenance=str(pdir / f"{name}.{split}.jsonl")))
        check_probe_set(name, pair[0], pair[2])
        check_probe_set(name, pair[0], pair[1])
        sets[name] = (pair[0], pair[1], pair[2])
    for name, (tr_path, he_path) in files.items():
        train, heldout = read_labelled_jsonl(tr_path), read_labelled_jsonl(he_path)
        check_probe_set(name, train, heldout)
        sets[name] = (train, None, heldout)
    return sets


# --------------------------------------------------------------------------- reference bundle
def reference_bundle_dir(cache_dir: Path | None = None, budget: str = "demo") -> Path:
    """Where the reference model's bundle of ``budget`` lives in the cache."""
    from monitor.refmodel import default_cache_dir

    return (cache_dir or default_cache_dir()) / "bundles" / f"smollm2-135m-instruct-{budget}"


def _summary(manifest: dict[str, Any]) -> str:
    q = manifest.get("quality", {})
    parts = [f"bundle {manifest['bundle_id']} ({manifest['lens']['kind']} lens, "
             f"{len(manifest['lens']['layers'])} layers, probes {[p['name'] for p in manifest.get('probes', [])]})"]
    if "tuned" in q and "logit" in q:
        parts.append(f"held-out mean KL over layers 0-{q['final_layer'] - 1}: tuned {q['tuned']['mean_kl_before_last']:.2f} "
                     f"nats vs logit {q['logit']['mean_kl_before_last']:.2f}; top-1 agreement "
                     f"{q['tuned']['mean_top1_agreement_before_last']:.2f} vs "
                     f"{q['logit']['mean_top1_agreement_before_last']:.2f}")
    return "; ".join(parts)


def ensure_reference_bundle(
    cache_dir: Path | None = None,
    budget: str = "demo",
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Return the directory of a verified lens bundle for SmolLM2-135M-Instruct, building it once.

    A cached bundle of the requested budget (or the larger ``full`` one) is reused when it
    verifies against the reference model's fingerprint; otherwise one is trained within the
    budget (``demo``: a few minutes; ``full``: ~25 minutes) and cached. The quality reached is
    printed either way."""
    from monitor.lenses.bundle import verify_bundle
    from monitor.refmodel import MODEL_NAME, load_reference_model

    if budget not in PLANS:
        raise ValueError(f"budget must be one of {sorted(PLANS)}, got {budget!r}")
    candidates = [reference_bundle_dir(cache_dir, b) for b in ("full", budget)] if budget != "full" else \
        [reference_bundle_dir(cache_dir, "full")]
    model, tok = load_reference_model(cache_dir)
    fingerprint = model_fingerprint(model)
    for path in candidates:
        if (path / "manifest.json").exists():
            try:
                bundle = verify_bundle(path, fingerprint)
            except BundleError as exc:
                log(f"cached lens bundle {path} is not usable ({exc}); rebuilding")
                continue
            log(f"using cached lens {_summary(bundle.manifest)}")
            return path
    out = reference_bundle_dir(cache_dir, budget)
    log(f"training the lens bundle for {MODEL_NAME} (budget {budget!r}); this runs once and is cached in {out}")
    torch.set_grad_enabled(True)
    manifest = fit_bundle(out, model, tok, budget=budget, model_name=MODEL_NAME, progress=progress, log=log)
    log(f"built lens {_summary(manifest)}")
    return out


def reference_bank(cache_dir: Path | None = None, budget: str = "demo", **load_kwargs: Any) -> Any:
    """The :class:`~monitor.lenses.runtime.LensBank` of the reference model (built if needed)."""
    from monitor.lenses.runtime import LensBank

    return LensBank.load(ensure_reference_bundle(cache_dir, budget), **load_kwargs)
