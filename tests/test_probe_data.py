"""Bad probe training data is refused before any training, naming the file, the line and the label
(issue 16, "Bad input"); a bundle directory holds either the previous bundle or the complete new
one, never a part. Only names that existed before the change are imported, so on the code as it
was each test fails on its assertion; the minimum counts are the documented 20 training and 10
held-out texts per label."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from monitor.adapters import find_parts
from monitor.lenses.bundle import verify_bundle
from monitor.lenses.model import Translators
from monitor.lenses.probes import LabelledTexts, read_labelled_jsonl, train_probe_set
from monitor.lenses.tuned import TunedPlan
from monitor.lenses.writer import write_bundle
from tests.conftest import make_tiny
from tests.test_lens_training import WORDS, WordTokenizer, sentences


def write_jsonl(path: Path, rows: list[dict[str, object] | str]) -> Path:
    """One line per row: a dict as JSON, a string as it is."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def rows(per_label: dict[str, int], seed: int = 0) -> list[dict[str, object] | str]:
    rng = np.random.default_rng(seed)
    return [{"text": " ".join(rng.choice(WORDS, 5)), "label": lab} for lab, n in per_label.items() for _ in range(n)]


MIN_TRAIN_PER_LABEL, MIN_HELDOUT_PER_LABEL = 20, 10
ENOUGH_TRAIN = {"a": MIN_TRAIN_PER_LABEL, "b": MIN_TRAIN_PER_LABEL}
ENOUGH_HELD = {"a": MIN_HELDOUT_PER_LABEL, "b": MIN_HELDOUT_PER_LABEL}


def check(train: LabelledTexts, heldout: LabelledTexts) -> None:
    """Train a probe set on a tiny model: the checks must refuse the set before any state is read."""
    model = make_tiny("llama")
    train_probe_set("kind", train, heldout, model, find_parts(model), WordTokenizer(), max_tokens=8, max_iter=5)


# ------------------------------------------------------------------------------ one file
@pytest.mark.parametrize(("line", "why"), [
    ("", "empty line"),
    ("   ", "empty line"),
    ('{"text": 12, "label": "a"}', "'text' must be a non-empty string"),
    ('{"text": "  ", "label": "a"}', "'text' must be a non-empty string"),
    ('{"text": "fine", "label": ["a"]}', "'label' must be a non-empty string"),
    ('{"text": "fine", "label": ""}', "'label' must be a non-empty string"),
    ("not json", "expected"),
])
def test_a_bad_line_is_refused_naming_the_file_and_line(tmp_path: Path, line: str, why: str) -> None:
    """Empty lines and lines that are not a labelled text are refused with file:line, never skipped."""
    p = write_jsonl(tmp_path / "train.jsonl", [{"text": "one two", "label": "a"}, line, {"text": "x", "label": "b"}])
    with pytest.raises(ValueError, match=rf"train\.jsonl:2: .*{why}"):
        read_labelled_jsonl(p)


