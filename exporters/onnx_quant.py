"""Rewrite an exported float ONNX graph so quantized weights stay quantized.

The float twin of a converted model (see `exporters.onnx`) exports every quantized
weight as one float initializer with a known name. This module replaces those
initializers:

- `matmulnbits`: a weight used only as the B input of MatMul nodes becomes
  `com.microsoft::MatMulNBits` (codes + zero point 2^(bits-1) packed LSB first into
  uint8 `[N, K/block, block*bits/8]`, one float scale per block);
- `matmulnbits4`: the same 2-bit bytes in the file, widened to MatMulNBits' 4-bit container by
  a few integer nodes over initializers only, which ONNX Runtime folds once at session load (its
  4-bit kernels are faster than its 2-bit ones: issue #14);
- `qgemm`: the 2-bit (int4: 4-bit) codes in the file, widened by folded nodes to an int8 [K, N]
  weight that `DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul` reads: the pattern ORT's own
  `quantize_dynamic` writes, which ORT fuses into its int8 GEMM (DynamicQuantizeMatMul), so long
  sequences run at ORT int8 speed from a 2-bit file (activations: ORT's per-tensor uint8);
- otherwise (and for every weight in the `int2` format): `DequantizeLinear` over an
  INT2 / INT4 / INT8 initializer, whose output keeps the float tensor's name, so the
  consumer (MatMul, Gather, LSTM, Transpose of a tied head...) is unchanged.

`dedup_initializers` then keeps one copy of byte-identical initializers: tied or
shared weights are one tensor in the file, whatever the exporter did with them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import TensorProto, helper

from .settings import NBITS_FORMATS

MS_DOMAIN = "com.microsoft"
BITS = {"ternary": 2, "int2": 2, "int4": 4, "int8": 8}
DQ_TYPES = {"ternary": TensorProto.INT2, "int2": TensorProto.INT2, "int4": TensorProto.INT4, "int8": TensorProto.INT8}
DQ_MIN_OPSET = {"ternary": 25, "int2": 25, "int4": 21, "int8": 13}
FOLD_MIN_OPSET = 18                                # BitwiseAnd (the folded unpacking nodes)
BLOCKED_DQ_MIN_OPSET = 21                          # DequantizeLinear's block_size (grouped scales)
SWITCH_ROWS = 4   # a grouped weight under qgemm: MatMulNBits up to this many rows, int8 GEMM beyond


@dataclass
class QuantWeight:
    """A quantized weight as the exported initializer sees it: `codes * scale` with codes
    int8 in the initializer's own layout and `scale` of size 1 or one per index of `axis`."""

    codes: np.ndarray      # int8, same shape as the float initializer
    scale: np.ndarray      # float32, [1] or [codes.shape[axis]]; grouped: [codes.shape[axis], groups]
    axis: int
    kind: str              # ternary | int2 | int4 | int8
    source: int = 0        # id of the QTensor it came from (links a tied head to its table)
    group: int = 0         # grouped: each scale covers `group` consecutive values along the other axis

    def dequantize(self) -> np.ndarray:
        if self.group:
            return self.codes.astype(np.float32) * self.blocked_scale().repeat(self.group, axis=1 - self.axis)
        shape = [1] * self.codes.ndim
        if self.scale.size > 1:
            shape[self.axis] = -1
        return self.codes.astype(np.float32) * self.scale.reshape(shape)

    def blocked_scale(self) -> np.ndarray:
        """A grouped weight's scales in the codes' own layout, the blocked axis shortened by `group`
        (DequantizeLinear's blocked form: scale[i, j] covers codes[i * group + k, j] when the blocks run
        down axis 0)."""
        return self.scale if self.axis == 0 else self.scale.T


@dataclass
class TableOf:
    """A uint8 embedding table (codes + 128) holding the same bytes as the 8-bit MatMulNBits
    weight of the head made from QTensor `source`: replaced by a Reshape of that weight."""

    source: int


