"""The exported lens bank: ONNX graph vs PyTorch reference, bundle checks, runtime behaviour."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from monitor.adapters import collect_states, find_parts, model_fingerprint
from monitor.errors import (
    BundleChecksumError,
    BundleError,
    BundleFingerprintError,
    BundlePathError,
    ConfigError,
    UnsupportedArchitecture,
)
from monitor.lenses.bundle import MANIFEST, verify_bundle
from monitor.lenses.export import OPSET, build_bank_graph
from monitor.lenses.model import ProbeSet, TorchLensBank, Translators
from monitor.lenses.readings import SampleReadings
from monitor.lenses.readout import readout_spec
from monitor.lenses.runtime import DISABLED_OPTIMIZERS, LensBank, specialise
from monitor.lenses.writer import export_logit_lens, write_bundle
from tests.conftest import make_tiny


def random_lens(model: torch.nn.Module, seed: int = 0) -> tuple[Translators, tuple[ProbeSet, ...]]:
    """Random near-identity translators (identity at state N) and two random probes."""
    parts = find_parts(model)
    gen = torch.Generator().manual_seed(seed)
    s, d = parts.n_states, parts.hidden_size
    mat = torch.eye(d) + 0.2 * torch.randn(s, d, d, generator=gen) / d**0.5
    bias = 0.1 * torch.randn(s, d, generator=gen)
    mat[-1], bias[-1] = torch.eye(d), 0.0
    layers = tuple(range(s))
    probes = (
        ProbeSet("topic", ("a", "b", "c"), layers, torch.randn(s, d, 3, generator=gen), torch.randn(s, 3, generator=gen)),
        ProbeSet("lang", ("en", "de"), layers, torch.randn(s, d, 2, generator=gen), torch.randn(s, 2, generator=gen)),
    )
    return Translators("tuned", layers, mat, bias), probes


def states_of(model: torch.nn.Module, batch: int = 3, seq: int = 6, seed: int = 0) -> np.ndarray:
    """Real hidden states [B, S, d] (last position) of a model on random tokens."""
    parts = find_parts(model)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, parts.vocab_size or 2, (batch, seq), generator=gen)
    s = collect_states(model, parts, ids)  # [S, B, T, d]
    return s[:, :, -1].permute(1, 0, 2).contiguous().numpy()


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    model = make_tiny("llama")
    tr, probes = random_lens(model)
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    write_bundle(out, model, tr, probes, model_name="tiny-llama", k=4)
    return out, model


def compare(onnx_out: dict[str, np.ndarray], ref) -> None:  # noqa: ANN001
    for name in ("entropy", "kl_to_final", "topk_probs", "final_topk_probs", "final_entropy"):
        np.testing.assert_allclose(onnx_out[name], getattr(ref, name), atol=2e-5, rtol=1e-4, err_msg=name)
    for name in ("topk_ids", "final_top1_rank", "final_topk_ids"):
        np.testing.assert_array_equal(onnx_out[name], getattr(ref, name), err_msg=name)
    for name, arr in ref.probes.items():
        np.testing.assert_allclose(onnx_out[f"probe_{name}"], arr, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(("family", "chunk"), [("llama", 1024), ("gpt2", 1024), ("gpt_neox", 1024),
                                               ("qwen2", 1024), ("llama", 48), ("gpt2", 32)])
def test_onnx_graph_matches_torch_reference(family: str, chunk: int) -> None:
    """For every decoder family, and with the vocabulary split into several (padded) chunks, the
    ONNX graph's readings equal the plain PyTorch bank's."""
    import onnxruntime as ort

    model = make_tiny(family)
    parts = find_parts(model)
    tr, probes = random_lens(model)
    spec = readout_spec(parts)
    graph = build_bank_graph(spec, tr, probes, k=4, chunk=chunk)
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    h = states_of(model)
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, {"hidden": h, "layer_index": np.arange(parts.n_states)}), strict=True))
    compare(got, TorchLensBank(spec, tr, probes, k=4).read_arrays(h))


def test_torch_reference_uses_the_models_own_readout() -> None:
    """The reference bank's log-probs equal log_softmax of the model's own final norm + LM head."""
    model = make_tiny("gpt2")
    parts = find_parts(model)
    tr, _ = random_lens(model)
    h = torch.from_numpy(states_of(model))
    ref = TorchLensBank(readout_spec(parts), tr).log_probs(h)
    own = parts.final_logits(tr.apply(h)).log_softmax(-1)
    torch.testing.assert_close(ref, own, atol=1e-5, rtol=1e-5)


def test_readout_refuses_a_norm_it_cannot_reproduce() -> None:
    """A final norm that is neither RMSNorm nor LayerNorm is refused with UnsupportedArchitecture."""

    class ScaleNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x / x.norm(dim=-1, keepdim=True)

    model = make_tiny("llama")
    model.model.norm = ScaleNorm()
    with pytest.raises(UnsupportedArchitecture, match="neither an RMSNorm nor a LayerNorm"):
        readout_spec(find_parts(model))


def test_readout_refuses_a_gemma_style_norm() -> None:
    """An RMSNorm whose gain is applied as (1 + w) fails the numerical check instead of being misread."""
    model = make_tiny("llama")
    norm = model.model.norm
    with torch.no_grad():
        norm.weight.normal_()
    orig = norm.forward
    norm.forward = lambda x: orig(x) / norm.weight * (1 + norm.weight)  # type: ignore[method-assign]
    with pytest.raises(UnsupportedArchitecture, match="not 'norm \\+ linear'"):
        readout_spec(find_parts(model))


def test_graph_keeps_full_vocabulary_inside_and_states_its_opset(tiny_bundle) -> None:  # noqa: ANN001
    """No graph output has a vocabulary-sized dimension, the batch is dynamic, the opset is 17."""
    path, model = tiny_bundle
    graph = onnx.load(str(path / "bank.onnx"))
    assert graph.opset_import[0].version == OPSET == 17
    vocab = find_parts(model).vocab_size
    for out in graph.graph.output:
        dims = [d.dim_value for d in out.type.tensor_type.shape.dim]
        assert vocab not in dims, out.name
        assert out.type.tensor_type.shape.dim[0].dim_param == "batch", out.name
    assert json.loads((path / MANIFEST).read_text())["graph"]["opset"] == 17


def test_lens_bank_reads_typed_readings(tiny_bundle) -> None:  # noqa: ANN001
    """LensBank.read returns one SampleReadings per sample with every layer and probe filled in."""
    path, model = tiny_bundle
    bank = LensBank.load(path, expected_fingerprint=model_fingerprint(model), threads=1)
    h = states_of(model, batch=2)
    readings = bank.read(h)
    assert len(readings) == 2 and all(isinstance(r, SampleReadings) for r in readings)
    r = readings[0]
    assert [layer.layer for layer in r.layers] == list(bank.layers) == [0, 1, 2]
    assert r.probe_labels == {"topic": ("a", "b", "c"), "lang": ("en", "de")}
    assert len(r.layers[1].probes["topic"]) == 3 and abs(sum(r.layers[1].probes["lang"]) - 1) < 1e-5
    assert r.layers[-1].kl_to_final == pytest.approx(0.0, abs=1e-5) and r.layers[-1].final_top1_rank == 0
    assert r.layers[-1].topk_ids == r.final_topk_ids
    assert len(r.final_topk_ids) == bank.k == 4


def test_lens_bank_matches_reference_and_accepts_float16(tiny_bundle) -> None:  # noqa: ANN001
    """The loaded bank equals the PyTorch reference, and float16 input reads like its float32 cast."""
    path, model = tiny_bundle
    bank = LensBank.load(path)
    tr, probes = random_lens(model)
    h = states_of(model, batch=5).astype(np.float16)
    out = bank.read_arrays(h)
    ref = TorchLensBank(readout_spec(find_parts(model)), tr, probes, k=4).read_arrays(h.astype(np.float32))
    compare({**{f: getattr(out, f) for f in ("entropy", "kl_to_final", "topk_probs", "final_topk_probs",
                                                "final_entropy", "topk_ids", "final_top1_rank", "final_topk_ids")},
             **{f"probe_{k}": v for k, v in out.probes.items()}}, ref)


def test_context_probes_equal_the_graphs_probes_on_the_same_states(tiny_bundle) -> None:  # noqa: ANN001
    """read_context (numpy, weights taken from the verified graph) reads exactly what the ONNX
    graph's probes read on the same states, also on a layer subset; the pipeline's read adds them
    as '<probe>@mean' with their labels."""
    from monitor.pipeline import read

    path, _ = tiny_bundle
    h = states_of(tiny_bundle[1], batch=3)
    for layers in (None, [1, 2]):
        bank = LensBank.load(path, layers=layers)
        sel = h if layers is None else h[:, layers]
        ctx = bank.read_context(sel)
        out = bank.read_arrays(sel)
        assert set(ctx) == {"topic@mean", "lang@mean"}
        for name, probs in out.probes.items():
            np.testing.assert_allclose(ctx[f"{name}@mean"], probs, atol=1e-5)
    both = read(bank, sel, sel[::-1].copy())
    labels = both.probe_labels
    assert labels["lang@mean"] == ("en", "de") and labels["topic"] == ("a", "b", "c")
    np.testing.assert_allclose(both.probes["topic@mean"], bank.read_context(sel[::-1].copy())["topic@mean"])
    plain = read(bank, sel)
    plain_labels = plain.probe_labels
    assert set(plain.probes) == set(plain_labels) == {"topic", "lang"}


def test_batches_are_split_and_empty_batches_answered(tiny_bundle) -> None:  # noqa: ANN001
    """A batch larger than max_batch is split without changing results; an empty batch is answered."""
    path, model = tiny_bundle
    h = states_of(model, batch=5)
    whole = LensBank.load(path, max_batch=64).read_arrays(h)
    split = LensBank.load(path, max_batch=2).read_arrays(h)
    np.testing.assert_array_equal(whole.topk_ids, split.topk_ids)
    np.testing.assert_allclose(whole.kl_to_final, split.kl_to_final, atol=1e-6)
    empty = split.__class__  # BankOutput
    out = LensBank.load(path).read_arrays(h[:0])
    assert isinstance(out, empty) and out.batch_size == 0 and out.probes["topic"].shape == (0, 3, 3)


def test_threads_split_a_batch_across_concurrent_runs_with_the_same_results(tiny_bundle) -> None:  # noqa: ANN001
    """threads=N > 1 reads a batch as N concurrent single-threaded runs, in order, same readings."""
    path, model = tiny_bundle
    h = states_of(model, batch=7)
    one = LensBank.load(path, threads=1)
    three = LensBank.load(path, threads=3)
    assert (one.workers, three.workers) == (1, 3)
    a, b = one.read_arrays(h), three.read_arrays(h)
    np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    np.testing.assert_allclose(a.entropy, b.entropy, atol=1e-6)
    np.testing.assert_allclose(a.probes["topic"], b.probes["topic"], atol=1e-6)
    single = three.read_arrays(h[3:4])  # one sample: no split
    np.testing.assert_array_equal(single.topk_ids, a.topk_ids[3:4])


def test_warm_up_meets_every_batch_size_up_to_max_batch(tiny_bundle) -> None:  # noqa: ANN001
    """warm_up runs the session once or more at each batch size 1..max_batch (the arena meets every
    shape before real traffic), and the bank reads normally afterwards."""
    path, model = tiny_bundle
    bank = LensBank.load(path, max_batch=6)
    seen: list[int] = []
    run = bank._run
    bank._run = lambda h: (seen.append(h.shape[0]), run(h))[1]  # type: ignore[method-assign]
    assert bank.warm_up() >= 0.0
    assert set(seen) == set(range(1, 7)) and seen[0] == 6
    h = states_of(model, batch=2)
    np.testing.assert_array_equal(bank.read_arrays(h).topk_ids, LensBank.load(path).read_arrays(h).topk_ids)


def test_layer_subset_reads_the_same_as_the_full_bank(tiny_bundle) -> None:  # noqa: ANN001
    """A bank loaded for a subset of layers gives exactly the full bank's readings of those layers."""
    path, model = tiny_bundle
    h = states_of(model, batch=3)
    full = LensBank.load(path).read_arrays(h)
    sub = LensBank.load(path, layers=(1, 2))
    out = sub.read_arrays(h[:, [1, 2]])
    assert sub.layers == (1, 2)
    np.testing.assert_array_equal(out.topk_ids, full.topk_ids[:, 1:])
    np.testing.assert_allclose(out.kl_to_final, full.kl_to_final[:, 1:], atol=1e-6)
    np.testing.assert_allclose(out.probes["topic"], full.probes["topic"][:, 1:], atol=1e-7)
    with pytest.raises(ConfigError, match="ending with the final state 2"):
        LensBank.load(path, layers=(0, 1))