def test_a_line_that_is_not_utf8_is_refused_naming_it(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 text are refused with the line they are on."""
    p = tmp_path / "held.jsonl"
    p.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "\xff\xfe", "label": "a"}\n')
    with pytest.raises(ValueError, match=r"held\.jsonl:2: not UTF-8"):
        read_labelled_jsonl(p)


# ------------------------------------------------------------------------------ a pair of files
def test_an_unknown_held_out_label_is_refused_naming_file_line_and_label(tmp_path: Path) -> None:
    """A held-out label the training file does not have: file, line and label in the error."""
    tr = read_labelled_jsonl(write_jsonl(tmp_path / "t.jsonl", rows(ENOUGH_TRAIN)))
    held = rows(ENOUGH_HELD)
    held.insert(3, {"text": "seven eight", "label": "c"})
    he = read_labelled_jsonl(write_jsonl(tmp_path / "h.jsonl", held))
    with pytest.raises(ValueError, match=r"h\.jsonl:4: unknown label 'c'"):
        check(tr, he)


def test_label_sets_that_differ_are_refused_naming_the_missing_label(tmp_path: Path) -> None:
    """A training label with no held-out text cannot be measured: the error names it, where it is
    in the training file, and the held-out file that lacks it."""
    tr = read_labelled_jsonl(write_jsonl(tmp_path / "t.jsonl", rows({**ENOUGH_TRAIN, "c": MIN_TRAIN_PER_LABEL})))
    he = read_labelled_jsonl(write_jsonl(tmp_path / "h.jsonl", rows(ENOUGH_HELD)))
    with pytest.raises(ValueError, match=rf"label 'c' \(.*t\.jsonl:{2 * MIN_TRAIN_PER_LABEL + 1}\) has no held-out "
                                             r"text in .*h\.jsonl"):
        check(tr, he)


@pytest.mark.parametrize("which", ["train", "heldout"])
def test_too_few_examples_of_a_label_are_refused(tmp_path: Path, which: str) -> None:
    """Fewer texts of a label than the quality bar needs (in either file): file, line, label, counts."""
    few_tr = {"a": MIN_TRAIN_PER_LABEL, "b": MIN_TRAIN_PER_LABEL - 1} if which == "train" else ENOUGH_TRAIN
    few_he = {"a": MIN_HELDOUT_PER_LABEL, "b": MIN_HELDOUT_PER_LABEL - 1} if which == "heldout" else ENOUGH_HELD
    tr = read_labelled_jsonl(write_jsonl(tmp_path / "t.jsonl", rows(few_tr)))
    he = read_labelled_jsonl(write_jsonl(tmp_path / "h.jsonl", rows(few_he)))
    name, least = ("t", MIN_TRAIN_PER_LABEL) if which == "train" else ("h", MIN_HELDOUT_PER_LABEL)
    first = (MIN_TRAIN_PER_LABEL if which == "train" else MIN_HELDOUT_PER_LABEL) + 1
    with pytest.raises(ValueError, match=rf"{name}\.jsonl:{first}: label 'b' has {least - 1} texts, fewer than "
                                             rf"the {least}"):
        check(tr, he)


def test_fit_bundle_refuses_bad_probe_data_before_any_training(tmp_path: Path) -> None:
    """fit_bundle checks every probe file first: the error comes before a state is cached or a
    lens trained, and the output directory is not created."""
    from monitor.lenses.build import fit_bundle

    tr = write_jsonl(tmp_path / "p.train.jsonl", rows(ENOUGH_TRAIN))
    he = write_jsonl(tmp_path / "p.heldout.jsonl", [*rows(ENOUGH_HELD), {"text": "pi rho", "label": "zzz"}])
    plan = TunedPlan("tiny", budget_s=3600.0, train_tokens=3000, batch_tokens=64, lr=1e-3, steps=15)
    with pytest.raises(ValueError, match=rf"p\.heldout\.jsonl:{2 * MIN_HELDOUT_PER_LABEL + 1}: unknown label 'zzz'"):
        fit_bundle(tmp_path / "bundle", make_tiny("llama"), WordTokenizer(), budget=plan, builtin_probes=(),
                   probe_files={"kind": (str(tr), str(he))}, calibration_texts=sentences(50),
                   progress=False, log=lambda _m: None)
    work = tmp_path / "bundle.work"
    assert not (work / "train-states").exists() and not (work / "tuned").exists()
    assert not (tmp_path / "bundle").exists()


# ------------------------------------------------------------------------------ atomic bundles
def _write(out: Path, model: torch.nn.Module, seed: int = 0) -> dict[str, object]:
    parts = find_parts(model)
    tr = Translators.identity(tuple(range(parts.n_states)), parts.hidden_size)
    tr.bias.add_(seed)  # a different bundle per seed
    return write_bundle(out, model, tr, (), k=4)


def test_a_failed_replacement_leaves_the_previous_bundle_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If moving a new bundle into place fails (an interrupted build), the previous bundle is still
    there, complete and verifying; the next build replaces it."""
    model = make_tiny("llama")
    out = tmp_path / "bundle"
    first = _write(out, model)
    real = Path.rename

    def fail_partial(self: Path, target: object) -> object:
        if self.name.endswith(".partial"):
            raise KeyboardInterrupt  # the build is stopped while moving the new bundle in
        return real(self, target)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "rename", fail_partial)
    with pytest.raises(KeyboardInterrupt):
        _write(out, model, seed=1)
    monkeypatch.undo()
    assert verify_bundle(out).bundle_id == first["bundle_id"]
    assert _write(out, model, seed=1)["bundle_id"] != first["bundle_id"]
    assert verify_bundle(out).bundle_id != first["bundle_id"] and not (tmp_path / "bundle.previous").exists()


def test_a_crash_between_the_two_renames_is_undone_by_the_next_build(tmp_path: Path) -> None:
    """A bundle left only as '<out>.previous' (a crash between moving it aside and moving the new
    one in) is put back before anything else happens."""
    model = make_tiny("llama")
    out = tmp_path / "bundle"
    first = _write(out, model)
    out.rename(tmp_path / "bundle.previous")
    with pytest.raises(ValueError, match="must end with the final state"):  # a build that fails early
        write_bundle(out, model, Translators.identity((0,), find_parts(model).hidden_size), (), k=4)
    assert verify_bundle(out).bundle_id == first["bundle_id"]


def test_a_directory_that_is_not_a_bundle_is_never_replaced(tmp_path: Path) -> None:
    """Pointing the output at a directory with other files in it is refused; the files stay."""
    out = tmp_path / "notes"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not a lens bundle"):
        _write(out, make_tiny("llama"))
    assert (out / "keep.txt").read_text() == "mine" and not (tmp_path / "notes.partial").exists()