@dataclass
class CodesOf:
    """An embedding's int8 codes [V, D] as the graph gathers them (QTensor `source`, format `kind`): a qgemm
    head tied to that embedding multiplies them, transposed at session load, instead of a second copy; codes
    of fewer bits are stored packed and widened at session load (pack_embedding_codes)."""

    source: int
    kind: str = "int8"


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Unsigned values < 2**bits, flattened, 8/bits per byte, first value in the lowest bits."""
    per_byte = 8 // bits
    u = values.reshape(-1).astype(np.uint8) & ((1 << bits) - 1)
    u = np.pad(u, (0, (-u.size) % per_byte)).reshape(-1, per_byte).astype(np.uint16)
    out = np.zeros(len(u), np.uint16)
    for i in range(per_byte):
        out |= u[:, i] << (i * bits)
    return out.astype(np.uint8).tobytes()


def choose_block(k: int, block_size: int) -> int:
    """The largest power of two <= block_size (and >= 16) that divides K, so that no block is
    padded; else block_size, shrunk when longer than K (a block of mostly padding)."""
    b = block_size
    while b >= 16:
        if k % b == 0:
            return b
        b //= 2
    return min(block_size, max(16, 1 << (k - 1).bit_length()))


def matmulnbits_tensors(w: QuantWeight, block_size: int, prefix: str) -> tuple[list, dict]:
    """B and scales initializers plus attributes for `x @ W` with W = w ([K, N])."""
    bits = BITS[w.kind]
    k, n = w.codes.shape
    block_size = w.group or choose_block(k, block_size)   # a grouped weight's blocks are its groups
    blocks = -(-k // block_size)
    zero = 1 << (bits - 1)
    codes = np.full((n, blocks * block_size), zero, np.uint8)       # padding dequantizes to 0
    codes[:, :k] = (w.codes.T.astype(np.int16) + zero).astype(np.uint8)
    b_bytes = pack_bits(codes, bits)
    if w.group:
        scales = w.scale.astype(np.float32)   # [N, blocks]: one per (output row, group)
    else:  # one scale per (row, block): a per-tensor or per-output-channel alpha is repeated over blocks
        per_row = np.broadcast_to(w.scale.reshape(-1) if w.scale.size > 1 else w.scale.reshape(1), (n,))
        scales = np.repeat(per_row.astype(np.float32)[:, None], blocks, axis=1)
    b = helper.make_tensor(f"{prefix}_nbits", TensorProto.UINT8, [n, blocks, block_size * bits // 8],
                           b_bytes, raw=True)
    s = helper.make_tensor(f"{prefix}_nbits_scales", TensorProto.FLOAT, [n * blocks], scales.reshape(-1).tobytes(),
                           raw=True)
    return [b, s], {"K": k, "N": n, "bits": bits, "block_size": block_size}


def _const(name: str, dtype: int, values, dims=None) -> onnx.TensorProto:
    """A small constant initializer: `values` a list (1-D), or a scalar with dims=[]. Raw bytes, so that
    dedup_initializers keeps one of the equal constants every folded weight makes."""
    vals = np.asarray([values] if dims == [] else list(values), dtype=helper.tensor_dtype_to_np_dtype(dtype))
    return helper.make_tensor(name, dtype, list(vals.shape) if dims is None else dims, vals.tobytes(), raw=True)


def unpack_nodes(packed: str, bits: int, count: int, shape: list[int], out: str) -> tuple[list, list]:
    """Nodes turning initializer `packed` (pack_bits of codes + 2^(bits-1), uint8) into the int32 codes
    `out` of `shape`. Every input is an initializer, so ONNX Runtime computes them once, at session load
    (constant folding), and keeps the result: the file holds `bits` per weight, the kernel its own container."""
    t = f"{out}_"   # the intermediate values' prefix
    c = [_const(f"fold_shifts{bits}", TensorProto.UINT8, list(range(0, 8, bits))),
         _const(f"fold_mask{bits}", TensorProto.UINT8, (1 << bits) - 1, dims=[]),
         _const("fold_last", TensorProto.INT64, [-1]), _const("fold_start", TensorProto.INT64, [0]),
         _const(f"{t}end", TensorProto.INT64, [count]),
         _const(f"fold_zero{bits}", TensorProto.INT32, 1 << (bits - 1), dims=[]),
         _const(f"{t}shape", TensorProto.INT64, list(shape))]
    n = [helper.make_node("Unsqueeze", [packed, c[2].name], [f"{t}b"]),
         helper.make_node("BitShift", [f"{t}b", c[0].name], [f"{t}s"], direction="RIGHT"),
         helper.make_node("BitwiseAnd", [f"{t}s", c[1].name], [f"{t}u"]),
         helper.make_node("Reshape", [f"{t}u", c[2].name], [f"{t}f"]),
         helper.make_node("Slice", [f"{t}f", c[3].name, c[4].name], [f"{t}k"]),  # drop the last byte's padding
         helper.make_node("Cast", [f"{t}k"], [f"{t}i"], to=TensorProto.INT32),
         helper.make_node("Sub", [f"{t}i", c[5].name], [f"{t}c"]),
         helper.make_node("Reshape", [f"{t}c", c[6].name], [out])]
    return c, n


def qgemm_tensors(w: QuantWeight, name: str, table: onnx.TensorProto | None = None) -> tuple[list, list, dict]:
    """Initializers and folded nodes giving `x @ W` its int8 GEMM inputs: W's codes [K, N] as int8
    (from 2 or 4 bits per weight in the file; int8 stored as is, or the transpose of `table`, the int8
    [N, K] codes of the embedding this weight is tied to), its scale(s) and zero point."""
    bits = BITS[w.kind]
    inits, weight = int8_weight_scale(w, name)
    if bits == 8 and table is not None and list(table.dims) == list(w.codes.shape)[::-1]:
        return inits, [helper.make_node("Transpose", [table.name], [weight["w"]], perm=[1, 0])], weight
    if bits == 8:
        inits.append(helper.make_tensor(f"{name}_int8", TensorProto.INT8, list(w.codes.shape),
                                        w.codes.astype(np.int8).tobytes(), raw=True))
        return inits, [], weight
    packed, nodes = packed_int8(w.codes, bits, name, f"{name}_codes", weight["w"])
    return inits + packed, nodes, weight


def int8_weight_scale(w: QuantWeight, name: str) -> tuple[list, dict]:
    """The zero point and scale(s) (one per output column, or one) of W's int8 GEMM weight `<name>_int8`."""
    inits = [_const(f"{name}_wzp", TensorProto.INT8, 0, dims=[]),
             helper.make_tensor(f"{name}_wscale", TensorProto.FLOAT, [w.scale.size] if w.scale.size > 1 else [],
                                w.scale.astype(np.float32).tobytes(), raw=True)]
    return inits, {"w": f"{name}_int8", "scale": inits[1].name, "zero": inits[0].name}


