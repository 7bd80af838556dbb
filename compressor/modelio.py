"""How tritpress calls a model: the one place that builds inputs, runs a forward, reads the
main output, hooks block outputs and measures held-out quality. Training, the sharing analysis,
evaluation, export and the pipeline's checks all go through it.

- `ModelIO`: how to call a model and read its output, discovered once from its structure (and,
  for a custom module, from the shape of one output: logits per position, or only the next
  token's); `forward` takes token ids or a dict of keyword inputs; `lm_inputs` and
  `next_token_pairs` say what an LM forward reads and which tokens its logits predict.
- `logits` / `features` / `carried_state`: evaluation's calls (on the model's device, hidden
  states, recurrent state carried across calls).
- `BlockOutputs`: forward hooks recording each block's output (and input).
- `example_inputs` / `run_model` / `compare_outputs`: one example batch through two models, compared
  (the pipeline's checks: original vs ternary, converted vs reloaded packed file).
- `held_out_loss` / `held_out_quality`: calibration loss; perplexity for causal LMs, agreement
  with a teacher otherwise.
- `task_forward` / `eager_attention`: a task model's head logits and attention probabilities
  (task-aware QAT distils both).
"""
from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TritpressError
from .layers import FakeQuantEmbedding, FakeQuantRNN, QEmbedding, QRNN
from .structure import ModelStructure, discover, output_embeddings
from .vocab import TrimmedEmbedding

EXAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Ternary weights keep only the sign and a shared scale of every parameter.",
]
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")   # transformers class names of next-token LMs
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
IO_ATTR = "_tritpress_io"   # ModelIO cached on the model by ModelIO.of
HEAD_LOGITS = ("logits", "start_logits", "end_logits")   # a task head's outputs (classification; extractive QA)


# ---------------------------------------------------------------- what the model is

def is_hf(model: nn.Module) -> bool:
    """A transformers model: keyword inputs, a ModelOutput back."""
    return hasattr(model, "config") and hasattr(model.config, "to_dict")


def forward_params(model: nn.Module):
    """The parameters of model.forward, by name."""
    return inspect.signature(model.forward).parameters


def recurrent_modules(model: nn.Module) -> list[nn.Module]:
    """The outermost recurrent modules (nn.LSTM/GRU/RNN, or our wrappers around one)."""
    kinds = (nn.RNNBase, QRNN, FakeQuantRNN)
    found, inside = [], set()
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, kinds):
            found.append(m)
            inside.add(name)
    return found


def _rnns(model: nn.Module) -> list[nn.Module]:
    """Every module running a recurrence with a batch_first flag (a fake-quant wrapper's inner RNN)."""
    return [m for m in model.modules() if isinstance(m, (nn.RNNBase, QRNN))]


def embedding_rows(model: nn.Module) -> int | None:
    """Rows of the largest embedding table (float, fake-quant or quantized): the ids it takes."""
    kinds = (nn.Embedding, FakeQuantEmbedding, QEmbedding, TrimmedEmbedding)  # trimmed: the original ids
    return max((m.num_embeddings for m in model.modules() if isinstance(m, kinds)), default=None)


def device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


# ---------------------------------------------------------------- inputs and outputs

def is_encoder_decoder(model: nn.Module) -> bool:
    """A transformers seq2seq model (T5, BART, Marian...): its forward also reads decoder inputs."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


DECODER_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds", "labels")


def decoder_start_id(model: nn.Module) -> int:
    """The token a seq2seq decoder starts from (its config's, else BOS, else PAD, else 0)."""
    config = model.config
    return next((t for t in (getattr(config, "decoder_start_token_id", None), getattr(config, "bos_token_id", None),
                             getattr(config, "pad_token_id", None)) if t is not None), 0)


def shift_right(ids: torch.Tensor, start: int) -> torch.Tensor:
    """Teacher forcing: the decoder reads the start token, then every target token but the last."""
    return torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], 1)


def with_decoder_inputs(model: nn.Module, inputs: dict) -> dict:
    """`inputs` with the decoder reading the same tokens shifted right (teacher forcing on the
    source itself), when the model is encoder-decoder and no decoder input is given: the one input
    every seq2seq model accepts, so that checks, calibration and distillation can run it."""
    if not is_encoder_decoder(model) or any(k in inputs for k in DECODER_INPUTS) or "input_ids" not in inputs:
        return inputs
    return {**inputs, "decoder_input_ids": shift_right(inputs["input_ids"], decoder_start_id(model))}


