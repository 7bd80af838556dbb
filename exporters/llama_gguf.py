"""GGUF export for llama.cpp: a converted llama-family decoder -> one .gguf file.

    export_gguf(load_packed("model.tritpress.safetensors"), "model.gguf", GgufExportConfig(),
                read_metadata("model.tritpress.safetensors")["source"])

Every matrix goes into the GGUF type that holds tritpress's values exactly:
- ternary, rows a multiple of 256 wide: TQ1_0 (1.6875 bits per weight) or TQ2_0 (2.0625): blocks
  of 256 codes with one fp16 scale, set to the row's (or the matrix's) scale;
- ternary rows a multiple of 32 wide but not of 256 (SmolLM2's 576): llama.cpp's TQ kernels need
  whole 256-blocks per row, so Q4_0 with d = the scale and q = code + 8 (4.5 bits per weight), and
  the same for int4/int2 tables; int8 tables (an embedding, a head): Q8_0 with d = the row scale and
  q = the codes (8.5 bits per weight);
- norms, biases and rows of any other width: F32.
This is exact while scales are fp16 (tritpress's default --scale-dtype); a cross-layer share's gain
is folded into d, which then rounds to fp16 (relative 2**-11). GGUF has no cross-layer ties: a
shared matrix is written once per layer (counted in the result). q/k rows are permuted into
llama.cpp's rotary layout, as llama.cpp's convert_hf_to_gguf.py does.

llama.cpp quantizes activations itself (8-bit blocks of 256 / 32 values), so its outputs differ
from tritpress's (per-token int8 with --act-bits 8, else float) by that rounding;
benchmarks/bench_gguf.py measures the difference in llama.cpp. The export itself is checked by
reading every tensor back with the gguf package's own dequantizer.
Refused in one line: non-llama architectures, a trimmed vocabulary (llama.cpp has no id remap), a
low-rank relaxation, RoPE scaling, MLP biases.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tritpress.compressor.errors import TritpressError
from tritpress.compressor.fileio import atomic_path
from tritpress.compressor.layers import QEmbedding, QLinear, QRNN
from tritpress.compressor.share import SharedLinear
from tritpress.compressor.vocab import TrimmedEmbedding, TrimmedHead

from .converted import exportable_source, hf_name, occurrence_gain, state_keys_of
from .settings import GgufExportConfig  # re-exported: torch-free home

ARCHITECTURES = {"llama": "llama", "mistral": "llama"}   # transformers model_type -> llama.cpp architecture
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
BLOCK_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
TQ_BLOCK, Q_BLOCK = 256, 32


class GgufExportError(TritpressError):
    """The model cannot be written as a llama.cpp GGUF file (or does not read back as written)."""


def gguf_name(hf_module: str) -> str | None:
    """A transformers module path -> llama.cpp's tensor name (without .weight / .bias)."""
    if hf_module in TOP_NAMES:
        return TOP_NAMES[hf_module]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_module)
    return f"blk.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}" if m and m.group(2) in BLOCK_NAMES else None


def rotary_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a q/k projection (or its per-row scales / bias) from transformers' rotary
    layout (halves) to llama.cpp's (interleaved pairs), per head."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


# ------------------------------------------------------------------ exact block encoders