def packed_int8(codes: np.ndarray, bits: int, name: str, stored: str, out: str) -> tuple[list, list]:
    """Int8 `codes` kept in the file at `bits` per value (initializer `stored`) and widened back to the int8
    tensor `out` by folded nodes (intermediates named after `name`): ONNX Runtime computes `out` once, at
    session load."""
    packed = helper.make_tensor(stored, TensorProto.UINT8, [-(-codes.size * bits // 8)],
                                pack_bits(codes.astype(np.int16) + (1 << (bits - 1)), bits), raw=True)
    consts, nodes = unpack_nodes(stored, bits, codes.size, list(codes.shape), f"{name}_i32")
    nodes.append(helper.make_node("Cast", [f"{name}_i32"], [out], to=TensorProto.INT8))
    return [packed, *consts], nodes


def qgemm_nodes(a: str, out: str, weight: dict) -> list:
    """`out = a @ W` as ORT's dynamic int8 quantization writes it (fused by ORT into DynamicQuantizeMatMul)."""
    return qgemm_quantize(a, out) + qgemm_from_quantized(out, out, weight)


def qgemm_quantize(a: str, q: str) -> list:
    """`a` as uint8 `<q>_aq` with its scale `<q>_as` and zero point `<q>_az` (one per tensor)."""
    return [helper.make_node("DynamicQuantizeLinear", [a], [f"{q}_aq", f"{q}_as", f"{q}_az"])]


def qgemm_from_quantized(q: str, out: str, weight: dict) -> list:
    """`out` = (quantized input `q`, qgemm_quantize) @ W: integer product, then both scales."""
    return [helper.make_node("MatMulInteger", [f"{q}_aq", weight["w"], f"{q}_az", weight["zero"]], [f"{out}_acc"]),
            helper.make_node("Cast", [f"{out}_acc"], [f"{out}_accf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{q}_as", weight["scale"]], [f"{out}_scale"]),
            helper.make_node("Mul", [f"{out}_accf", f"{out}_scale"], [out])]


def qgemm_as_fp32(graph) -> None:
    """The inverse of qgemm_nodes for the validation's fp32-compute run: `MatMulInteger(quantized a, W8)`
    becomes `MatMul(a, float(W8))` and the activation scale 1 (the weight scale stays), so the graph
    computes a @ (W8 * scale) in fp32."""
    _exact_branches(graph)
    quantized_from = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DynamicQuantizeLinear"}
    act_scales = {n.output[1] for n in graph.node if n.op_type == "DynamicQuantizeLinear"}
    nodes = []
    for n in graph.node:
        if n.op_type == "MatMulInteger" and n.input[0] in quantized_from:
            nodes += [helper.make_node("Cast", [n.input[1]], [f"{n.output[0]}_wf"], to=TensorProto.FLOAT),
                      helper.make_node("MatMul", [quantized_from[n.input[0]], f"{n.output[0]}_wf"], [n.output[0]])]
        elif n.op_type == "Mul" and n.input[0] in act_scales:
            nodes.append(helper.make_node("Identity", [n.input[1]], [n.output[0]]))
        else:
            nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)


def _exact_branches(graph) -> None:
    """Each row-count switch (_add_switches) becomes its MatMulNBits branch, which computes the
    weight exactly at accuracy level 0 (the int8 branch rounds it)."""
    nodes = []
    for n in graph.node:
        if n.op_type == "If" and n.name.endswith("_rows_switch"):
            few = next(a.g for a in n.attribute if a.name == "then_branch")
            rename = {o.name: outer for o, outer in zip(few.output, n.output)}
            for m in few.node:
                inner = onnx.NodeProto()
                inner.CopyFrom(m)
                inner.output[:] = [rename.get(o, o) for o in m.output]
                nodes.append(inner)
        else:
            nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)