def random_ids(vocab: int, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=generator)


def example_inputs(model: nn.Module, tokenizer=None, seq_len: int = 16, seed: int = 0) -> dict | tuple:
    """Keyword inputs for a transformers model (tokenized text when a tokenizer exists,
    else random ids), or a positional (ids,) tuple for a custom module."""
    vocab = embedding_rows(model)
    if tokenizer is not None:
        if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None):
            tokenizer.pad_token = tokenizer.eos_token
        enc = tokenizer(EXAMPLE_TEXT, return_tensors="pt", padding=True, truncation=True, max_length=seq_len * 4)
        if vocab is None or int(enc["input_ids"].max()) < vocab:
            return with_decoder_inputs(model, {k: v for k, v in enc.items() if k in TOKEN_INPUTS})
    g = torch.Generator().manual_seed(seed)
    if vocab is None:
        raise ValueError("cannot build an example input: the model has no embedding and no tokenizer")
    ids = random_ids(vocab, 2, seq_len, g)
    return with_decoder_inputs(model, {"input_ids": ids}) if hasattr(model, "config") else (ids,)


def keyword_inputs(model: nn.Module, enc: dict) -> dict:
    """The token tensors of `enc` the model's forward takes (no token_type_ids for GPT-2), on its device."""
    params = forward_params(model)
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    device = device_of(model)
    return {k: enc[k].to(device) for k in TOKEN_INPUTS if k in enc and (k in params or takes_any)}


def first_float_output(out) -> torch.Tensor:
    """The model's main output: logits / last_hidden_state / the first float tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    items = out.values() if isinstance(out, dict) else out
    for value in items:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
        if isinstance(value, (tuple, list)):
            try:
                return first_float_output(value)
            except ValueError:
                continue
    raise ValueError(f"no float tensor in the model output ({type(out).__name__})")


def output_tensors(out) -> list[torch.Tensor]:
    """Every tensor of a custom module's output (nested tuples and lists flattened, in order)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in output_tensors(o)]
    return []


@torch.no_grad()
def run_model(model: nn.Module, inputs) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return first_float_output(out).float()


def compare_outputs(reference: torch.Tensor, other: torch.Tensor) -> dict:
    a, b = reference.reshape(-1), other.reshape(-1)
    # a trimmed vocabulary's dropped ids score -inf: equal infinities agree, and the metrics are
    # over the values both outputs have (an infinity where the other is finite is reported)
    finite = torch.isfinite(a) & torch.isfinite(b)
    if not bool(finite.all()):
        mismatched = int((~finite & (a != b)).sum())
        a, b = a[finite], b[finite]
        return {**compare_outputs(a, b), "shape": list(reference.shape), "nonfinite_mismatch": mismatched}
    return {
        "max_abs_diff": float((a - b).abs().max()) if a.numel() else 0.0,
        "relative_l2": float((a - b).norm() / a.norm().clamp(min=1e-12)),
        "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
        "shape": list(reference.shape),
    }


# ---------------------------------------------------------------- calling it