def encode_q_blocks(codes: np.ndarray, d: np.ndarray, kind: str) -> np.ndarray:
    """Integer codes [rows, cols] (cols % 32 == 0) and one scale per row (or per group of 32k values) -> ggml
    Q8_0 ("q8_0": d, 32 int8) or Q4_0 ("q4_0": d, 16 bytes of nibbles, low nibbles the first 16 values,
    q = code + 8) blocks, bytes [rows, cols / 32 * block bytes]. Value = d * code exactly (d fp16)."""
    rows, cols = codes.shape
    nb = cols // Q_BLOCK
    d = d.reshape(rows, -1)   # one scale per row, or per group of a multiple of 32 values
    dd = np.repeat(d.astype("<f2"), nb // d.shape[1], axis=1).reshape(rows, nb, 1).view(np.uint8)
    if kind == "q8_0":
        qs = codes.astype(np.int8).reshape(rows, nb, Q_BLOCK).view(np.uint8)
    else:
        if codes.min(initial=0) < -8 or codes.max(initial=0) > 7:
            raise ValueError("Q4_0 holds codes in [-8, 7]")
        q = (codes.astype(np.int16) + 8).astype(np.uint8).reshape(rows, nb, 2, Q_BLOCK // 2)
        qs = q[:, :, 0, :] | (q[:, :, 1, :] << 4)
    return np.concatenate([dd, qs], axis=-1).reshape(rows, -1)


def encode_tq(codes: np.ndarray, d: np.ndarray, qtype) -> np.ndarray:
    """Ternary codes [rows, cols] (cols % 256 == 0) and fp16-exact row scales -> TQ1_0 / TQ2_0 bytes.
    gguf's quantizer sets each block's scale to its largest |value|, which for code * d is d itself
    (0 for an all-zero block), and rounds value / d back to the code: the codes are kept exactly."""
    from gguf import quants

    return quants.quantize(codes.astype(np.float32) * d.reshape(-1, 1).astype(np.float32), qtype)


def gguf_type(kind: str, cols: int, ternary_type: str, group: int = 0):
    """The exact GGUF type for a matrix of `kind` codes with rows `cols` wide (scales per `group` values
    of a row: only a multiple of ggml's 32-value blocks is exact in one)."""
    from gguf import GGMLQuantizationType as T

    if group % Q_BLOCK:
        return T.F32
    if kind == "ternary" and cols % TQ_BLOCK == 0:
        return T.TQ1_0 if ternary_type == "tq1_0" else T.TQ2_0
    if kind in ("ternary", "int4", "int2") and cols % Q_BLOCK == 0:
        return T.Q4_0
    if kind == "int8" and cols % Q_BLOCK == 0:
        return T.Q8_0
    return T.F32


def encode(codes: np.ndarray, d: np.ndarray, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType as T

    if qtype in (T.TQ1_0, T.TQ2_0):
        return encode_tq(codes, d, qtype)
    if qtype in (T.Q4_0, T.Q8_0):
        return encode_q_blocks(codes, d, qtype.name.lower())
    return values(codes, d)


def values(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """codes * d in float32, d one scale per row ([rows]) or per group of a row ([rows, groups])."""
    d = d.reshape(codes.shape[0], -1)
    return codes.astype(np.float32) * np.repeat(d, codes.shape[1] // d.shape[1], axis=1)


# ------------------------------------------------------------------ what can be written

def refusals(model: nn.Module, source: dict) -> list[str]:
    """Why the model cannot be written as a llama.cpp GGUF file (empty: it can)."""
    cfg = source.get("hf_config") or {}
    if not cfg:
        return [f"{source.get('model_class')} is not a transformers model: the GGUF export writes llama-family "
                "decoders (export --onnx instead)"]
    if cfg.get("model_type") not in ARCHITECTURES:
        return [f"model type {cfg.get('model_type')!r}: the GGUF export writes llama-family decoders "
                f"({', '.join(ARCHITECTURES)}); export --onnx or --hf instead"]
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    why = []
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        why.append(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not written by this export")
    if cfg.get("mlp_bias"):
        why.append("MLP biases have no llama.cpp llama tensor")
    for name, m in model.named_modules():
        if isinstance(m, (TrimmedEmbedding, TrimmedHead)):
            why.append(f"{name}: a trimmed vocabulary (llama.cpp reads token ids without a remap); "
                       "compress without --trim-vocab")
        elif isinstance(m, QRNN):
            why.append(f"{name}: recurrent layers have no llama.cpp form")
        elif isinstance(m, SharedLinear) and m.rank:
            why.append(f"{name}: a low-rank relaxation (--relax-rank {m.rank}) has no GGUF form; use --relax-rank 0")
    return why


def _heads(gname: str, cfg: dict) -> int | None:
    """The head count q/k rows are permuted by (None: not a q/k tensor)."""
    n_head = cfg["num_attention_heads"]
    if gname.endswith(".attn_q"):
        return n_head
    if gname.endswith(".attn_k"):
        return cfg.get("num_key_value_heads") or n_head
    return None


def _permuted(a: np.ndarray, gname: str, cfg: dict) -> np.ndarray:
    heads = _heads(gname, cfg)
    return rotary_permute(a, heads) if heads else a


@dataclass
class Planned:
    """One GGUF tensor: its stored data and type, and the float32 values it must read back as."""

    data: np.ndarray
    qtype: object                 # gguf.GGMLQuantizationType
    expected: np.ndarray
    kind: str = "float"           # the tritpress format it came from (ternary, int8, ..., float)
    shared: bool = False          # a cross-layer shared occurrence (written once per layer)


def _quantized(m: nn.Module, name: str, gname: str, modules: dict, cfg: dict, ternary_type: str) -> Planned:
    codes = _permuted(m.qweight.codes.detach().numpy(), gname, cfg)
    scale = m.qweight.scale.detach().float().numpy() * np.float32(occurrence_gain(name, modules))
    groups = scale.shape[1] if scale.ndim == 2 else 0   # grouped: [rows, groups]
    per_row = scale if groups else np.broadcast_to(scale.reshape(-1), (codes.shape[0],))
    d = _permuted(per_row.astype(np.float32), gname, cfg)
    qtype = gguf_type(m.qweight.fmt.kind, codes.shape[1], ternary_type, codes.shape[1] // groups if groups else 0)
    stored_d = d if qtype.name == "F32" else d.astype(np.float16).astype(np.float32)  # ggml block scales: fp16
    shared = isinstance(modules.get(name.rpartition(".")[0]), SharedLinear)
    return Planned(encode(codes, stored_d, qtype), qtype, values(codes, d), m.qweight.fmt.kind, shared)


def _float(t: torch.Tensor, gname: str, cfg: dict) -> Planned:
    from gguf import GGMLQuantizationType as T

    a = _permuted(t.detach().float().numpy(), gname, cfg)
    return Planned(a, T.F32, a)


def plan_tensors(model: nn.Module, cfg: dict, ternary_type: str) -> dict[str, Planned]:
    """GGUF name -> what is written, for every tensor of the converted model (a tied head is left out:
    llama.cpp reads token_embd when there is no `output`)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    planned, done = {}, set()
    embed = modules.get("model.embed_tokens")
    for name, m in modules.items():
        if not isinstance(m, (QLinear, QEmbedding)):
            continue
        done |= state_keys_of(name, m)
        gname = _gguf_name_of(name, modules)
        if gname == "output" and embed is not None and getattr(embed, "qweight", None) is m.qweight:
            continue  # tied to the embedding
        planned[f"{gname}.weight"] = _quantized(m, name, gname, modules, cfg, ternary_type)
        if isinstance(m, QLinear) and m.bias is not None:
            planned[f"{gname}.bias"] = _float(m.bias, gname, cfg)
    seen = {}
    for key, t in model.state_dict(keep_vars=True).items():
        owner, _, leaf = key.rpartition(".")
        if key in done or leaf == "gain" or seen.setdefault(id(t), key) != key:  # a tie: written once
            continue
        gname = _gguf_name_of(owner, modules)
        planned[f"{gname}.{leaf}"] = _float(t, gname, cfg)
    return planned


def _gguf_name_of(name: str, modules: dict) -> str:
    hf = hf_name(name, modules)
    gname = gguf_name(hf)
    if gname is None:
        raise GgufExportError(f"{hf}: no llama.cpp tensor of this name (the GGUF export writes llama-family "
                              "decoders as transformers builds them)")
    return gname


# ------------------------------------------------------------------ the file

def _file_type(ternary_type: str):
    from gguf import LlamaFileType

    return LlamaFileType.MOSTLY_TQ1_0 if ternary_type == "tq1_0" else LlamaFileType.MOSTLY_TQ2_0


def write_hparams(w, cfg: dict, name: str, ternary_type: str) -> None:
    """llama.cpp's llama.* keys from the transformers config."""
    import gguf

    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or {}
    w.add_name(name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or n_head)
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg["hidden_size"] // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(_file_type(ternary_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def tokenizer_source(source: dict, cfg: GgufExportConfig) -> Path | None:
    """The GGUF file whose tokenizer.* keys are copied: --gguf-tokenizer, else a GGUF source model's."""
    if cfg.tokenizer:
        path = Path(cfg.tokenizer)
        if not path.is_file():
            raise GgufExportError(f"--gguf-tokenizer {cfg.tokenizer}: no such file")
        return path
    if source.get("gguf_file") and source.get("path"):
        path = Path(source["path"]) / source["gguf_file"]
        return path if path.is_file() else None
    return None


def copy_tokenizer(w, path: Path, vocab_size: int) -> int:
    """Copy every tokenizer.* key of the GGUF file at `path`; -> the number of tokens."""
    from gguf import GGUFReader, GGUFValueType

    try:
        fields = GGUFReader(str(path)).fields
    except Exception as e:  # noqa: BLE001 - a damaged file can fail anywhere in the reader
        raise GgufExportError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    tokens = fields.get("tokenizer.ggml.tokens")
    n = len(tokens.data) if tokens is not None else 0
    if n != vocab_size:
        raise GgufExportError(f"{path}: its tokenizer has {n} tokens, the model {vocab_size}")
    for key, f in fields.items():
        if key.startswith("tokenizer."):
            sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(key, f.contents(), f.types[0], sub)
    return n


def write_gguf(path: Path, planned: dict[str, Planned], cfg: dict, name: str, gcfg: GgufExportConfig,
               tokenizer: Path | None) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), ARCHITECTURES[cfg["model_type"]])
    write_hparams(w, cfg, name, gcfg.ternary_type)
    if tokenizer is not None:
        copy_tokenizer(w, tokenizer, cfg["vocab_size"])
    else:
        w.add_tokenizer_model("none")  # llama.cpp runs it on token ids
    for gname, p in planned.items():
        w.add_tensor(gname, p.data, raw_dtype=p.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_back(path: Path, planned: dict[str, Planned]) -> dict:
    """Every tensor of the file as the gguf package dequantizes it, against what tritpress computes:
    -> max relative difference (per tensor: |diff| / max |value|), and the names that differ in type
    or shape, are missing or are extra."""
    from gguf import GGUFReader, quants

    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    wrong = sorted(set(tensors) ^ set(planned))
    worst = 0.0
    for gname, p in planned.items():
        t = tensors.get(gname)
        if t is None:
            continue
        got = quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(p.expected.shape)
        if t.tensor_type != p.qtype:
            wrong.append(gname)
        scale = float(np.abs(p.expected).max()) if p.expected.size else 0.0
        worst = max(worst, float(np.abs(got - p.expected).max()) / scale if scale else float(np.abs(got).max()))
    return {"max_rel_diff": worst, "mismatched": wrong}


def summarize(planned: dict[str, Planned], path: Path) -> dict:
    """Bytes and weights by GGUF type, the ternary matrices not stored as TQ (and why), bits per weight."""
    by_type: dict[str, dict] = {}
    for p in planned.values():
        row = by_type.setdefault(p.qtype.name, {"tensors": 0, "params": 0, "bytes": 0})
        row["tensors"] += 1
        row["params"] += int(p.expected.size)
        row["bytes"] += int(p.data.nbytes)
    ternary = {g: p for g, p in planned.items() if p.kind == "ternary"}
    not_tq = {g: p for g, p in ternary.items() if not p.qtype.name.startswith("TQ")}
    params = sum(int(p.expected.size) for p in planned.values())
    file_bytes = path.stat().st_size
    return {"bytes": file_bytes, "params": params, "bits_per_weight": round(8 * file_bytes / params, 4),
            "types": by_type, "ternary_matrices": len(ternary), "ternary_as_tq": len(ternary) - len(not_tq),
            "ternary_not_tq": [f"{g}: rows {p.expected.shape[1]} wide (not a multiple of {TQ_BLOCK}), "
                               f"{p.qtype.name} with the same codes" for g, p in not_tq.items()],
            "written_per_layer": sum(p.shared for p in planned.values())}


def export_gguf(model: nn.Module, out, cfg: GgufExportConfig | None = None, source: dict | None = None,
                log=lambda line: None) -> dict:
    """Write `model` (converted, e.g. load_packed's) as a llama.cpp GGUF file at `out` (atomically: no
    partial file on failure) and, with cfg.validate, read every tensor back with the gguf package.
    `source`: the `source` entry of the packed file's metadata (`read_metadata(path)["source"]`)."""
    cfg = cfg or GgufExportConfig()
    source = exportable_source(model, source, refusals, GgufExportError, "a llama.cpp GGUF file")
    hf_cfg = source["hf_config"]
    planned = plan_tensors(model, hf_cfg, cfg.ternary_type)
    tokenizer = tokenizer_source(source, cfg)
    name = hf_cfg.get("_model_name_or_path") or Path(str(source.get("path") or "model")).name
    out = Path(out)
    with atomic_path(out) as tmp:
        write_gguf(Path(tmp), planned, hf_cfg, name, cfg, tokenizer)
        result = summarize(planned, Path(tmp))
        result["tokenizer"] = str(tokenizer) if tokenizer else None
        _log_summary(result, log)
        if cfg.validate:
            result["validation"] = v = read_back(Path(tmp), planned)
            v["passed"] = not v["mismatched"] and v["max_rel_diff"] <= cfg.rtol
            log(f"read back with gguf: max relative difference {v['max_rel_diff']:.2e} (allowed {cfg.rtol:.0e}), "
                f"{len(v['mismatched'])} tensors of another name, type or shape  {'OK' if v['passed'] else 'FAIL'}")
            if not v["passed"]:
                raise GgufExportError(f"the GGUF file does not read back as written: max relative difference "
                                      f"{v['max_rel_diff']:.2e}, mismatched {v['mismatched'][:3]}")
    result["path"] = str(out)
    return result


def _log_summary(r: dict, log) -> None:
    types = ", ".join(f"{t} {row['tensors']} ({row['bytes']:,} B)" for t, row in sorted(r["types"].items()))
    log(f"wrote {sum(row['tensors'] for row in r['types'].values())} tensors: {types}; "
        f"{r['bytes']:,} bytes, {r['bits_per_weight']:.3f} bits per weight overall")
    if r["ternary_not_tq"]:
        log(f"{len(r['ternary_not_tq'])} of {r['ternary_matrices']} ternary matrices are not TQ "
            f"(e.g. {r['ternary_not_tq'][0]})")
    if r["written_per_layer"]:
        log(f"{r['written_per_layer']} cross-layer shared matrices are written once per layer (GGUF has no ties)")
    if r["tokenizer"] is None:
        log("no tokenizer (the source was not a GGUF file): llama.cpp runs it on token ids; "
            "--gguf-tokenizer FILE.gguf copies one")