def widen_to_4bit(b: onnx.TensorProto, count: int) -> tuple[list, list]:
    """Folded nodes turning a 2-bit MatMulNBits B (zero point 2) into the 4-bit B (zero point 8) of the
    same codes: B keeps its name, the 2-bit bytes are stored as `<name>_2bit`."""
    n, blocks, per_block = b.dims
    packed = onnx.TensorProto()
    packed.CopyFrom(b)
    packed.name = f"{b.name}_2bit"
    consts, nodes = unpack_nodes(packed.name, 2, count, [-1, 2], f"{b.name}_pairs")
    t = f"{b.name}_"
    consts += [_const("fold_nibble_zero", TensorProto.INT32, [8, 8 * 16]),   # + zero point 8, then << 4
               _const("fold_nibble_shift", TensorProto.INT32, [1, 16]),
               _const(f"{t}shape4", TensorProto.INT64, [n, blocks, per_block * 2])]
    nodes += [helper.make_node("Mul", [f"{t}pairs", "fold_nibble_shift"], [f"{t}h"]),
              helper.make_node("Add", [f"{t}h", "fold_nibble_zero"], [f"{t}z"]),
              helper.make_node("ReduceSum", [f"{t}z", "fold_last"], [f"{t}y"], keepdims=0),
              helper.make_node("Cast", [f"{t}y"], [f"{t}u8"], to=TensorProto.UINT8),
              helper.make_node("Reshape", [f"{t}u8", f"{t}shape4"], [b.name])]
    return [packed] + consts, nodes


def dequantize_linear(w: QuantWeight, name: str) -> tuple[list, onnx.NodeProto]:
    """Initializers and a DequantizeLinear node whose output is `name` (the float weight)."""
    bits = BITS[w.kind]
    codes = w.codes.reshape(-1)
    raw = pack_bits(codes.astype(np.int16) & ((1 << bits) - 1), bits) if bits < 8 else codes.tobytes()
    q = helper.make_tensor(f"{name}_q", DQ_TYPES[w.kind], list(w.codes.shape), raw, raw=True)
    if w.group:  # blocked DequantizeLinear (opset 21): the blocks run along the axis the rows do not
        blocked = np.ascontiguousarray(w.blocked_scale(), np.float32)
        s = helper.make_tensor(f"{name}_q_scale", TensorProto.FLOAT, list(blocked.shape), blocked.tobytes(), raw=True)
        node = helper.make_node("DequantizeLinear", [q.name, s.name], [name], name=f"{name}_dequantize",
                                axis=1 - w.axis, block_size=w.group)
        return [q, s], node
    per_axis = w.scale.size > 1
    s = helper.make_tensor(f"{name}_q_scale", TensorProto.FLOAT, [w.scale.size] if per_axis else [],
                           w.scale.astype(np.float32).tobytes(), raw=True)
    attrs = {"axis": w.axis} if per_axis else {}
    node = helper.make_node("DequantizeLinear", [q.name, s.name], [name], name=f"{name}_dequantize", **attrs)
    return [q, s], node


def _consumers(graph) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    uses: dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, i))
    return uses


