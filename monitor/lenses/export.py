"""Export the lens bank as one ONNX graph (opset 17).

Inputs
    ``hidden``       float32 [B, L, d]  states of the watched layers of B samples; the last is state N
    ``layer_index``  int64   [L]        positions of those layers in the bundle's layer table
                                        (so one graph serves every subset of layers that ends in N)

Outputs (B dynamic, L dynamic, k fixed at export)
    ``topk_ids`` int64 [B, L, k], ``topk_probs`` float32 [B, L, k], ``entropy`` float32 [B, L],
    ``kl_to_final`` float32 [B, L], ``final_top1_rank`` int64 [B, L],
    ``final_topk_ids`` int64 [B, k], ``final_topk_probs`` float32 [B, k], ``final_entropy`` [B],
    ``probe_<name>`` float32 [B, L, C] per probe (temperature folded into the weights); with ``debug=True`` also ``log_probs`` [B, L, V]
    (for the parity test only; the production graph keeps full-vocabulary tensors inside).

Initialisers ``probe_<name>@mean_weight`` / ``@mean_bias`` (no node reads them) carry the probes
trained on prompt-mean states; the runtime takes them out before it opens the session.

Full-vocabulary work is what makes a lens bank slow on CPU: the matrix product that produces the
logits is unavoidable (the roofline), every further pass over [B, L, V] is overhead. The graph
keeps that overhead small:

* the model's own distribution is computed first from state N (one [B, d] x [d, V] product):
  its top-k, entropy, probabilities ``p_f`` and top-1 token ``t``;
* the lens logits of layers 0..N-1 are produced **in vocabulary chunks** (``chunk`` columns,
  1024 by default), and every statistic is taken from a chunk while it is still in cache: its
  maximum and top-k (via the k best of 64 strided lanes, so ``TopK`` never scans a full row),
  ``sum exp(z - max)``, ``sum exp(z - max) z``, ``sum p_f z`` (for the KL) and the count of
  logits above ``z_t`` (for the rank); sums are taken over a strided middle axis first, which
  vectorises; the chunks are merged at the end with the usual log-sum-exp rescaling;
* entropy ``H = lse - sum(e z) / sum(e)``; ``KL(final || lens) = lse - H_f - sum(p_f z)``;
* ``z_t`` under each lens is a dot product with row ``t`` of the unembedding, so a logit counts
  toward the rank when it exceeds ``z_t`` by more than a rounding margin (1e-6 relative):
  exact except near-ties, 0 when the lens agrees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from monitor.lenses.bundle import MEAN_PROBE_SUFFIX
from monitor.lenses.model import ProbeSet, Translators
from monitor.lenses.readout import ReadoutSpec

OPSET = 17
DEFAULT_CHUNK = 1024  # vocabulary columns per chunk: [B*L, chunk] float32 logits stay in L2/L3 cache
GROUPS = 16  # a chunk is viewed as [GROUPS, chunk / GROUPS] for cheap strided reductions
PAD_LOGIT = -1e30  # logit of padding columns (exp underflows to 0, never in the top-k or the rank)
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


def self_sum(g: _Graph, x: str, shape3: str) -> str:
    """Sum over the last axis of [R, c] as [R, 1]: first over the strided groups (a vectorised
    reduction over a middle axis), then over the short lane axis."""
    r = g.one("ReduceSum", [g.one("Reshape", [x, shape3]), g.const_cached("ax_g", [1])], keepdims=0)
    return g.one("ReduceSum", [r, g.const_cached("ax_last", [-1])], keepdims=1)


class _Graph:
    """A tiny builder: unique node names, initialisers, constants."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._consts: set[str] = set()
        self._n = 0

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, name: str | None = None, **attrs: Any) -> list[str]:
        self._n += 1
        base = name or f"{op_type.lower()}_{self._n}"
        outs = [base] if n_out == 1 else [f"{base}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"n{self._n}_{op_type}", **attrs))
        return outs

    def one(self, op_type: str, inputs: list[str], name: str | None = None, **attrs: Any) -> str:
        return self.op(op_type, inputs, 1, name, **attrs)[0]

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value if value.flags.c_contiguous else value.copy(), name))
        return name

    def const(self, name: str, value: Any, dtype: type = np.int64) -> str:
        self._consts.add(name)
        return self.init(name, np.asarray(value, dtype=dtype))

    def const_cached(self, name: str, value: list[int], dtype: type = np.int64) -> str:
        return name if name in self._consts else self.const(name, value, dtype)


