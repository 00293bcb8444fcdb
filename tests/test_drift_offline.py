"""Texts -> tap -> wire -> lens bank -> detector, and the baseline/score command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from monitor.adapters import collect_states, find_parts
from monitor.errors import BaselineError
from monitor.lenses.torch_lens import TorchLogitLens
from monitor.pipeline.offline import capture_states, read_corpus, readings_from_states


class CharTokenizer:
    """A minimal tokenizer (one id per character, right padding) for tiny random models."""

    pad_token = "\0"
    eos_token = "\0"
    padding_side = "right"

    def __call__(self, texts: list[str], return_tensors: str, padding: bool, truncation: bool,
                 max_length: int) -> dict[str, torch.Tensor]:
        ids = [[1 + (ord(c) % 120) for c in t][:max_length] for t in texts]
        width = max(len(x) for x in ids)
        return {
            "input_ids": torch.tensor([x + [0] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        }


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    """A tiny random Llama (2 blocks, d=32, vocab 128)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         vocab_size=128, num_key_value_heads=1)
    return tf.LlamaForCausalLM(cfg).eval()


def test_captured_states_match_a_direct_forward(tiny: torch.nn.Module) -> None:
    """The tap's wire payload at the last prompt token equals collect_states (to float16)."""
    texts = ["hello world", "a much longer text than the first one", "mid size"]
    states, layers, fp = capture_states(tiny, CharTokenizer(), texts, batch_size=2, positions="last")
    assert states.shape == (3, 3, 32) and layers == (0, 1, 2) and fp.startswith("sha256:")
    tok = CharTokenizer()
    for i, t in enumerate(texts):
        enc = tok([t], return_tensors="pt", padding=True, truncation=True, max_length=128)
        ref = collect_states(tiny, find_parts(tiny), enc["input_ids"])[:, 0, -1].numpy()
        assert np.allclose(states[i].astype(np.float32), ref, atol=2e-3, rtol=2e-3)


def test_last_plus_mean_capture_stacks_the_mean_and_the_last_token(tiny: torch.nn.Module) -> None:
    """positions='last+mean' gives [n, L, 2, d]: the 'mean' capture, then the 'last' capture."""
    texts = ["hello world", "a much longer text than the first one", "mid"]
    both, layers, _ = capture_states(tiny, CharTokenizer(), texts, batch_size=2, positions="last+mean")
    mean, _, _ = capture_states(tiny, CharTokenizer(), texts, batch_size=2, positions="mean")
    last, _, _ = capture_states(tiny, CharTokenizer(), texts, batch_size=2, positions="last")
    assert both.shape == (3, len(layers), 2, 32)
    assert np.array_equal(both[:, :, 0], mean) and np.array_equal(both[:, :, 1], last)
    a = readings_from_states(TorchLogitLens(tiny), both, layers)  # no probes: the last token only
    assert np.allclose(a.entropy, readings_from_states(TorchLogitLens(tiny), last, layers).entropy)
    with pytest.raises(BaselineError, match=r"positions: 'all' is not one of last, mean, last\+mean"):
        capture_states(tiny, CharTokenizer(), texts, positions="all")


def test_readings_follow_text_order(tiny: torch.nn.Module) -> None:
    """Readings come back in the order of the texts, whatever the length-sorted batching did."""
    texts = ["zz", "a long text about nothing in particular", "b", "medium text"]
    states, layers, _ = capture_states(tiny, CharTokenizer(), texts, batch_size=3)
    bank = TorchLogitLens(tiny)
    a = readings_from_states(bank, states, layers)
    single = readings_from_states(bank, capture_states(tiny, CharTokenizer(), [texts[1]])[0], layers)
    assert np.allclose(a.entropy[1], single.entropy[0], atol=1e-4)


def test_corpus_lines_without_text_are_refused(tmp_path: Path) -> None:
    """A JSONL line without a 'text' field is refused with its line number."""
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "ok"}\n\n{"txt": "no"}\n')
    with pytest.raises(BaselineError, match=r"c.jsonl:3: expected a JSON object with a 'text' field"):
        read_corpus(str(p))


@pytest.mark.real_model
def test_cli_build_score_promote_rollback(tmp_path: Path, tiny: torch.nn.Module) -> None:
    """`layerwatch baseline build`, `score`, `show`, `promote` and `rollback` work end to end."""
    from transformers import AutoTokenizer

    from monitor.cli import main
    from monitor.refmodel import cached_model_dir

    tok = AutoTokenizer.from_pretrained(str(cached_model_dir()))
    import transformers as tf

    torch.manual_seed(1)
    cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         vocab_size=len(tok), num_key_value_heads=1)
    model_dir = tmp_path / "tiny-llama"
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    corpus = tmp_path / "normal.jsonl"
    words = "the of system package file user network install server data".split()
    rng = np.random.default_rng(0)
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 8))}) + "\n" for _ in range(60)))
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"text": "zxq vv 9$#@ qqq"}) + "\n" + json.dumps({"text": "the system file"}) + "\n")
    store = ["--dir", str(tmp_path / "bl"), "--model-name", "tiny"]
    common = ["--model", str(model_dir), "--max-tokens", "32"]
    assert main(["baseline", "build", "--corpus", str(corpus), *common, *store, "--min-samples", "40",
                 "--promote", "--out", str(tmp_path / "b1.json")]) == 0
    first = json.loads((tmp_path / "b1.json").read_text())["id"]
    out = tmp_path / "scores.json"
    assert main(["score", "--corpus", str(odd), *common, *store, "--baseline", "active", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["baseline"] == first and len(res["results"]) == 2
    r0 = res["results"][0]
    assert {"score", "p_value", "flags", "layer_contributions"} <= set(r0) and 0 < r0["p_value"] <= 1
    corpus.write_text(corpus.read_text() + json.dumps({"text": "one more normal text about the server"}) + "\n")
    assert main(["baseline", "build", "--corpus", str(corpus), *common, *store, "--min-samples", "40",
                 "--promote"]) == 0
    assert main(["baseline", "rollback", *store]) == 0
    assert json.loads((tmp_path / "bl" / "active.json").read_text())["active"] == first
    assert main(["baseline", "show", first, *store]) == 0