def quantize_graph(model: onnx.ModelProto, weights: dict[str, QuantWeight], fmt: str, block_size: int,
                   accuracy_level: int, switch_weights: int = 0) -> dict:
    """Replace the float initializers named in `weights` in place. Returns counts per rewrite. qgemm: a
    grouped weight, and one of at least `switch_weights` weights (> 0), gets a row-count switch."""
    graph = model.graph
    uses = _consumers(graph)
    inits = {t.name: t for t in graph.initializer}
    stats = {"matmulnbits": 0, "qgemm": 0, "dequantize_linear": 0, "shared_tables": 0, "folded_weights": 0,
             "min_opset": 0}
    new_inits, new_nodes, drop = [], [], set()
    expand: dict[int, list] = {}                 # id(MatMul node) -> the nodes replacing it
    nbits_of: dict[int, onnx.TensorProto] = {}   # QTensor id -> its MatMulNBits B
    tables = {w.source: inits[name] for name, w in weights.items() if isinstance(w, CodesOf) and name in inits
              and inits[name].data_type == TensorProto.INT8}
    switched: list = []                          # (MatMul node, its MatMulNBits inputs, its int8 GEMM weight)
    for name, w in weights.items():
        if name not in inits or isinstance(w, (TableOf, CodesOf)):
            continue
        users = uses.get(name, [])
        as_matmul_b = users and all(n.op_type == "MatMul" and i == 1 for n, i in users) and w.codes.ndim == 2
        # (an int8 weight is as fast in the int8 GEMM at one row as in 8-bit MatMulNBits: never switched)
        if as_matmul_b and fmt == "qgemm" and (w.group or (w.kind != "int8" and 0 < switch_weights <= w.codes.size)):
            # int8 GEMM has one scale per column: a grouped weight (a 4-bit head) is MatMulNBits for few rows,
            # int8 GEMM on weights requantized from it at session load for many
            tensors, nodes, few, weight = _switch_weights(w, name, block_size)
            new_inits += tensors
            new_nodes += nodes
            switched += [(node, few, weight) for node, _ in users]
            stats["folded_weights"] += 1
        elif as_matmul_b and fmt in NBITS_FORMATS:
            tensors, nodes, b = _nbits_rewrite(w, name, fmt, block_size, accuracy_level, users, expand, stats)
            new_inits += tensors
            new_nodes += nodes
            nbits_of[w.source] = b
        elif fmt == "qgemm" and as_matmul_b:
            tensors, nodes, weight = qgemm_tensors(w, name, tables.get(w.source))
            new_inits += tensors
            new_nodes += nodes
            stats["folded_weights"] += bool(nodes)
            stats["min_opset"] = max(stats["min_opset"], FOLD_MIN_OPSET if nodes else 0)
            for node, _ in users:
                expand[id(node)] = qgemm_nodes(node.input[0], node.output[0], weight)
                stats["qgemm"] += 1
        else:
            tensors, node = dequantize_linear(w, name)
            new_inits += tensors
            new_nodes.append(node)
            stats["dequantize_linear"] += 1
            stats["min_opset"] = max(stats["min_opset"], DQ_MIN_OPSET[w.kind], BLOCKED_DQ_MIN_OPSET if w.group else 0)
        drop.add(name)
    new_inits += _add_switches(switched, uses, inits, accuracy_level, expand, stats)
    new_inits, new_nodes = _shared_tables(weights, inits, nbits_of, new_inits, new_nodes, drop, stats)
    new_inits, new_nodes = pack_embedding_codes(weights, inits, new_inits, new_nodes, drop, stats)
    _rewrite(graph, new_inits, new_nodes, drop, expand)
    if stats["matmulnbits"] and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return stats


def _rewrite(graph, new_inits: list, new_nodes: list, drop: set, expand: dict) -> None:
    """The graph's initializers less `drop` plus `new_inits` (one per name), and its nodes: `new_nodes` first
    (dequantize / unpack: a topological order ONNX checkers and runtimes accept), then each node or what
    `expand` replaces it with."""
    kept = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept + list({t.name: t for t in reversed(new_inits)}.values())[::-1])  # fold_*: once
    nodes = new_nodes + [m for n in graph.node for m in expand.get(id(n), [n])]
    del graph.node[:]
    graph.node.extend(nodes)


def _nbits_rewrite(w: QuantWeight, name: str, fmt: str, block_size: int, accuracy_level: int, users, expand: dict,
                   stats: dict) -> tuple[list, list, onnx.TensorProto]:
    """MatMulNBits for every MatMul reading `name` (into `expand`); matmulnbits4 widens the 2-bit B at load.
    -> initializers, folded nodes, the B as stored."""
    tensors, attrs = matmulnbits_tensors(w, block_size, name)
    stored, nodes = tensors[0], []
    if fmt == "matmulnbits4" and attrs["bits"] == 2:
        widened, nodes = widen_to_4bit(stored, int(np.prod(stored.dims)) * 4)
        tensors = widened + tensors[1:]
        attrs["bits"] = 4
        stats["folded_weights"] += 1
        stats["min_opset"] = max(stats["min_opset"], FOLD_MIN_OPSET)
    b_name, s_name = f"{name}_nbits", f"{name}_nbits_scales"
    for node, _ in users:
        expand[id(node)] = [helper.make_node("MatMulNBits", [node.input[0], b_name, s_name], [node.output[0]],
                                             name=f"{node.output[0]}_nbits", domain=MS_DOMAIN,
                                             accuracy_level=accuracy_level, **attrs)]
        stats["matmulnbits"] += 1
    return tensors, nodes, stored