def build_bank_graph(
    readout: ReadoutSpec,
    translators: Translators,
    probes: tuple[ProbeSet, ...] = (),
    k: int = 5,
    *,
    debug: bool = False,
    chunk: int = DEFAULT_CHUNK,
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
        # (outputs named tr_*: the runtime replaces this block by per-layer products once the
        # watched layers are known, see monitor.lenses.runtime.specialise)
        m_sel = g.one("Gather", [mats, INPUT_LAYER_INDEX], name="tr_m", axis=0)  # [L, d, d]
        c_sel = g.one("Gather", [bias, INPUT_LAYER_INDEX], name="tr_c", axis=0)  # [L, d]
        xt = g.one("Transpose", [x], name="tr_xt", perm=[1, 0, 2])  # [L, B, d]
        xm = g.one("MatMul", [xt, m_sel], name="tr_xm")  # [L, B, d]
        xm = g.one("Add", [xm, g.one("Unsqueeze", [c_sel, ax_1], name="tr_cu")], name="tr_xa")
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

    # --- all logits from one matrix product: [B, L, V'] (V' = V padded to whole chunks) --------
    w_full = _arr(readout.weight).T.astype(np.float32)  # [d, V]
    bias_full = None if readout.bias is None else _arr(readout.bias).astype(np.float32)
    width = max(GROUPS, (min(chunk, vocab + GROUPS - 1) // GROUPS) * GROUPS)
    n_chunks = -(-vocab // width)
    pad_v = n_chunks * width
    lanes = width // GROUPS
    w_pad = np.zeros((d, pad_v), np.float32)
    w_pad[:, :vocab] = w_full
    z = g.one("MatMul", [s, g.init("unembed_t", w_pad)], name="logits")
    if bias_full is not None or pad_v > vocab:
        b_pad = np.full(pad_v, PAD_LOGIT, np.float32)  # padding columns: exp -> 0, never ranked
        b_pad[:vocab] = bias_full if bias_full is not None else 0.0
        z = g.one("Add", [z, g.init("unembed_bias", b_pad)])

    # --- the model's own distribution (the last row is state N): p_f and its top-1 token t ------
    zf = g.one("Gather", [z, g.const("last", -1)], axis=1)  # [B, V']
    p_f = g.one("Softmax", [zf], axis=-1)  # [B, V']
    _, f_top1 = g.op("TopK", [zf, g.const("one", [1])], 2, axis=-1, largest=1, sorted=1)  # [B, 1]
    # t's logit under every lens, gathered from the same logits: the rank count below is exact
    shape_z = g.one("Shape", [z])
    shape_bl = g.one("Slice", [shape_z, g.const("s0", [0]), g.const("s2", [2]), g.const("ax0", [0])])  # [B, L]
    shape_bl1 = g.one("Concat", [shape_bl, g.const("one1", [1])], axis=0)
    thr = g.one("GatherElements", [z, g.one("Expand", [g.one("Unsqueeze", [f_top1, ax_1]), shape_bl1])],
                axis=2)  # [B, L, 1]
    rows = g.const("rows", [-1, 1])
    thr = g.one("Reshape", [thr, rows])  # [R, 1], R = B * L

    # --- every row's statistics, chunk by chunk -------------------------------------------------
    # The logits are viewed as [R, V'] (plain per-row broadcasting). Each chunk is sliced once into
    # a buffer that stays in cache while its maximum (over 16 strided groups, then over the lanes),
    # partition sums, rank count and KL term are taken; the chunks are merged at the end with the
    # usual log-sum-exp rescaling.
    z2 = g.one("Reshape", [z, g.const("flat2", [-1, pad_v])])  # [R, V']
    shape3 = g.const("shape3", [0, GROUPS, lanes])
    shape_blw = g.one("Concat", [shape_bl, g.const("w1", [width])], axis=0)
    per_chunk = []
    for c0 in range(0, pad_v, width):
        lo, hi = g.const(f"c0_{c0}", [c0]), g.const(f"c1_{c0}", [c0 + width])
        zc = g.one("Slice", [z2, lo, hi, ax_last])  # [R, width]
        lane_max = g.one("ReduceMax", [g.one("Reshape", [zc, shape3])], axes=[1], keepdims=0)  # [R, lanes]
        m = g.one("ReduceMax", [lane_max], axes=[-1], keepdims=1)  # [R, 1]
        e = g.one("Exp", [g.one("Sub", [zc, m])])
        sum_e_c = self_sum(g, e, shape3)
        sum_ez_c = self_sum(g, g.one("Mul", [e, zc]), shape3)
        rank_c = self_sum(g, g.one("Cast", [g.one("Greater", [zc, thr])], to=TensorProto.FLOAT), shape3)
        pf_c = g.one("Unsqueeze", [g.one("Slice", [p_f, lo, hi, ax_last]), ax_last])  # [B, width, 1]
        cross_c = g.one("Reshape", [g.one("MatMul", [g.one("Reshape", [zc, shape_blw]), pf_c]), rows])
        # one [R, 5 + lanes] block per chunk, consumed in chunk order: ONNX Runtime's topological
        # order then finishes a chunk (while it is in cache) before it slices the next one
        per_chunk.append(g.one("Concat", [m, sum_e_c, sum_ez_c, rank_c, cross_c, lane_max], axis=-1))

    # --- merge the chunks ([R, C, 5 + lanes] -> [R, 1] -> [B, L]) -------------------------------
    n_stats = 5 + lanes
    stats = g.one("Reshape", [g.one("Concat", per_chunk, axis=-1), g.const("stats3", [0, n_chunks, n_stats])])
    m_all, sums, sums_ez, ranks, crosses, lane_all = g.op(
        "Split", [stats, g.const("split", [1, 1, 1, 1, 1, lanes])], 6, axis=2)
    ax2 = g.const_cached("ax2", [2])
    m_all, sums, sums_ez, ranks, crosses = (g.one("Squeeze", [t, ax2]) for t in (m_all, sums, sums_ez, ranks, crosses))
    m_max = g.one("ReduceMax", [m_all], axes=[-1], keepdims=1)  # [R, 1]
    scale = g.one("Exp", [g.one("Sub", [m_all, m_max])])  # [R, C]
    sum_e = g.one("ReduceSum", [g.one("Mul", [sums, scale]), ax_last], keepdims=1)
    sum_ez = g.one("ReduceSum", [g.one("Mul", [sums_ez, scale]), ax_last], keepdims=1)
    lse = g.one("Add", [m_max, g.one("Log", [sum_e])])  # [R, 1]
    ent = g.one("Reshape", [g.one("Sub", [lse, g.one("Div", [sum_ez, sum_e])]), shape_bl], name="entropy")
    h_f = g.one("Gather", [ent, "last"], axis=1, name="final_entropy")  # [B]
    cross = g.one("Reshape", [g.one("ReduceSum", [crosses, ax_last], keepdims=1), shape_bl])  # [B, L]
    # KL(final || lens) = lse_l - H_f - sum_v p_f(v) z_l(v)  (0 up to rounding at the last row)
    lse_bl = g.one("Reshape", [lse, shape_bl])
    kl = g.one("Sub", [g.one("Sub", [lse_bl, g.one("Unsqueeze", [h_f, ax_1])]), cross])
    g.one("Relu", [kl], name="kl_to_final")
    rank = g.one("ReduceSum", [ranks, ax_last], keepdims=1)
    g.one("Cast", [g.one("Reshape", [rank, shape_bl])], to=TensorProto.INT64, name="final_top1_rank")
    # top-k: the k best lanes hold the k best logits (a lane's max bounds its 16 members); gather
    # those lanes' members from the logits and take the top-k of these 16 k candidates.
    kk = min(k, n_chunks * lanes)
    lane_flat = g.one("Reshape", [lane_all, g.const("lanes_flat", [0, n_chunks * lanes])])  # [R, C * lanes]
    _, lane_top = g.op("TopK", [lane_flat, g.const("kk", [kk])], 2, axis=-1,
                       largest=1, sorted=1)  # [R, kk]; global lane index = chunk * lanes + lane
    chunk_of = g.one("Div", [lane_top, g.const("lanes", [lanes])])
    base = g.one("Add", [g.one("Mul", [chunk_of, g.const("width", [width])]),
                         g.one("Mod", [lane_top, "lanes"])])  # [R, kk]: column of each lane's member 0
    members = g.one("Add", [g.one("Unsqueeze", [base, g.const("ax_m2", [-2])]),
                            g.const("member_offsets", (np.arange(GROUPS) * lanes).reshape(GROUPS, 1))])
    members = g.one("Reshape", [members, g.const("flat", [0, GROUPS * kk])])  # [R, G*kk]
    top_v, top_p = g.op("TopK", [g.one("GatherElements", [z2, members], axis=1), g.const("k", [k])], 2, axis=-1,
                        largest=1, sorted=1)  # [R, k]
    shape_blk = g.one("Concat", [shape_bl, g.const("k1", [k])], axis=0)
    top_i = g.one("Reshape", [g.one("GatherElements", [members, top_p], axis=1), shape_blk], name="topk_ids")
    g.one("Reshape", [g.one("Exp", [g.one("Sub", [top_v, lse])]), shape_blk], name="topk_probs")
    g.one("Gather", [top_i, "last"], axis=1, name="final_topk_ids")
    g.one("Gather", ["topk_probs", "last"], axis=1, name="final_topk_probs")

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
        weight_t, bias_t = p.calibrated()  # the temperature folded in: the graph's softmax is calibrated
        pw = g.init(f"probe_{p.name}_weight", _arr(weight_t).astype(np.float32))  # [S, d, C]
        pb = g.init(f"probe_{p.name}_bias", _arr(bias_t).astype(np.float32))  # [S, C]
        if p.mean is not None:  # read in numpy on prompt-mean states (runtime.read_context), not by a node
            mw, mb = p.mean.calibrated()
            g.init(f"probe_{p.name}{MEAN_PROBE_SUFFIX}_weight", _arr(mw).astype(np.float32))
            g.init(f"probe_{p.name}{MEAN_PROBE_SUFFIX}_bias", _arr(mb).astype(np.float32))
        w_sel = g.one("Gather", [pw, INPUT_LAYER_INDEX], axis=0)
        b_sel = g.one("Gather", [pb, INPUT_LAYER_INDEX], axis=0)
        ht = g.one("Transpose", [INPUT_HIDDEN], perm=[1, 0, 2])  # [L, B, d]
        logit = g.one("Add", [g.one("MatMul", [ht, w_sel]), g.one("Unsqueeze", [b_sel, ax_1])])  # [L, B, C]
        prob = g.one("Softmax", [logit], axis=-1)
        g.one("Transpose", [prob], perm=[1, 0, 2], name=f"probe_{p.name}")
        outputs.append(helper.make_tensor_value_info(f"probe_{p.name}", TensorProto.FLOAT,
                                                     ["batch", "layers", len(p.labels)]))
    if debug:  # full log-probabilities, for the parity test only
        lp = g.one("Sub", [g.one("Slice", [z2, "s0", g.const("vocab", [vocab]), ax_last]), lse])
        g.one("Reshape", [lp, g.one("Concat", [shape_bl, g.const("v1", [vocab])], axis=0)], name="log_probs")
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
