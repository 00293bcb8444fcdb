"""Model adapters: finding blocks, final norm and unembedding; layer-numbering parity."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import FAMILIES, drain_samples, make_tiny
from torch import nn

import monitor
from monitor.adapters import collect_states, find_parts
from monitor.errors import UnsupportedArchitecture

ENCODERS = {"bert", "bert_base", "roberta"}


def _reference(model: nn.Module, ids: torch.Tensor) -> tuple[Any, torch.Tensor | None]:
    """One forward with output_hidden_states=True, plus the final norm's input (if any)."""
    parts = find_parts(model)
    seen: dict[str, torch.Tensor] = {}
    handle = None
    if parts.final_norm is not None:
        handle = parts.final_norm.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0]))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
    finally:
        if handle is not None:
            handle.remove()
    return out, seen.get("x")


def _last_hidden(out: Any) -> torch.Tensor:
    return out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]


@pytest.mark.parametrize("family", FAMILIES)
def test_ladder_finds_every_supported_family(family: str) -> None:
    """Each supported family resolves to its blocks, and to a final norm/LM head where it has one."""
    model = make_tiny(family)
    parts = find_parts(model)
    assert parts.n_blocks == 2 and parts.n_states == 3 and parts.hidden_size == 32
    assert (parts.final_norm is None) == (family in ENCODERS)
    assert (parts.unembed is None) == (family == "bert_base")
    if parts.unembed is not None:
        assert parts.vocab_size == 128


@pytest.mark.parametrize("family", FAMILIES)
def test_collect_states_matches_output_hidden_states(family: str) -> None:
    """collect_states gives states 0..N-1 equal to output_hidden_states and state N equal to the
    final norm's input (decoders) or the last hidden state (encoders)."""
    model = make_tiny(family)
    ids = torch.randint(3, 120, (2, 6))
    states = collect_states(model, find_parts(model), ids)
    out, norm_in = _reference(model, ids)
    n = find_parts(model).n_blocks
    for layer in range(n):
        torch.testing.assert_close(states[layer], out.hidden_states[layer], rtol=0, atol=0)
    expected_n = _last_hidden(out) if family in ENCODERS else norm_in
    assert expected_n is not None
    torch.testing.assert_close(states[n], expected_n, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_tap_states_match_output_hidden_states_to_float16(family: str, memory_transport: Any) -> None:
    """Through the tap (every position), states 0..N-1 equal output_hidden_states rounded to
    float16 and state N equals the final norm's input (encoders: the last hidden state)."""
    model = make_tiny(family)
    ids = torch.randint(3, 120, (1, 6))
    tap = monitor.attach(model, sample_rate=1.0, transport=memory_transport, positions="all", max_positions=64)
    parts = tap.parts
    seen: dict[str, torch.Tensor] = {}
    handles = []
    if parts.final_norm is not None:
        handles.append(parts.final_norm.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0])))
    with tap.request("parity"), torch.no_grad():  # the same forward feeds the tap and HF
        out = model(input_ids=ids, output_hidden_states=True)
    for h in handles:
        h.remove()
    assert tap.flush(5.0)
    (sample,) = drain_samples(memory_transport)
    tap.close()
    n = parts.n_blocks
    assert sample.layers == tuple(range(n + 1)) and sample.n_states == n + 1
    assert sample.position_index == tuple(range(6))
    got = torch.from_numpy(sample.hidden.copy())
    for layer in range(n):
        assert torch.equal(got[layer], out.hidden_states[layer][0].half())
    expected_n = _last_hidden(out)[0] if family in ENCODERS else seen["x"][0]
    assert torch.equal(got[n], expected_n.half())


@pytest.mark.real_model
def test_real_smollm2_parity_through_the_tap(reference_model: Any, memory_transport: Any) -> None:
    """On the real SmolLM2-135M-Instruct the tap's 31 states equal output_hidden_states (0..29,
    float16) and the final norm's input (30), and state 30 reproduces the model's own output."""
    model, tok = reference_model
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    tap = monitor.attach(model, sample_rate=1.0, transport=memory_transport, positions="all", max_positions=64)
    seen: dict[str, torch.Tensor] = {}
    hook = tap.parts.final_norm.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0]))
    try:
        with tap.request("smollm2"), torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
    finally:
        hook.remove()
    assert tap.flush(10.0)
    (sample,) = drain_samples(memory_transport)
    tap.close()
    assert tap.parts.n_blocks == 30 and sample.hidden.shape == (31, ids.shape[1], 576)
    got = torch.from_numpy(sample.hidden.copy())
    for layer in range(30):
        assert torch.equal(got[layer], out.hidden_states[layer][0].half()), layer
    assert torch.equal(got[30], seen["x"][0].half())
    # state N is what the model's final distribution is computed from
    with torch.no_grad():
        final = tap.parts.final_logits(got[30, -1:].float())
    assert int(final.argmax()) == int(out.logits[0, -1].argmax())
    assert sample.final_topk is not None and int(sample.final_topk.ids[-1, 0]) == int(out.logits[0, -1].argmax())