def _add_switches(switched: list, uses: dict, inits: dict, accuracy_level: int, expand: dict,
                  stats: dict) -> list:
    """The switched MatMuls as `If`s on the rows of their input (every dimension but the last): up to
    SWITCH_ROWS rows (a decoded token) MatMulNBits on the weights' codes, the fewest bytes a single row has to
    stream; beyond, ORT's int8 GEMM (~2.6x MatMulNBits' speed at 128 rows) on int8 weights made from the same
    stored codes at session load (_switch_weights). The MatMuls reading one input (query/key/value, gate/up)
    share one `If`, and in it one activation quantization, and each one's bias Add moves into both branches:
    what ORT fuses across a MatMul in the plain graph it can still fuse inside a branch. -> initializers."""
    by_input: dict[str, list] = {}
    for entry in switched:
        by_input.setdefault(entry[0].input[0], []).append(entry)
    for a, group in by_input.items():
        head = group[0][0].output[0]
        few, many = [], qgemm_quantize(a, head)
        outs = []
        for node, nbits, weight in group:
            bias_add = _bias_add(node.output[0], uses, inits)
            out = bias_add.output[0] if bias_add else node.output[0]
            bias = next(i for i in bias_add.input if i in inits) if bias_add else None
            few += _with_bias([helper.make_node("MatMulNBits", [a, nbits["b"], nbits["scales"]], [f"{out}_few"],
                                                domain=MS_DOMAIN, accuracy_level=accuracy_level, **nbits["attrs"])],
                              bias)
            many += _with_bias(qgemm_from_quantized(head, f"{out}_many", weight), bias)
            outs.append(out)
            expand[id(node)] = []
            if bias_add is not None:
                expand[id(bias_add)] = []
        branch = {k: helper.make_graph(nodes, f"{head}_{k}_rows", [], [helper.make_tensor_value_info(
            f"{o}_{k}", TensorProto.FLOAT, None) for o in outs]) for k, nodes in (("few", few), ("many", many))}
        expand[id(group[0][0])] = [
            helper.make_node("Shape", [a], [f"{head}_lead"], end=-1),
            helper.make_node("ReduceProd", [f"{head}_lead"], [f"{head}_rows"], keepdims=0),
            helper.make_node("LessOrEqual", [f"{head}_rows", "switch_rows"], [f"{head}_few_cond"]),
            helper.make_node("If", [f"{head}_few_cond"], outs, name=f"{head}_rows_switch",
                             then_branch=branch["few"], else_branch=branch["many"])]
        stats["matmulnbits"] += len(group)
        stats["qgemm"] += len(group)
        stats["rows_switches"] = stats.get("rows_switches", 0) + 1
    if switched:
        stats["min_opset"] = max(stats["min_opset"], FOLD_MIN_OPSET)
    return [_const("switch_rows", TensorProto.INT64, SWITCH_ROWS, dims=[])] if switched else []


def _bias_add(out: str, uses: dict, inits: dict):
    """The Add of a constant (bias) initializer that is the only reader of MatMul output `out`, or None."""
    readers = uses.get(out, [])
    if len(readers) == 1 and readers[0][0].op_type == "Add" and any(i in inits for i in readers[0][0].input):
        return readers[0][0]
    return None


def _with_bias(nodes: list, bias: str | None) -> list:
    """`nodes` (the last one's output `<out>_few` / `<out>_many` renamed `..._mm`) plus the bias Add."""
    if bias is None:
        return nodes
    last = nodes[-1]
    y = last.output[0]
    last.output[0] = f"{y}_mm"
    return nodes + [helper.make_node("Add", [f"{y}_mm", bias], [y])]


