"""Export the lens bank as one ONNX graph (opset 17).

Inputs
    ``hidden``       float32 [B, L, d]  states of the watched layers of B samples; the last is state N
    ``layer_index``  int64   [L]        positions of those layers in the bundle's layer table
                                        (so one graph serves every subset of layers that ends in N)

Outputs (B dynamic, L dynamic, k fixed at export)
    ``topk_ids`` int64 [B, L, k], ``topk_probs`` float32 [B, L, k], ``entropy`` float32 [B, L],
    ``kl_to_final`` float32 [B, L], ``final_top1_rank`` int64 [B, L],
    ``final_topk_ids`` int64 [B, k], ``final_topk_probs`` float32 [B, k], ``final_entropy`` [B],
    ``probe_<name>`` float32 [B, L, C] per probe; with ``debug=True`` also ``log_probs`` [B, L, V]
    (for the parity test only; the production graph keeps full-vocabulary tensors inside).

The arithmetic avoids every full-vocabulary pass it can (they, not the matrix product, are what
makes a naive bank slow on CPU):

* the maximum of each row comes from ``TopK`` (needed anyway), the row's log-partition from one
  ``Exp`` + ``ReduceSum``;
* entropy ``H = lse - sum(e * z) / sum(e)`` with ``e = exp(z - max)``;
* ``KL(final || lens) = lse_l - H_f - p_f . z_l``, and ``p_f . z_l = s_l . (W^T p_f)``: one
  [B, V] x [V, d] product per batch instead of a pass over [B, L, V];
* the final top-1 token's logit under each lens is gathered from the logits, so its rank (the
  number of strictly larger logits) is exact, 0 when the lens agrees.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from monitor.lenses.model import ProbeSet, Translators
from monitor.lenses.readout import ReadoutSpec

OPSET = 17
INPUT_HIDDEN = "hidden"
INPUT_LAYER_INDEX = "layer_index"
OUTPUTS = (
    "topk_ids",
    "topk_probs",
    "entropy",
    "kl_to_final",
    "final_top1_rank",
    "final_topk_ids",
    "final_topk_probs",
    "final_entropy",
)


def _arr(t: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().numpy()
    return np.ascontiguousarray(t)


class _Graph:
    """A tiny builder: unique node names, initialisers, constants."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, name: str | None = None, **attrs: object) -> list[str]:
        self._n += 1
        base = name or f"{op_type.lower()}_{self._n}"
        outs = [base] if n_out == 1 else [f"{base}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"n{self._n}_{op_type}", **attrs))
        return outs

    def one(self, op_type: str, inputs: list[str], name: str | None = None, **attrs: object) -> str:
        return self.op(op_type, inputs, 1, name, **attrs)[0]

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value if value.flags.c_contiguous else value.copy(), name))
        return name

    def const(self, name: str, value: list[int] | list[float] | np.ndarray, dtype: type = np.int64) -> str:
        return self.init(name, np.asarray(value, dtype=dtype))


