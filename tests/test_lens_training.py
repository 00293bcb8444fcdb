"""Tuned-lens training pieces, probes, the state cache and the whole fit on tiny models."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from monitor.adapters import find_parts
from monitor.lenses.cache import StateCache, fill_cache, token_chunks
from monitor.lenses.model import Translators
from monitor.lenses.probes import (
    LabelledTexts,
    control_labels,
    fit_probe_layers,
    probe_accuracy,
    read_labelled_jsonl,
    train_probe_set,
)
from monitor.lenses.readout import ReadoutSpec, readout_spec
from monitor.lenses.tuned import (
    TunedPlan,
    _spd_solve,
    final_targets,
    finetune,
    kl_rows,
    layer_kl,
    least_squares_init,
)
from tests.conftest import make_tiny


class WordTokenizer:
    """A deterministic whitespace tokenizer for tiny models (ids from a CRC of each word)."""

    pad_token_id = 0
    eos_token_id = 1
    name_or_path = "word-tokenizer"

    def __init__(self, vocab_size: int = 128) -> None:
        self.vocab_size = vocab_size

    def __call__(self, text: str, add_special_tokens: bool = False, return_tensors: str | None = None):  # noqa: ANN204
        ids = [2 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in text.split()]
        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)

    def get_vocab(self) -> dict[str, int]:
        return {"<pad>": 0, "<eos>": 1}


WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
         "tau upsilon phi chi psi omega one two three four five six seven eight nine ten").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """Random word sequences (a tiny 'corpus')."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(20, 60))) for _ in range(n)]


def random_readout(v: int = 300, d: int = 16, seed: int = 0) -> ReadoutSpec:
    gen = torch.Generator().manual_seed(seed)
    return ReadoutSpec("rms", 1e-6, torch.randn(v, d, generator=gen), None)


# ------------------------------------------------------------------------------- the loss
def test_kl_rows_matches_exact_kl_and_its_gradient() -> None:
    """The bfloat16 KL-to-final loss built from u = W^T p equals the exact float32 KL, and so does its gradient."""
    spec = random_readout()
    gen = torch.Generator().manual_seed(1)
    final = torch.randn(40, 16, generator=gen)
    lens = final + 0.5 * torch.randn(40, 16, generator=gen)
    u, c = final_targets(spec, final.numpy())
    s = spec.normalise(lens).requires_grad_(True)
    got = kl_rows(spec, s, torch.from_numpy(u), torch.from_numpy(c))
    got.sum().backward()
    s2 = spec.normalise(lens).requires_grad_(True)
    logp = spec.logits(final).log_softmax(-1)
    logq = (s2 @ spec.weight.T).log_softmax(-1)
    exact = (logp.exp() * (logp - logq)).sum(-1)
    exact.sum().backward()
    torch.testing.assert_close(got, exact.detach(), atol=0.05, rtol=0.03)
    cos = torch.nn.functional.cosine_similarity(s.grad.flatten(), s2.grad.flatten(), dim=0)
    assert cos > 0.99