def _switch_weights(w: QuantWeight, name: str, block_size: int) -> tuple[list, list, dict, dict]:
    """The one stored copy of W and the folded nodes giving both branches their weight -> (initializers,
    nodes, the MatMulNBits inputs {"b", "scales", "attrs"}, the int8 GEMM's weight as qgemm_nodes reads it).
    Grouped: 4-bit MatMulNBits bytes, requantized per column for the int8 GEMM. Otherwise: the codes in
    MatMulNBits' layout (2-bit codes widened to 4 at load) with one scale per row or tensor, stored as qgemm
    stores it and repeated over the blocks at load; the int8 GEMM reads the codes themselves (exact)."""
    tensors, attrs = matmulnbits_tensors(w, 0 if w.group else block_size, name)
    stored, scales = tensors
    n, blocks, _ = stored.dims
    if w.group:
        consts, nodes = requantized_int8(stored.name, scales.name, attrs, n, blocks, f"{name}_rq")
        consts.append(_const(f"{name}_rq_zero", TensorProto.INT8, 0, dims=[]))
        return tensors + consts, nodes, {"b": stored.name, "scales": scales.name, "attrs": attrs}, \
            {"w": f"{name}_rq_int8", "scale": f"{name}_rq_scale", "zero": f"{name}_rq_zero"}
    inits, weight = int8_weight_scale(w, name)
    t, bits, block = f"{name}_sw", attrs["bits"], attrs["block_size"]
    inits += [_const(f"{t}_blocks", TensorProto.INT64, [n, blocks]), _const("fold_column", TensorProto.INT64, [-1, 1]),
              _const(f"{t}_k", TensorProto.INT64, [attrs["K"]]), _const("fold_axis1", TensorProto.INT64, [1])]
    nodes = [helper.make_node("Reshape", [weight["scale"], "fold_column"], [f"{t}_s1"]),   # per-block scales
             helper.make_node("Expand", [f"{t}_s1", f"{t}_blocks"], [f"{t}_s2"]),
             helper.make_node("Reshape", [f"{t}_s2", "fold_last"], [scales.name])]
    packed = stored
    if bits == 2:   # MatMulNBits' 4-bit kernels are faster than its 2-bit ones (issue #14)
        widened, wnodes = widen_to_4bit(stored, n * blocks * block)
        packed, inits, nodes, attrs = widened[0], inits + widened, nodes + wnodes, {**attrs, "bits": 4}
    else:
        inits.append(stored)
    consts, unpack = unpack_nodes(packed.name, bits, n * blocks * block, [n, blocks * block], f"{t}_codes")
    nodes += unpack + [helper.make_node("Slice", [f"{t}_codes", "fold_start", f"{t}_k", "fold_axis1"], [f"{t}_ck"]),
                       helper.make_node("Cast", [f"{t}_ck"], [f"{t}_c8"], to=TensorProto.INT8),
                       helper.make_node("Transpose", [f"{t}_c8"], [weight["w"]], perm=[1, 0])]
    return inits + consts, nodes, {"b": stored.name, "scales": scales.name, "attrs": attrs}, weight


def requantized_int8(b: str, scales: str, attrs: dict, n: int, blocks: int, t: str) -> tuple[list, list]:
    """Folded nodes: MatMulNBits weight `b` (codes + zero point, `bits` per value) and its per-block `scales`
    -> `<t>_int8` [K, N], the values rounded to int8 with one scale `<t>_scale` [N] per output column
    (max |column| / 127). Every input is an initializer: ONNX Runtime computes them at session load."""
    bits, block, k = attrs["bits"], attrs["block_size"], attrs["K"]
    consts, nodes = unpack_nodes(b, bits, n * blocks * block, [n, blocks, block], f"{t}_codes")
    consts += [_const(f"{t}_scale_shape", TensorProto.INT64, [n, blocks, 1]),
               _const(f"{t}_rows", TensorProto.INT64, [n, blocks * block]),
               _const("fold_axis1", TensorProto.INT64, [1]), _const(f"{t}_k", TensorProto.INT64, [k]),
               _const("fold_int8_max", TensorProto.FLOAT, 127.0, dims=[]),
               _const("fold_tiny", TensorProto.FLOAT, 1e-30, dims=[])]
    nodes += [helper.make_node("Cast", [f"{t}_codes"], [f"{t}_f"], to=TensorProto.FLOAT),
              helper.make_node("Reshape", [scales, f"{t}_scale_shape"], [f"{t}_bs"]),
              helper.make_node("Mul", [f"{t}_f", f"{t}_bs"], [f"{t}_v3"]),
              helper.make_node("Reshape", [f"{t}_v3", f"{t}_rows"], [f"{t}_vp"]),
              helper.make_node("Slice", [f"{t}_vp", "fold_start", f"{t}_k", "fold_axis1"], [f"{t}_v"]),  # block padding
              helper.make_node("Abs", [f"{t}_v"], [f"{t}_abs"]),
              helper.make_node("ReduceMax", [f"{t}_abs", "fold_axis1"], [f"{t}_max"], keepdims=1),
              helper.make_node("Div", [f"{t}_max", "fold_int8_max"], [f"{t}_step0"]),
              helper.make_node("Max", [f"{t}_step0", "fold_tiny"], [f"{t}_step"]),   # an all-zero column
              helper.make_node("Div", [f"{t}_v", f"{t}_step"], [f"{t}_q"]),
              helper.make_node("Round", [f"{t}_q"], [f"{t}_r"]),
              helper.make_node("Cast", [f"{t}_r"], [f"{t}_i8"], to=TensorProto.INT8),
              helper.make_node("Transpose", [f"{t}_i8"], [f"{t}_int8"], perm=[1, 0]),
              helper.make_node("Reshape", [f"{t}_step", "fold_last"], [f"{t}_scale"])]
    return consts, nodes