class _Block(nn.Module):
    """A residual block: returns the residual stream."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Linear(16, 16)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.mlp(h))


class _Mystery(nn.Module):
    """An architecture the ladder does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.backbone = nn.Module()
        self.backbone.stages = nn.ModuleList([_Block() for _ in range(3)])
        self.backbone.norm_f = nn.LayerNorm(16)
        self.head = nn.Linear(16, 50, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for blk in self.backbone.stages:
            h = blk(h)
        return self.head(self.backbone.norm_f(h))  # type: ignore[no-any-return]


def test_unknown_architecture_error_names_class_and_how_to_pass_paths() -> None:
    """An unknown model fails loudly with its class name and the manual-path recipe."""
    with pytest.raises(UnsupportedArchitecture) as err:
        monitor.attach(_Mystery(), transport="memory://unused")
    msg = str(err.value)
    assert "_Mystery" in msg
    assert "blocks=" in msg and "final_norm=" in msg and "unembed=" in msg


def test_manual_paths_capture_every_state(memory_transport: Any) -> None:
    """Dotted paths passed by hand make an unknown architecture work, states included."""
    torch.manual_seed(0)
    model = _Mystery().eval()
    tap = monitor.attach(model, sample_rate=1.0, transport=memory_transport, blocks="backbone.stages",
                         final_norm="backbone.norm_f", unembed="head", positions="all")
    assert tap.parts.family == "custom" and tap.parts.n_blocks == 3
    ids = torch.randint(0, 50, (1, 5))
    with tap.request("manual"), torch.no_grad():
        logits = model(ids)
    assert tap.flush(5.0)
    (sample,) = drain_samples(memory_transport)
    tap.close()
    with torch.no_grad():
        h = model.embed(ids)
        expected = [h]
        for blk in model.backbone.stages:
            h = blk(h)
            expected.append(h)
    for layer, ref in enumerate(expected):
        assert torch.equal(torch.from_numpy(sample.hidden[layer].copy()), ref[0].half())
    assert sample.final_topk is not None
    assert int(sample.final_topk.ids[-1, 0]) == int(logits[0, -1].argmax())


def test_manual_path_that_does_not_exist_is_refused() -> None:
    """A wrong dotted path names itself in the error."""
    with pytest.raises(UnsupportedArchitecture, match="backbone.nope"):
        monitor.attach(_Mystery(), transport="memory://unused", blocks="backbone.nope")


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "gpt_neox"])
def test_checkpoint_fingerprint_equals_the_loaded_models(family: str, tmp_path: Any) -> None:
    """checkpoint_fingerprint() of a saved checkpoint equals model_fingerprint() of the model
    loaded from it, so bundles trained on the Hugging Face model are accepted from vLLM."""
    import transformers as tf

    from monitor.adapters import checkpoint_fingerprint, model_fingerprint

    make_tiny(family).save_pretrained(tmp_path)
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert checkpoint_fingerprint(tmp_path) == model_fingerprint(loaded)


def test_checkpoint_fingerprint_refuses_encoders_and_changes_with_weights(tmp_path: Any) -> None:
    """An encoder checkpoint is refused naming its model_type; other weights, another value."""
    from monitor.adapters import checkpoint_fingerprint

    make_tiny("bert").save_pretrained(tmp_path / "bert")
    with pytest.raises(UnsupportedArchitecture, match="bert"):
        checkpoint_fingerprint(tmp_path / "bert")
    make_tiny("llama", seed=0).save_pretrained(tmp_path / "a")
    make_tiny("llama", seed=1).save_pretrained(tmp_path / "b")
    assert checkpoint_fingerprint(tmp_path / "a") != checkpoint_fingerprint(tmp_path / "b")