def test_final_targets_give_the_kl_formula_including_a_head_bias() -> None:
    """KL(p||q) = lse(z_q) - s_q.u - c holds exactly (float32) for a read-out with a bias."""
    spec = ReadoutSpec("layer", 1e-5, torch.randn(50, 8), torch.randn(50))
    final, lens = torch.randn(5, 8), torch.randn(5, 8)
    u, c = final_targets(spec, final.numpy())
    zq = spec.logits(lens)
    formula = torch.logsumexp(zq, -1) - (spec.normalise(lens) * torch.from_numpy(u)).sum(-1) - torch.from_numpy(c)
    logp, logq = spec.logits(final).log_softmax(-1), zq.log_softmax(-1)
    torch.testing.assert_close(formula, (logp.exp() * (logp - logq)).sum(-1), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------- init and fine-tune
def synthetic_states(n: int = 2000, layers: int = 3, d: int = 16, seed: int = 0) -> np.ndarray:
    """States whose (constant-norm) final state is an exact affine function of every earlier one."""
    gen = torch.Generator().manual_seed(seed)
    final = torch.randn(n, d, generator=gen)
    final = 3 * final / final.pow(2).mean(-1, keepdim=True).sqrt()
    states = [final @ (torch.eye(d) + 0.5 * torch.randn(d, d, generator=gen)) + torch.randn(d, generator=gen)
              for _ in range(layers)]
    return torch.stack([*states, final], 1).numpy()


def test_least_squares_init_recovers_an_affine_relation() -> None:
    """When the final state is an affine map of a layer's state, the closed-form init brings KL to ~0."""
    spec = random_readout()
    states = synthetic_states()
    a, b = least_squares_init(spec, states, 3, ridge=1e-8)
    u, c = final_targets(spec, states[:, 3])
    kl = layer_kl(spec, a, b, states, u, c, exact=True)
    zero = layer_kl(spec, torch.zeros_like(a), torch.zeros_like(b), states, u, c, exact=True)
    assert (kl < 1e-3).all() and (zero > 0.5).all()


def test_spd_solve_matches_numpy_and_survives_a_singular_matrix() -> None:
    """The ridge solve: exact on SPD matrices, least squares (finite) where Cholesky fails."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 6, generator=g, dtype=torch.float64)
    m = x.transpose(1, 2) @ x + 0.1 * torch.eye(6, dtype=torch.float64)
    m[2] = torch.zeros(6, 6, dtype=torch.float64)
    m[2, 0, 0] = 1.0  # singular: Cholesky fails
    rhs = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    sol = _spd_solve(m, rhs)
    for i in range(2):
        np.testing.assert_allclose(sol[i].numpy(), np.linalg.solve(m[i].numpy(), rhs[i].numpy()), rtol=1e-9)
    assert torch.isfinite(sol[2]).all()
    np.testing.assert_allclose(sol[2, 0].numpy(), rhs[2, 0].numpy(), rtol=1e-9)


def test_finetune_lowers_kl_from_the_logit_lens_and_resumes(tmp_path: Path) -> None:
    """Fine-tuning from identity translators lowers the validation KL, and a run interrupted after
    3 steps resumes from its checkpoint to the same parameters as an uninterrupted run."""
    spec = random_readout()
    states = synthetic_states(n=1200)
    u, c = final_targets(spec, states[:, 3])
    a0, b0 = torch.zeros(3, 16, 16), torch.zeros(3, 16)
    plan = TunedPlan("t", budget_s=60, train_tokens=1200, batch_tokens=64, lr=3e-3, val_tokens=200)
    far = float("inf")
    a1, b1, r1 = finetune(spec, a0, b0, states, u, c, plan=plan, deadline=far, ckpt_dir=tmp_path / "one",
                          total_steps=8)
    assert r1.steps == 8 and r1.tokens_seen == 8 * 64
    assert all(r1.kept_tuned) and all(t < i for t, i in zip(r1.val_kl_tuned, r1.val_kl_init, strict=True))
    finetune(spec, a0, b0, states, u, c, plan=plan, deadline=far, ckpt_dir=tmp_path / "two", total_steps=8,
             stop_at_step=3)
    state = json.loads((tmp_path / "two" / "finetune.json").read_text())
    assert state["step"] == 3
    a2, b2, r2 = finetune(spec, a0, b0, states, u, c, plan=plan, deadline=far, ckpt_dir=tmp_path / "two",
                          total_steps=8)
    assert r2.steps == 8
    torch.testing.assert_close(a2, a1)
    torch.testing.assert_close(b2, b1)


def test_finetune_keeps_the_init_where_it_is_better(tmp_path: Path) -> None:
    """A layer whose closed-form init is already exact keeps it rather than a noisier fine-tune."""
    spec = random_readout()
    states = synthetic_states(n=1200)
    u, c = final_targets(spec, states[:, 3])
    a, b = least_squares_init(spec, states, 3, ridge=1e-8)
    plan = TunedPlan("t", budget_s=60, train_tokens=1200, batch_tokens=64, lr=3e-2, val_tokens=200)
    a2, _, res = finetune(spec, a, b, states, u, c, plan=plan, deadline=float("inf"), ckpt_dir=tmp_path,
                          total_steps=4)
    for i, kept in enumerate(res.kept_tuned):
        assert kept == (res.val_kl_tuned[i] <= res.val_kl_init[i])
        if not kept:
            torch.testing.assert_close(a2[i], a[i])


# ------------------------------------------------------------------------------- state cache
def test_state_cache_resumes_to_the_same_rows(tmp_path: Path) -> None:
    """A cache filled in two interrupted runs holds exactly what one uninterrupted run stores."""
    model = make_tiny("llama")
    parts, tok, texts = find_parts(model), WordTokenizer(), sentences(40)
    one = fill_cache(StateCache.open(tmp_path / "one", 600, parts.n_states, 32, "s"), model, parts, tok, texts,
                     chunk_len=16, batch_chunks=4)
    c2 = StateCache.open(tmp_path / "two", 600, parts.n_states, 32, "s")
    fill_cache(c2, model, parts, tok, texts, chunk_len=16, batch_chunks=4, deadline=0.0)  # stops after a batch
    assert 0 < c2.rows < 600
    two = fill_cache(StateCache.open(tmp_path / "two", 600, parts.n_states, 32, "s"), model, parts, tok, texts,
                     chunk_len=16, batch_chunks=4)
    assert one.rows == two.rows == 600
    np.testing.assert_array_equal(one.view()[0], two.view()[0])
    np.testing.assert_array_equal(one.view()[1], two.view()[1])


def test_state_cache_skips_position_zero_and_records_next_tokens(tmp_path: Path) -> None:
    """Each 16-token chunk stores positions 1..15 with their token and next-token ids."""
    model = make_tiny("llama")
    parts, tok = find_parts(model), WordTokenizer()
    texts = sentences(5)
    cache = fill_cache(StateCache.open(tmp_path, 45, parts.n_states, 32, "s"), model, parts, tok, texts,
                       chunk_len=16, batch_chunks=1)
    chunk = next(token_chunks(tok, texts, 16))
    tokens = cache.view()[1]
    assert cache.rows == 45 and tokens[:15, 0].tolist() == chunk[1:16] and tokens[:15, 1].tolist() == chunk[2:17]


# ------------------------------------------------------------------------------- probes
def test_probe_layers_separate_linearly_separable_classes() -> None:
    """A per-layer probe reaches full accuracy where classes are linearly separable and chance where they are not,
    with its standardisation folded into raw-state weights."""
    rng = np.random.default_rng(0)
    n, d = 400, 12
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 2, d)).astype(np.float32) + 100  # large offset: standardisation matters
    x[:, :, 6:] *= 50  # and very different scales per dimension
    x[:, 1, :3] += 6 * np.eye(3)[y]  # layer 1 encodes the class, layer 0 does not
    w, b, l2 = fit_probe_layers(x, y, 3)
    acc = probe_accuracy(x, y, w, b)
    assert acc[1] > 0.97 and acc[0] < 0.6 and len(l2) == 2


def test_control_task_gives_each_token_type_one_label() -> None:
    """Control labels are a function of the last token's type, drawn from the label distribution."""
    last = [5, 7, 5, 9, 7, 5] * 50
    lab = control_labels(last, np.array([0.5, 0.5]), seed=3)
    for t in (5, 7, 9):
        assert len(set(lab[[i for i, x in enumerate(last) if x == t]])) == 1
    many = control_labels(list(range(2000)), np.array([0.8, 0.2]), seed=0)
    assert 0.75 < (many == 0).mean() < 0.85


def test_read_labelled_jsonl_names_the_bad_line(tmp_path: Path) -> None:
    """A malformed JSONL line is refused with its file name and line number."""
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2"):
        read_labelled_jsonl(p)


def test_probe_set_reports_accuracy_beside_baselines() -> None:
    """A probe trained on a tiny model reports per-layer held-out, control and bag-of-tokens accuracy."""
    model = make_tiny("llama")
    parts, tok = find_parts(model), WordTokenizer()
    rng = np.random.default_rng(0)

    def texts(n: int) -> LabelledTexts:
        lab = rng.choice(["greek", "number"], n)
        pool = {"greek": WORDS[:24], "number": WORDS[24:]}
        return LabelledTexts([" ".join(rng.choice(pool[la], 6)) for la in lab], list(lab), "synthetic")

    probe = train_probe_set("kind", texts(160), texts(60), model, parts, tok, max_tokens=8, max_iter=50)
    m = probe.metrics
    assert probe.labels == ("greek", "number") and probe.weight.shape == (3, 32, 2)
    assert len(m["heldout_accuracy"]) == len(m["control_accuracy"]) == len(m["selectivity"]) == 3
    assert m["heldout_accuracy"][0] > 0.75  # layer 0 is the last word's embedding: the class is (nearly) linear in it
    assert m["bag_of_tokens_accuracy"] > 0.9 and 0.3 < m["majority_accuracy"] < 0.7


# ------------------------------------------------------------------------------- the whole fit
def test_fit_bundle_on_a_tiny_model_end_to_end(tmp_path: Path) -> None:
    """fit_bundle trains, measures and exports a bundle whose tuned lens beats the logit lens at
    every layer before the last on held-out text, with a probe set from JSONL files."""
    from monitor.lenses.build import fit_bundle
    from monitor.lenses.runtime import LensBank

    model = make_tiny("llama")
    tok = WordTokenizer()
    rng = np.random.default_rng(1)
    for split, n in (("train", 120), ("heldout", 40)):
        with (tmp_path / f"p.{split}.jsonl").open("w") as fh:
            for _ in range(n):
                lab = str(rng.choice(["a", "b"]))
                words = WORDS[:17] if lab == "a" else WORDS[17:]
                fh.write(json.dumps({"text": " ".join(rng.choice(words, 5)), "label": lab}) + "\n")
    # A generous wall-clock budget: the fit must end on its step count, not on a busy machine's clock,
    # or the resumed fit below would legitimately train further.
    plan = TunedPlan("tiny", budget_s=3600.0, train_tokens=3000, batch_tokens=64, lr=1e-3, steps=15)
    man = fit_bundle(tmp_path / "bundle", model, tok, budget=plan, builtin_probes=(),
                     probe_files={"kind": (str(tmp_path / "p.train.jsonl"), str(tmp_path / "p.heldout.jsonl"))},
                     calibration_texts=sentences(300), heldout_texts=sentences(60, seed=9), heldout_tokens=600,
                     progress=False, log=lambda _m: None)
    q = man["quality"]
    assert q["tuned_below_logit_every_layer_before_last"]
    assert man["training"]["train_positions"] == 3000 and man["probes"][0]["name"] == "kind"
    bank = LensBank.load(tmp_path / "bundle")
    assert bank.kind == "tuned" and bank.probe_labels == {"kind": ("a", "b")}
    # resuming with everything cached re-exports the same translators
    man2 = fit_bundle(tmp_path / "bundle", model, tok, budget=plan, builtin_probes=(),
                      probe_files={"kind": (str(tmp_path / "p.train.jsonl"), str(tmp_path / "p.heldout.jsonl"))},
                      calibration_texts=sentences(300), heldout_texts=sentences(60, seed=9), heldout_tokens=600,
                      progress=False, log=lambda _m: None)
    assert man2["files"]["weights.safetensors"] == man["files"]["weights.safetensors"]


def test_translators_identity_is_the_logit_lens() -> None:
    """Identity translators leave states unchanged, so the tuned machinery reduces to the logit lens."""
    model = make_tiny("gpt2")
    parts = find_parts(model)
    tr = Translators.identity(tuple(range(parts.n_states)), parts.hidden_size)
    h = torch.randn(2, parts.n_states, parts.hidden_size)
    torch.testing.assert_close(readout_spec(parts).logits(tr.apply(h)), parts.final_logits(h))


@pytest.mark.real_model
def test_tuned_lens_beats_logit_lens_on_smollm2_heldout_prose(reference_model, tmp_path: Path) -> None:
    """On the real SmolLM2, a short fit (2k token positions) already gives a tuned lens with lower
    held-out KL than the logit lens at every layer before the last, and better top-1 agreement."""
    from monitor import corpora
    from monitor.lenses.build import fit_bundle

    model, tok = reference_model
    plan = TunedPlan("test", budget_s=60.0, train_tokens=2048, batch_tokens=128, steps=4)
    man = fit_bundle(tmp_path / "b", model, tok, budget=plan, builtin_probes=(), heldout_tokens=254,
                     calibration_texts=corpora.english_prose("train")[:40],
                     heldout_texts=corpora.english_prose("heldout")[:10], progress=False, log=lambda _m: None)
    q = man["quality"]
    assert q["tuned_below_logit_every_layer_before_last"]
    assert q["tuned"]["mean_kl_before_last"] < 0.3 * q["logit"]["mean_kl_before_last"]
    assert q["tuned"]["mean_top1_agreement_before_last"] > q["logit"]["mean_top1_agreement_before_last"]
    assert q["logit"]["kl_to_final_nats"][-1] == pytest.approx(0.0, abs=1e-3)