def _shared_tables(weights, inits, nbits_of, new_inits, new_nodes, drop, stats) -> tuple[list, list]:
    """A uint8 table holding the bytes of an 8-bit MatMulNBits B becomes a Reshape of that B."""
    for name, w in weights.items():
        b = nbits_of.get(w.source) if isinstance(w, TableOf) and name in inits else None
        table = inits.get(name)
        if b is None or list(table.dims) != [b.dims[0], b.dims[1] * b.dims[2]]:
            continue  # no byte-identical B (padded blocks, or not 8-bit): the table stays
        shape = helper.make_tensor(f"{name}_shape", TensorProto.INT64, [2], list(table.dims))
        new_inits.append(shape)
        new_nodes.append(helper.make_node("Reshape", [b.name, shape.name], [name], name=f"{name}_from_head"))
        drop.add(name)
        stats["shared_tables"] += 1
    return new_inits, new_nodes


def pack_embedding_codes(weights, inits, new_inits, new_nodes, drop, stats) -> tuple[list, list]:
    """An int4/int2/ternary embedding's int8 codes are stored at their own bits (pack_bits) and widened
    back to the same int8 tensor by folded nodes (unpack_nodes): ONNX Runtime computes it once, at
    session load, so the Gather and anything else reading the codes are unchanged."""
    for name, w in weights.items():
        t = inits.get(name)
        if not isinstance(w, CodesOf) or w.kind == "int8" or t is None or t.data_type != TensorProto.INT8:
            continue
        tensors, nodes = packed_int8(onnx.numpy_helper.to_array(t), BITS[w.kind], name, f"{name}_packed", name)
        new_inits += tensors
        new_nodes += nodes
        drop.add(name)
        stats["folded_weights"] += 1
        stats["packed_embeddings"] = stats.get("packed_embeddings", 0) + 1
        stats["min_opset"] = max(stats["min_opset"], FOLD_MIN_OPSET)
    return new_inits, new_nodes


def dedup_initializers(model: onnx.ModelProto) -> int:
    """Keep one of each group of byte-identical initializers (same type, shape and data);
    rewire every use (subgraphs included). Returns the number removed."""
    graph = model.graph
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    for t in graph.initializer:
        if not t.raw_data:  # external data or typed fields: small constants, left alone
            continue
        key = (t.data_type, tuple(t.dims), hashlib.sha256(t.raw_data).hexdigest())
        if key in first:
            rename[t.name] = first[key]
        else:
            first[key] = t.name
    if not rename:
        return 0
    kept = [t for t in graph.initializer if t.name not in rename]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    _rename_inputs(graph, rename)
    return len(rename)


def _rename_inputs(graph, rename: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_inputs(attr.g, rename)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _rename_inputs(g, rename)
    for out in graph.output:
        if out.name in rename:  # an output that is an initializer itself: keep its name via Identity
            graph.node.append(helper.make_node("Identity", [rename[out.name]], [out.name]))


def float16_weights(model: onnx.ModelProto, names) -> int:
    """Store the named float initializers as fp16, each followed by a Cast back to float (the
    graph still computes in fp32: half the file, for runtimes without quantized kernels)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, count = [], 0
    for name in names:
        t = inits.get(name)
        if t is None or t.data_type != TensorProto.FLOAT:
            continue
        half = onnx.numpy_helper.to_array(t).astype(np.float16)
        t.CopyFrom(onnx.numpy_helper.from_array(half, f"{name}_fp16"))
        nodes.append(helper.make_node("Cast", [t.name], [name], name=f"{name}_to_float", to=TensorProto.FLOAT))
        count += 1
    all_nodes = nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(all_nodes)
    return count
