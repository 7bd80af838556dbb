"""Rewrite an exported float ONNX graph so quantized weights stay quantized.

The float twin of a converted model (see `exporters.onnx`) exports every quantized
weight as one float initializer with a known name. This module replaces those
initializers:

- `matmulnbits`: a weight used only as the B input of MatMul nodes becomes
  `com.microsoft::MatMulNBits` (codes + zero point 2^(bits-1) packed LSB first into
  uint8 `[N, K/block, block*bits/8]`, one float scale per block);
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

MS_DOMAIN = "com.microsoft"
BITS = {"ternary": 2, "int2": 2, "int4": 4, "int8": 8}
DQ_TYPES = {"ternary": TensorProto.INT2, "int2": TensorProto.INT2, "int4": TensorProto.INT4, "int8": TensorProto.INT8}
DQ_MIN_OPSET = {"ternary": 25, "int2": 25, "int4": 21, "int8": 13}


@dataclass
class QuantWeight:
    """A quantized weight as the exported initializer sees it: `codes * scale` with codes
    int8 in the initializer's own layout and `scale` of size 1 or one per index of `axis`."""

    codes: np.ndarray      # int8, same shape as the float initializer
    scale: np.ndarray      # float32, [1] or [codes.shape[axis]]
    axis: int
    kind: str              # ternary | int2 | int4 | int8
    source: int = 0        # id of the QTensor it came from (links a tied head to its table)

    def dequantize(self) -> np.ndarray:
        shape = [1] * self.codes.ndim
        if self.scale.size > 1:
            shape[self.axis] = -1
        return self.codes.astype(np.float32) * self.scale.reshape(shape)


@dataclass
class TableOf:
    """A uint8 embedding table (codes + 128) holding the same bytes as the 8-bit MatMulNBits
    weight of the head made from QTensor `source`: replaced by a Reshape of that weight."""

    source: int


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
    block_size = choose_block(k, block_size)
    blocks = -(-k // block_size)
    zero = 1 << (bits - 1)
    codes = np.full((n, blocks * block_size), zero, np.uint8)       # padding dequantizes to 0
    codes[:, :k] = (w.codes.T.astype(np.int16) + zero).astype(np.uint8)
    b_bytes = pack_bits(codes, bits)
    # one scale per (row, block): a per-tensor or per-output-channel alpha is repeated over blocks
    per_row = np.broadcast_to(w.scale.reshape(-1) if w.scale.size > 1 else w.scale.reshape(1), (n,))
    scales = np.repeat(per_row.astype(np.float32)[:, None], blocks, axis=1)
    b = helper.make_tensor(f"{prefix}_nbits", TensorProto.UINT8, [n, blocks, block_size * bits // 8],
                           b_bytes, raw=True)
    s = helper.make_tensor(f"{prefix}_nbits_scales", TensorProto.FLOAT, [n * blocks], scales.reshape(-1).tobytes(),
                           raw=True)
    return [b, s], {"K": k, "N": n, "bits": bits, "block_size": block_size}


def dequantize_linear(w: QuantWeight, name: str) -> tuple[list, onnx.NodeProto]:
    """Initializers and a DequantizeLinear node whose output is `name` (the float weight)."""
    bits = BITS[w.kind]
    codes = w.codes.reshape(-1)
    raw = pack_bits(codes.astype(np.int16) & ((1 << bits) - 1), bits) if bits < 8 else codes.tobytes()
    q = helper.make_tensor(f"{name}_q", DQ_TYPES[w.kind], list(w.codes.shape), raw, raw=True)
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
                   accuracy_level: int) -> dict:
    """Replace the float initializers named in `weights` in place. Returns counts per rewrite."""
    graph = model.graph
    uses = _consumers(graph)
    inits = {t.name: t for t in graph.initializer}
    stats = {"matmulnbits": 0, "dequantize_linear": 0, "shared_tables": 0, "min_opset": 0}
    new_inits, new_nodes, drop = [], [], set()
    nbits_of: dict[int, onnx.TensorProto] = {}   # QTensor id -> its MatMulNBits B
    for name, w in weights.items():
        if name not in inits or isinstance(w, TableOf):
            continue
        users = uses.get(name, [])
        as_matmul_b = users and all(n.op_type == "MatMul" and i == 1 for n, i in users) and w.codes.ndim == 2
        if fmt == "matmulnbits" and as_matmul_b:
            tensors, attrs = matmulnbits_tensors(w, block_size, name)
            new_inits += tensors
            nbits_of[w.source] = tensors[0]
            for node, _ in users:
                a, out = node.input[0], node.output[0]
                node.Clear()
                node.CopyFrom(helper.make_node("MatMulNBits", [a, tensors[0].name, tensors[1].name], [out],
                                               name=f"{out}_nbits", domain=MS_DOMAIN,
                                               accuracy_level=accuracy_level, **attrs))
                stats["matmulnbits"] += 1
        else:
            tensors, node = dequantize_linear(w, name)
            new_inits += tensors
            new_nodes.append(node)
            stats["dequantize_linear"] += 1
            stats["min_opset"] = max(stats["min_opset"], DQ_MIN_OPSET[w.kind])
        drop.add(name)
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
    kept = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    # dequantize nodes first: a topological order ONNX checkers and runtimes accept
    nodes = new_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    if stats["matmulnbits"] and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return stats


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