def test_wrong_input_shape_is_refused_with_the_expected_shape(tiny_bundle) -> None:  # noqa: ANN001
    """Hidden states of the wrong shape raise a ValueError that names the expected shape."""
    path, _ = tiny_bundle
    bank = LensBank.load(path)
    with pytest.raises(ValueError, match=r"\[B, 3, 32\]"):
        bank.read_arrays(np.zeros((2, 2, 32), np.float32))


def test_cpu_provider_is_reported_and_cuda_demand_is_checked(tiny_bundle) -> None:  # noqa: ANN001
    """On a machine where CUDA does not run, 'auto' reports the CPU provider and 'cuda' is refused."""
    import onnxruntime as ort

    path, _ = tiny_bundle
    bank = LensBank.load(path, providers="auto")
    assert bank.provider == bank.session.get_providers()[0]
    if bank.provider != "CUDAExecutionProvider":
        assert bank.provider == "CPUExecutionProvider"
        with pytest.raises(ConfigError, match="CUDA was requested"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the CPU build of onnxruntime warns about the unknown provider
            LensBank.load(path, providers="cuda")
    assert LensBank.load(path, providers="cpu").provider == "CPUExecutionProvider"
    assert "CPUExecutionProvider" in ort.get_available_providers()


def test_int8_mode_keeps_the_readings_close(tiny_bundle) -> None:  # noqa: ANN001
    """The int8 cheaper mode loads, reports its precision and mostly agrees with float32 on top-1."""
    path, model = tiny_bundle
    h = states_of(model, batch=8, seq=8)
    full = LensBank.load(path).read_arrays(h)
    q8 = LensBank.load(path, precision="int8")
    out = q8.read_arrays(h)
    assert q8.precision == "int8"
    assert (out.topk_ids[:, :, 0] == full.topk_ids[:, :, 0]).mean() > 0.8
    np.testing.assert_allclose(out.entropy, full.entropy, atol=0.1)
    with pytest.raises(ConfigError, match="precision"):
        LensBank.load(path, precision="fp4")


# ------------------------------------------------------------------------------- bundle checks
def copy_bundle(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bundle_with_modified_file_is_refused(tiny_bundle, tmp_path: Path) -> None:  # noqa: ANN001
    """Changing one byte of the graph makes loading fail with BundleChecksumError naming the file."""
    path = copy_bundle(tiny_bundle[0], tmp_path / "b")
    data = bytearray((path / "bank.onnx").read_bytes())
    data[-10] ^= 0xFF
    (path / "bank.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleChecksumError, match="bank.onnx has sha256"):
        LensBank.load(path)


def test_bundle_missing_file_is_refused(tiny_bundle, tmp_path: Path) -> None:  # noqa: ANN001
    """A file listed in the manifest but absent is refused as a checksum failure."""
    path = copy_bundle(tiny_bundle[0], tmp_path / "b")
    (path / "weights.safetensors").unlink()
    with pytest.raises(BundleChecksumError, match="weights.safetensors is listed in the manifest but missing"):
        verify_bundle(path)


def test_bundle_for_another_model_is_refused(tiny_bundle) -> None:  # noqa: ANN001
    """A bundle whose fingerprint differs from the served model's is refused, naming both."""
    path, model = tiny_bundle
    other = make_tiny("llama", seed=1)
    with pytest.raises(BundleFingerprintError, match=model_fingerprint(other)):
        LensBank.load(path, expected_fingerprint=model_fingerprint(other))
    assert LensBank.load(path, expected_fingerprint=model_fingerprint(model)).fingerprint == model_fingerprint(model)


@pytest.mark.parametrize("bad", ["../outside.onnx", "/etc/passwd", "sub/../../x", "C:/x.onnx"])
def test_bundle_paths_leaving_the_directory_are_refused(tiny_bundle, tmp_path: Path, bad: str) -> None:  # noqa: ANN001
    """Manifest paths that are absolute or climb out of the bundle are refused with BundlePathError."""
    path = copy_bundle(tiny_bundle[0], tmp_path / "b")
    doc = json.loads((path / MANIFEST).read_text())
    doc["files"][bad] = {"sha256": "0" * 64}
    (path / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(BundlePathError):
        LensBank.load(path)


def test_bundle_symlink_escaping_the_directory_is_refused(tiny_bundle, tmp_path: Path) -> None:  # noqa: ANN001
    """A listed file that is a symlink to outside the bundle is refused with BundlePathError."""
    path = copy_bundle(tiny_bundle[0], tmp_path / "b")
    outside = tmp_path / "outside.safetensors"
    (path / "weights.safetensors").rename(outside)
    os.symlink(outside, path / "weights.safetensors")
    with pytest.raises(BundlePathError, match="outside the bundle directory"):
        verify_bundle(path)


def test_not_a_bundle_is_refused_clearly(tmp_path: Path) -> None:
    """A directory without a manifest, or with a foreign schema, raises BundleError saying so."""
    with pytest.raises(BundleError, match="no manifest.json"):
        LensBank.load(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"schema": "other/9"}))
    with pytest.raises(BundleError, match="schema 'other/9'"):
        LensBank.load(tmp_path)


def test_manifest_records_identity_checksums_and_a_content_id(tiny_bundle) -> None:  # noqa: ANN001
    """The manifest holds model fingerprint, sizes, layers, labels, per-file sha256 and a content-derived id."""
    path, model = tiny_bundle
    doc = json.loads((path / MANIFEST).read_text())
    parts = find_parts(model)
    assert doc["model"]["fingerprint"] == model_fingerprint(model)
    assert doc["model"]["hidden_size"] == 32 and doc["model"]["vocab_size"] == 128
    assert doc["lens"]["layers"] == [0, 1, 2] and doc["lens"]["final_layer"] == parts.n_blocks
    assert [p["labels"] for p in doc["probes"]] == [["a", "b", "c"], ["en", "de"]]
    assert set(doc["files"]) == {"bank.onnx", "weights.safetensors"}
    assert doc["bundle_id"].startswith("lwb-") and doc["created_at"].endswith("Z")


def test_weights_round_trip_keeps_probe_metrics(tiny_bundle, tmp_path: Path) -> None:  # noqa: ANN001
    """Re-exporting a bundle from its weights keeps translators, probe labels and probe metrics."""
    from monitor.lenses.bundle import verify_bundle
    from monitor.lenses.writer import load_weights

    path, model = tiny_bundle
    b = verify_bundle(path)
    tr, probes = load_weights(b.root, b.manifest)
    probes[0].metrics["heldout_accuracy"] = [0.5, 0.6, 0.7]
    write_bundle(tmp_path / "again", model, tr, probes, k=4)
    b2 = verify_bundle(tmp_path / "again")
    tr2, probes2 = load_weights(b2.root, b2.manifest)
    torch.testing.assert_close(tr2.matrix, tr.matrix)
    assert probes2[0].metrics["heldout_accuracy"] == [0.5, 0.6, 0.7] and probes2[1].labels == ("en", "de")


def test_logit_lens_bundle_on_tiny_model_has_no_translators(tmp_path: Path) -> None:
    """The logit-lens bundle's graph has no translator weights and reads like the model's own head."""
    model = make_tiny("gpt2")
    export_logit_lens(tmp_path / "logit", model)
    graph = onnx.load(str(tmp_path / "logit" / "bank.onnx"))
    assert not [i for i in graph.graph.initializer if i.name.startswith("translator")]
    bank = LensBank.load(tmp_path / "logit")
    h = states_of(model)
    out = bank.read_arrays(h)
    logits = find_parts(model).final_logits(torch.from_numpy(h))
    np.testing.assert_array_equal(out.topk_ids[:, :, 0], logits.argmax(-1).numpy())


# ------------------------------------------------------------------------------- real model
def exact_log_probs(parts: Any, x: torch.Tensor) -> np.ndarray:
    """The model's final norm and LM head applied in float64 (the model itself is untouched)."""
    norm, head = parts.final_norm, parts.unembed
    x64 = x.double()
    if isinstance(norm, torch.nn.LayerNorm):
        y = torch.nn.functional.layer_norm(x64, norm.normalized_shape, norm.weight.double(),
                                           None if norm.bias is None else norm.bias.double(), norm.eps)
    else:  # RMSNorm (Llama family)
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * norm.weight.double()
    z = y @ head.weight.double().T
    if getattr(head, "bias", None) is not None:
        z = z + head.bias.double()
    return z.log_softmax(-1).detach().numpy()


@pytest.mark.real_model
def test_parity_onnx_vs_pytorch_on_smollm2(reference_model) -> None:  # noqa: ANN001
    """On real SmolLM2 states, ONNX Runtime's log-probs match the model's own read-out within 1e-4
    and the top-k lists are identical except at exact near-ties."""
    import onnxruntime as ort

    model, tok = reference_model
    parts = find_parts(model)
    tr, _ = random_lens(model)
    texts = ["The capital of France is", "def fibonacci(n):\n    return", "Der schnelle braune Fuchs"]
    states = []
    for t in texts:
        ids = tok(t, return_tensors="pt").input_ids
        states.append(collect_states(model, parts, ids)[:, 0, -1])
    h = torch.stack(states)  # [B, S, d]
    for lens in (tr, Translators.identity(tr.layers, parts.hidden_size)):
        # the production path: layers baked in at load (per-layer translator products)
        graph = specialise(build_bank_graph(readout_spec(parts), lens, (), k=10, debug=True),
                           np.arange(parts.n_states))
        sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"],
                                    disabled_optimizers=DISABLED_OPTIMIZERS)
        names = [o.name for o in sess.get_outputs()]
        got = dict(zip(names, sess.run(None, {"hidden": h.numpy()}), strict=True))
        with torch.no_grad():  # the PyTorch reference: the model's own final norm and LM head
            ref = parts.final_logits(lens.apply(h)).float().log_softmax(-1)
        # Both sides are float32 with different summation orders (logits up to ~100 in size, 49k
        # of them): each is within 1e-4 of the exact value, their difference can reach ~1.1e-4.
        # So ONNX Runtime is held to 1e-4 against an exact float64 read-out (the model's own
        # final norm and LM head in float64) and to 2e-4 against the float32 PyTorch one.
        assert np.abs(got["log_probs"] - exact_log_probs(parts, lens.apply(h))).max() <= 1e-4
        assert np.abs(got["log_probs"] - ref.numpy()).max() <= 2e-4
        ref_top = ref.topk(10, dim=-1)
        ids = got["topk_ids"]
        mismatch = ids != ref_top.indices.numpy()
        if mismatch.any():  # only allowed where the two candidates' log-probs tie within 1e-5
            lp = ref.numpy()
            b, l_, j = np.nonzero(mismatch)
            gap = np.abs(lp[b, l_, ids[b, l_, j]] - lp[b, l_, ref_top.indices.numpy()[b, l_, j]])
            assert (gap <= 1e-5).all()
        ref_final = ref[:, -1]
        kl = (ref_final.exp()[:, None] * (ref_final[:, None] - ref)).sum(-1)
        np.testing.assert_allclose(got["kl_to_final"], kl.clamp_min(0).numpy(), atol=5e-4, rtol=1e-4)
        t = ref_final.argmax(-1)
        at = ref.gather(-1, t[:, None, None].expand(-1, ref.shape[1], 1))
        rank = (ref > at).sum(-1).numpy()
        near = ((ref - at).abs() < 1e-5).sum(-1).numpy()  # ties within rounding may go either way
        assert (np.abs(got["final_top1_rank"] - rank) <= near).all()