def build_bank_graph(
    readout: ReadoutSpec,
    translators: Translators,
    probes: tuple[ProbeSet, ...] = (),
    k: int = 5,
    *,
    debug: bool = False,
) -> onnx.ModelProto:
    """Build the lens-bank ONNX model (weights embedded as initialisers)."""
    d, vocab = readout.hidden_size, readout.vocab_size
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in 1..{vocab}, got {k}")
    g = _Graph()
    ax_last = g.const("ax_last", [-1])
    ax_1 = g.const("ax_1", [1])

    # --- translators: gather the watched layers' maps, x' = x @ M + c ------------------------
    x = INPUT_HIDDEN
    if translators.kind != "logit":
        mats = g.init("translator_matrix", _arr(translators.matrix).astype(np.float32))
        bias = g.init("translator_bias", _arr(translators.bias).astype(np.float32))
        m_sel = g.one("Gather", [mats, INPUT_LAYER_INDEX], axis=0)  # [L, d, d]
        c_sel = g.one("Gather", [bias, INPUT_LAYER_INDEX], axis=0)  # [L, d]
        xt = g.one("Transpose", [x], perm=[1, 0, 2])  # [L, B, d]
        xm = g.one("MatMul", [xt, m_sel])  # [L, B, d]
        xm = g.one("Add", [xm, g.one("Unsqueeze", [c_sel, ax_1])])
        x = g.one("Transpose", [xm], perm=[1, 0, 2], name="translated")  # [B, L, d]

    # --- gain-free final normalisation -------------------------------------------------------
    if readout.norm in ("rms", "layer"):
        eps = g.const("norm_eps", np.float32(readout.eps), np.float32)
        xc = x
        if readout.norm == "layer":
            xc = g.one("Sub", [x, g.one("ReduceMean", [x], axes=[-1], keepdims=1)])
        ms = g.one("ReduceMean", [g.one("Mul", [xc, xc])], axes=[-1], keepdims=1)
        s = g.one("Div", [xc, g.one("Sqrt", [g.one("Add", [ms, eps])])], name="normed")
    else:
        s = x

    # --- logits stay inside the graph ---------------------------------------------------------
    w_t = g.init("unembed_t", _arr(readout.weight).T.astype(np.float32))  # [d, V]
    z = g.one("MatMul", [s, w_t], name="logits")  # [B, L, V]
    if readout.bias is not None:
        z = g.one("Add", [z, g.init("unembed_bias", _arr(readout.bias).astype(np.float32))])

    top_v, top_i = g.op("TopK", [z, g.const("k", [k])], 2, name="topk", axis=-1, largest=1, sorted=1)
    # One fused Softmax pass; the log-partition follows from the top-1 logit and its probability
    # (q_max >= 1/V, so the log is well conditioned).
    q = g.one("Softmax", [z], axis=-1)  # [B, L, V]
    top1 = g.one("Slice", [top_i, g.const("s0", [0]), g.const("s1", [1]), ax_last])  # [B, L, 1]
    q_max = g.one("GatherElements", [q, top1], axis=2)  # [B, L, 1]
    z_max = g.one("Slice", [top_v, "s0", "s1", ax_last])
    lse = g.one("Sub", [z_max, g.one("Log", [q_max])])  # [B, L, 1]
    qz = g.one("ReduceSum", [g.one("Mul", [q, z]), ax_last], keepdims=0)  # [B, L]: sum_v q(v) z(v)
    lse2 = g.one("Squeeze", [lse, ax_last])  # [B, L]
    entropy = g.one("Sub", [lse2, qz], name="entropy")
    g.one("Exp", [g.one("Sub", [top_v, lse])], name="topk_probs")
    g.one("Identity", [top_i], name="topk_ids")

    # --- the model's own output: the last watched state is state N ----------------------------
    last = g.const("last", -1)
    p_f = g.one("Gather", [q, last], axis=1)  # [B, V]
    f_ent = g.one("Gather", [entropy, last], axis=1)  # [B]
    g.one("Identity", [f_ent], name="final_entropy")
    g.one("Gather", [top_i, last], axis=1, name="final_topk_ids")
    g.one("Gather", ["topk_probs", last], axis=1, name="final_topk_probs")

    # KL(final || lens_l) = lse_l - H_f - sum_v p_f(v) z_l(v): one batched product z @ p_f
    cross = g.one("MatMul", [z, g.one("Unsqueeze", [p_f, ax_last])])  # [B, L, 1]
    cross = g.one("Squeeze", [cross, ax_last])
    kl = g.one("Sub", [lse2, g.one("Unsqueeze", [f_ent, ax_1])])
    kl = g.one("Sub", [kl, cross])
    g.one("Relu", [kl], name="kl_to_final")

    # rank of the final top-1 under each lens = number of strictly larger logits
    f_top1 = g.one("Gather", [top1, g.const("last1", [-1])], axis=1)  # [B, 1, 1]
    shape_bl1 = g.one("Concat", [g.one("Slice", [g.one("Shape", [z]), g.const("r0", [0]), g.const("r2", [2])]),
                                 g.const("one1", [1])], axis=0)
    idx = g.one("Expand", [f_top1, shape_bl1])  # [B, L, 1]
    z_at = g.one("GatherElements", [z, idx], axis=2)  # [B, L, 1]
    above = g.one("Cast", [g.one("Greater", [z, z_at])], to=TensorProto.FLOAT)
    rank = g.one("ReduceSum", [above, ax_last], keepdims=0)
    g.one("Cast", [rank], name="final_top1_rank", to=TensorProto.INT64)

    outputs = [
        helper.make_tensor_value_info("topk_ids", TensorProto.INT64, ["batch", "layers", k]),
        helper.make_tensor_value_info("topk_probs", TensorProto.FLOAT, ["batch", "layers", k]),
        helper.make_tensor_value_info("entropy", TensorProto.FLOAT, ["batch", "layers"]),
        helper.make_tensor_value_info("kl_to_final", TensorProto.FLOAT, ["batch", "layers"]),
        helper.make_tensor_value_info("final_top1_rank", TensorProto.INT64, ["batch", "layers"]),
        helper.make_tensor_value_info("final_topk_ids", TensorProto.INT64, ["batch", k]),
        helper.make_tensor_value_info("final_topk_probs", TensorProto.FLOAT, ["batch", k]),
        helper.make_tensor_value_info("final_entropy", TensorProto.FLOAT, ["batch"]),
    ]

    # --- concept probes on the raw states ------------------------------------------------------
    for p in probes:
        if tuple(p.layers) != tuple(translators.layers):
            raise ValueError(f"probe {p.name!r} covers layers {p.layers}, the bank {translators.layers}")
        pw = g.init(f"probe_{p.name}_weight", _arr(p.weight).astype(np.float32))  # [S, d, C]
        pb = g.init(f"probe_{p.name}_bias", _arr(p.bias).astype(np.float32))  # [S, C]
        w_sel = g.one("Gather", [pw, INPUT_LAYER_INDEX], axis=0)
        b_sel = g.one("Gather", [pb, INPUT_LAYER_INDEX], axis=0)
        ht = g.one("Transpose", [INPUT_HIDDEN], perm=[1, 0, 2])  # [L, B, d]
        logit = g.one("Add", [g.one("MatMul", [ht, w_sel]), g.one("Unsqueeze", [b_sel, ax_1])])  # [L, B, C]
        prob = g.one("Softmax", [logit], axis=-1)
        g.one("Transpose", [prob], perm=[1, 0, 2], name=f"probe_{p.name}")
        outputs.append(helper.make_tensor_value_info(f"probe_{p.name}", TensorProto.FLOAT,
                                                     ["batch", "layers", len(p.labels)]))
    if debug:
        g.one("Sub", [z, lse], name="log_probs")
        outputs.append(helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, ["batch", "layers", vocab]))

    inputs = [
        helper.make_tensor_value_info(INPUT_HIDDEN, TensorProto.FLOAT, ["batch", "layers", d]),
        helper.make_tensor_value_info(INPUT_LAYER_INDEX, TensorProto.INT64, ["layers"]),
    ]
    graph = helper.make_graph(g.nodes, "layerwatch_lens_bank", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="layerwatch", doc_string="layerwatch lens bank")
    model.ir_version = 8  # readable by onnxruntime >= 1.14
    return model


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save ``model`` with its weights inside the file when they fit the 2 GB protobuf limit."""
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size < 1_900_000_000:
        onnx.save_model(model, str(path))
    else:  # pragma: no cover - models larger than ours
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