@dataclass
class ModelIO:
    """How to call the model and read its output, discovered once from its structure."""

    hf: bool                 # keyword input_ids (transformers) or positional ids (custom module)
    seq_first: bool          # custom RNN models built with batch_first=False
    has_head: bool           # output is logits over a vocabulary
    causal: bool             # next-token prediction applies
    block_paths: list[str]
    no_cache: bool = False   # HF forward takes use_cache: pass False (one full-sequence forward, no KV cache)
    keywords: frozenset | None = None   # HF forward's keyword names; None: it takes any (**kwargs)
    next_token_only: bool = False   # the output is the next token's logits [batch, vocab], not one per position
    decoder_start: int | None = None   # an encoder-decoder LM: its decoder's start token (see lm_inputs)

    @classmethod
    def discover(cls, model: nn.Module, structure: ModelStructure | None = None) -> "ModelIO":
        structure = structure or discover(model)
        hf = is_hf(model)
        rnns = _rnns(model)
        seq_first = not hf and bool(rnns) and not all(getattr(r, "batch_first", False) for r in rnns)
        # transformers LMs return logits per position; a custom module's output shape tells (also
        # once converted, when its head is a quantized layer that structure discovery does not list)
        next_only = not hf and returns_next_token_only(model, seq_first)
        seq2seq = is_encoder_decoder(model) and (structure.head is not None or output_embeddings(model) is not None)
        has_head = structure.head is not None or next_only or seq2seq   # (a converted head is a QLinear)
        causal = (not hf and bool(rnns)) or next_only or type(model).__name__.endswith(CAUSAL_SUFFIXES) \
            or bool(getattr(getattr(model, "config", None), "is_decoder", False)) or seq2seq
        # every stack's blocks (an encoder's, then a decoder's), in the order a forward runs them
        blocks = [f"{s.path}.{i}" for s in structure.all_stacks if s.kind == "modulelist" for i in range(s.num_blocks)]
        params = forward_params(model) if hf else {}
        takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
        return cls(hf, seq_first, has_head, causal and has_head, blocks,
                   "use_cache" in params, None if takes_any or not hf else frozenset(params), next_only,
                   decoder_start_id(model) if seq2seq else None)

    @classmethod
    def of(cls, model: nn.Module) -> "ModelIO":
        """The model's ModelIO, discovered on first use and kept on the model."""
        io = getattr(model, IO_ATTR, None)
        if io is None:
            io = cls.discover(model)
            object.__setattr__(model, IO_ATTR, io)
        return io

    def takes(self, name: str) -> bool:
        return self.keywords is None or name in self.keywords

    def call(self, model: nn.Module, inputs, **kwargs):
        """The model's raw output on inputs in its own layout (a custom RNN's ids [seq, batch]):
        token ids, or a dict of keyword inputs (those the forward does not take are left out; a
        custom module gets input_ids alone). `kwargs` go to a transformers forward as they are."""
        if not self.hf:
            return model(inputs["input_ids"] if isinstance(inputs, dict) else inputs, **kwargs)
        if not isinstance(inputs, dict):
            inputs = {"input_ids": inputs}
        inputs = {k: v for k, v in with_decoder_inputs(model, inputs).items() if self.takes(k)}
        if self.no_cache:
            kwargs = {"use_cache": False, **kwargs}
        return model(**inputs, **kwargs)

    def forward(self, model: nn.Module, inputs) -> torch.Tensor:
        """Main output as float [batch, seq, ...] (a next-token-only model: [batch, vocab]) for token
        ids [batch, seq] or keyword inputs."""
        if not self.seq_first:
            return first_float_output(self.call(model, inputs)).float()
        ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs
        out = first_float_output(self.call(model, ids.t())).float()
        return out if self.next_token_only else out.transpose(0, 1)

    def lm_inputs(self, ids: torch.Tensor):
        """What a language-model forward reads of token blocks [batch, L]: all of them; for a
        next-token-only model the first L-1 tokens of each (the last one is its target); for an
        encoder-decoder LM the first half as the source and the second half, shifted right, as the
        decoder's input (a prefix LM: each target token is read after the whole source and the
        targets before it)."""
        if self.decoder_start is not None:
            half = ids.shape[1] // 2
            return {"input_ids": ids[:, :half], "decoder_input_ids": shift_right(ids[:, half:], self.decoder_start)}
        return ids[:, :-1] if self.next_token_only else ids

    def next_token_pairs(self, out: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [n, vocab], target ids [n]) of the forward `out` on `lm_inputs(ids)`: every
        position's prediction of the token after it, the next-token-only model's one prediction
        of each block's last token, or an encoder-decoder's prediction of each target token."""
        ids = ids.to(out.device)
        if self.next_token_only:
            return out, ids[:, -1]
        if self.decoder_start is not None:
            return out.flatten(0, 1), ids[:, ids.shape[1] // 2:].flatten()
        return out[:, :-1].flatten(0, 1), ids[:, 1:].flatten()

    def next_token_targets(self, out: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """next_token_pairs' targets aligned with every row of `out` flattened to [rows, vocab]:
        -100 where a row predicts nothing (each block's last position)."""
        ids = ids.to(out.device)
        if self.next_token_only or self.decoder_start is not None:
            return self.next_token_pairs(out, ids)[1]
        return torch.cat([ids[:, 1:], ids.new_full((len(ids), 1), -100)], 1).flatten()


@torch.no_grad()
def returns_next_token_only(model: nn.Module, seq_first: bool = False) -> bool:
    """Whether a custom module's output on token ids [batch, seq] is [batch, vocab] (only the next
    token's logits; vocab = the rows of one of its embedding tables) rather than one row per
    position: read from one forward on a 2 x 3 input of ids every table holds, in eval mode (each
    module's own mode is given back). A forward that does not take ids alone (the checks report
    it) counts as per-position."""
    kinds = (nn.Embedding, FakeQuantEmbedding, QEmbedding)
    tables = {m.num_embeddings for m in model.modules() if isinstance(m, kinds)}
    if not tables:
        return False
    batch, seq = 2, 3
    ids = (torch.arange(batch * seq) % min(tables)).view(batch, seq).to(device_of(model))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        out = first_float_output(model(ids.t() if seq_first else ids))
    except Exception:  # noqa: BLE001 - any failure of a foreign forward: not this kind of model
        return False
    finally:
        for m, training in modes:
            m.training = training
    return out.dim() == 2 and out.shape[0] == batch and out.shape[1] in tables


def head_logits(out) -> list[torch.Tensor]:
    """A task head's logits, float: [logits] (classification, tagging) or [start, end] (extractive QA)."""
    found = [getattr(out, key, None) for key in HEAD_LOGITS]
    found = [t.float() for t in found if isinstance(t, torch.Tensor)]
    if not found:
        raise TritpressError(f"the model output ({type(out).__name__}) has no task-head logits")
    return found


def task_forward(io: ModelIO, model: nn.Module, batch: dict, attentions: bool = False):
    """-> (head logits as `head_logits`, each layer's attention probabilities [B, heads, T, T]) of a
    task model on a batch of keyword inputs; labels in `batch` are left out (the caller scores them),
    and the attention list is empty when not asked for or when the attention kernel keeps none."""
    inputs = {k: v for k, v in batch.items() if k in TOKEN_INPUTS}
    out = io.call(model, inputs, **({"output_attentions": True} if attentions else {}))
    return head_logits(out), [a for a in (getattr(out, "attentions", None) or ()) if a is not None]


@contextlib.contextmanager
def eager_attention(*models: nn.Module):
    """While active, the transformers models run eager (math) attention: fused kernels (sdpa,
    flash) return no attention probabilities. Each gets its own implementation back after."""
    changed = []
    for model in models:
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if impl not in (None, "eager"):
            _set_attention(model, "eager")
            changed.append((model, impl))
    try:
        yield
    finally:
        for model, impl in changed:
            _set_attention(model, impl)


def _set_attention(model: nn.Module, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # older transformers: the config field is read at call time
        model.config._attn_implementation = impl


def logits(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits on the model's device."""
    ids = ids.to(device_of(model))
    inputs = {"input_ids": ids}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask.to(ids.device)
    return ModelIO.of(model).forward(model, inputs)


def features(model: nn.Module, enc: dict) -> torch.Tensor:
    """Last hidden state [B, T, H] of a transformers model (the probe's frozen features), on the CPU."""
    if not is_hf(model):
        raise TritpressError(f"probing {type(model).__name__} needs a transformers model (hidden states)")
    out = ModelIO.of(model).call(model, enc, output_hidden_states=True)
    hidden = getattr(out, "hidden_states", None)
    h = hidden[-1] if hidden else getattr(out, "last_hidden_state", None)
    if h is None:
        raise TritpressError(f"{type(model).__name__} returns no hidden states to probe")
    return h.float().cpu()


# ---------------------------------------------------------------- hooks

@contextlib.contextmanager
def carried_state(model: nn.Module):
    """While active, every outermost recurrent module starts from the state it ended with on the
    previous call (the stream is read as one sequence), whatever the model's own forward does."""
    state: dict[int, object] = {}
    ModelIO.of(model)  # discovered (one probe forward, see returns_next_token_only) before any state is carried

    def pre(module, args, kwargs):
        key = id(module)
        if key in state and len(args) == 1 and "hx" not in kwargs:
            return args + (state[key],), kwargs
        return None

    def post(module, args, kwargs, output):
        hx = output[1]
        state[id(module)] = tuple(h.detach() for h in hx) if isinstance(hx, tuple) else hx.detach()

    handles = []
    for m in recurrent_modules(model):
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class BlockOutputs:
    """Forward hooks that record each block's output (the hidden state it passes on), in call
    order; with `inputs`, also the hidden state each block received."""

    def __init__(self, model: nn.Module, paths: list[str], inputs: bool = False):
        self.outputs: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []
        self.handles = []
        for p in paths:
            block = model.get_submodule(p)
            if inputs:
                self.handles.append(block.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._hook))

    def _pre_hook(self, module, args, kwargs):
        self.inputs.append(args[0] if args else kwargs.get("hidden_states"))

    def _hook(self, module, args, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        self.outputs.append(out)

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def take_inputs(self) -> list[torch.Tensor]:
        out, self.inputs = self.inputs, []
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------- held-out quality

def nmse_per_sequence(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """[B]: each sequence's MSE normalized by the teacher's mean square."""
    s, t = student.float().flatten(1), teacher.float().flatten(1)
    return (s - t).pow(2).mean(1) / t.pow(2).mean(1).clamp(min=1e-8)


def nmse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE normalized by the teacher's mean square, per sequence, averaged over sequences:
    scale-free across blocks and models, and a mean of per-sequence terms, so splitting a batch
    across processes does not change it."""
    return nmse_per_sequence(student, teacher).mean()


def next_token_nll(out: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of a batch of logits over its ids, and the number of tokens scored."""
    nll = F.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    return float(nll), ids[:, 1:].numel()


def prefix_nll(io: ModelIO, model: nn.Module, ids: torch.Tensor) -> tuple[float, int]:
    """`next_token_nll` of a next-token-only model: token t of each sequence read after the window
    of its t tokens before it (t = 1 .. L-1), so the tokens scored, and their contexts, are those
    a per-position model scores in one forward."""
    total = 0.0
    for t in range(1, ids.shape[1]):
        out = io.forward(model, ids[:, :t])
        total += float(F.cross_entropy(out, ids[:, t].to(out.device), reduction="sum"))
    return total, ids[:, 1:].numel()


def batched_forward(io: ModelIO, model: nn.Module, ids: torch.Tensor, batch: int):
    """Yield (ids of the batch, main output) over `ids` in batches of `batch` sequences."""
    for i in range(0, len(ids), batch):
        chunk = ids[i: i + batch]
        yield chunk, io.forward(model, chunk if io.decoder_start is None else io.lm_inputs(chunk))


@torch.no_grad()
def held_out_sums(io: ModelIO, model: nn.Module, ids: torch.Tensor, reference: list | None = None,
                  batch: int = 8) -> tuple[float, int]:
    """(summed loss, count): next-token NLL over tokens for causal LMs (`prefix_nll` for a
    next-token-only model), else NMSE against `reference` (the original's output per batch) over
    sequences."""
    model.eval()
    total, count = 0.0, 0
    if io.next_token_only:  # a forward per scored position, each on a window of the sequence
        sums = [prefix_nll(io, model, ids[i: i + batch]) for i in range(0, len(ids), batch)]
        return sum(loss for loss, _ in sums), sum(n for _, n in sums)
    for k, (chunk, out) in enumerate(batched_forward(io, model, ids, batch)):
        if io.causal:
            logits, target = io.next_token_pairs(out, chunk)
            loss, n = float(F.cross_entropy(logits.float(), target, reduction="sum")), target.numel()
        else:
            loss, n = float(nmse_per_sequence(out, reference[k]).sum()), len(chunk)
        total += loss
        count += n
    return total, count


def held_out_loss(io: ModelIO, model: nn.Module, ids: torch.Tensor, reference: list | None = None,
                  batch: int = 8) -> float:
    """Mean loss of `held_out_sums`: NLL per token, or NMSE per sequence."""
    total, count = held_out_sums(io, model, ids, reference, batch)
    return total / count


@torch.no_grad()
def held_out_quality(io: ModelIO, model: nn.Module, blocks: torch.Tensor, teacher: nn.Module | None = None,
                     batch: int = 8) -> dict:
    """Held-out quality: perplexity for causal LMs, agreement with the teacher otherwise."""
    model.eval()
    if io.causal:
        nll_sum, n_tokens = held_out_sums(io, model, blocks, None, batch)
        return {"nll": nll_sum / n_tokens, "ppl": math.exp(nll_sum / n_tokens), "tokens": n_tokens}
    if teacher is None:
        return {}
    cos_sum, nmse_sum, n_batches = 0.0, 0.0, 0
    for ids, out in batched_forward(io, model, blocks, batch):
        ref = io.forward(teacher, ids)
        cos_sum += float(F.cosine_similarity(out.mean(1), ref.mean(1), dim=-1).mean())
        nmse_sum += float(nmse(out, ref))
        n_batches += 1
    if n_batches:
        return {"cosine_to_teacher": cos_sum / n_batches, "nmse_to_teacher": nmse_sum / n_batches,
                "sequences": len(blocks)}
    return {}
