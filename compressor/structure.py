"""Discover a model's structure generically: the stack of repeated blocks,
the quantizable layers (Linear, GPT-2's Conv1D, LSTM/GRU weights),
embeddings and the output head. No per-architecture tables."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

RNN_TYPES = (nn.LSTM, nn.GRU, nn.RNN)


# transformers' task heads: a fine-tuned classifier, tagger or QA reader
TASK_HEAD_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")


def default_granularity(model: nn.Module) -> str:
    """What granularity "auto" means for `model`: one scale per output channel for a task model
    (per-channel scored above per-tensor in the SST-2 task-QAT sweep, README "Choosing the recipe"), one
    per tensor otherwise (BitNet b1.58's choice for LMs)."""
    return "channel" if type(model).__name__.endswith(TASK_HEAD_SUFFIXES) else "tensor"


def is_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a Linear whose weight is stored [in, out]."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m)


def rnn_weight_names(rnn: nn.Module) -> list[str]:
    # remove_duplicate=False: layers that share a matrix (cross-layer sharing) each name it
    return [n for n, _ in rnn.named_parameters(recurse=False, remove_duplicate=False) if n.startswith("weight_")]


@dataclass
class BlockStack:
    path: str            # module path of the stack ("model.layers"), or of the RNN
    kind: str            # "modulelist" or "rnn-layers"
    num_blocks: int
    block_type: str
    params_per_block: int

    def contains(self, name: str) -> bool:
        return name == self.path or name.startswith(self.path + ".")


@dataclass
class LayerInfo:
    name: str            # module path
    kind: str            # linear | conv1d | embedding | rnn
    role: str            # block | head | embedding | outside
    shape: list[int]     # weight shape as Linear/Embedding ([out, in] / [num, dim]); RNN: [layers, hidden]
    params: int


@dataclass
class ModelStructure:
    blocks: BlockStack | None          # the largest stack: the one sharing plans tie within
    layers: list[LayerInfo] = field(default_factory=list)
    head: str | None = None
    head_tied_to: str | None = None   # embedding module whose weight the head shares
    stacks: list[BlockStack] = field(default_factory=list)   # every stack (encoder and decoder...), in model order

    @property
    def all_stacks(self) -> list[BlockStack]:
        """Every stack; a structure read from a file that lists none has its largest one."""
        return self.stacks or ([self.blocks] if self.blocks is not None else [])

    def by_role(self, role: str) -> list[LayerInfo]:
        return [layer for layer in self.layers if layer.role == role]

    def to_dict(self) -> dict:
        return asdict(self)


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at the dotted `path` of `model` (replacing what is there)."""
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _signature(m: nn.Module):
    return (type(m).__name__, tuple((n, tuple(p.shape)) for n, p in m.named_parameters()))


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _repeated(children: list[nn.Module]) -> bool:
    """Blocks of one stack: the same type and parameters, except that the first block may hold
    extra parameters of its own (T5's first block carries the relative-position bias every block
    reads)."""
    first, rest = _signature(children[0]), [_signature(c) for c in children[1:]]
    if not first[1] or any(sig != rest[0] for sig in rest):
        return False
    return first == rest[0] or (first[0] == rest[0][0] and set(rest[0][1]) < set(first[1]))


def find_block_stacks(model: nn.Module) -> list[BlockStack]:
    """Every ModuleList/Sequential of >= 2 repeated blocks (`_repeated`) that is not inside another
    one, in model order (an encoder's stack, then a decoder's); failing any, the multi-layer
    LSTM/GRUs (their layers are the blocks)."""
    found: list[BlockStack] = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) < 2 or not _repeated(list(m)):
            continue
        if any(s.contains(name) for s in found):
            continue  # a list inside a block of a stack already found
        found.append(BlockStack(name, "modulelist", len(m), type(m[-1]).__name__, _n_params(m[-1])))
    if found:
        return found
    return [BlockStack(name, "rnn-layers", m.num_layers, type(m).__name__, _n_params(m) // m.num_layers)
            for name, m in model.named_modules() if isinstance(m, RNN_TYPES) and m.num_layers >= 2]


def largest_stack(stacks: list[BlockStack]) -> BlockStack | None:
    """The stack with the most parameters (the first of equal ones)."""
    return max(stacks, key=lambda s: s.params_per_block * s.num_blocks) if stacks else None


def find_block_stack(model: nn.Module) -> BlockStack | None:
    """The largest stack of `find_block_stacks`."""
    return largest_stack(find_block_stacks(model))


def in_stacks(stacks: list[BlockStack], name: str) -> bool:
    """Whether module `name` lies inside a block of one of the ModuleList stacks."""
    return any(s.kind == "modulelist" and s.contains(name) for s in stacks)


def output_embeddings(model: nn.Module) -> nn.Module | None:
    """transformers' get_output_embeddings(), or None (none, or a custom model implementing it partially)."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except Exception:  # noqa: BLE001 - custom models may implement it partially
        return None


def lookup_multiplier(emb: nn.Embedding) -> float | None:
    """What an embedding's forward does to the rows it looks up: 1.0 for nn.Embedding's own lookup,
    the constant factor of a scaled lookup (BART's and Marian's word embeddings multiply by
    sqrt(d_model)), None when its forward is no lookup of the ids it is given (BART's learned
    positions read positions from the input's shape): such a table is left as it is."""
    if type(emb).forward is nn.Embedding.forward:
        return 1.0
    ids = torch.arange(min(emb.num_embeddings, 8), device=emb.weight.device).view(1, -1)
    try:
        with torch.no_grad():
            out = emb(ids)
    except Exception:  # noqa: BLE001 - a forward that needs more than ids is no plain lookup
        return None
    rows = F.embedding(ids, emb.weight.detach())
    if not isinstance(out, torch.Tensor) or out.shape != rows.shape:
        return None
    nonzero = rows.abs() > 1e-12
    if not bool(nonzero.any()):
        return None
    factor = float((out[nonzero] / rows[nonzero]).median())
    return factor if torch.allclose(out.float(), rows.float() * factor, rtol=1e-4, atol=1e-6) else None


def _find_head(model: nn.Module, linears: dict[str, nn.Module], embeddings: dict[str, nn.Embedding], stack=None):
    """Return (head module name, embedding name it is tied to or None)."""
    # a wrapper around the head (a trimmed vocabulary, compressor/vocab) names its Linear
    head = next((f"{n}.{m.vocab_head}" for n, m in model.named_modules()
                 if isinstance(getattr(m, "vocab_head", None), str) and f"{n}.{m.vocab_head}" in linears), None)
    out = output_embeddings(model) if head is None else None
    if out is not None:
        head = next((n for n, m in linears.items() if m is out), None)
    emb_by_weight = {id(e.weight): n for n, e in embeddings.items()}
    if head is None:
        # a Linear sharing an embedding's weight is a tied output head
        head = next((n for n, m in linears.items() if id(m.weight) in emb_by_weight), None)
    if head is None and embeddings:
        # a trimmed token embedding (compressor/vocab) names its table: the vocabulary is its original size
        wrapped = [m.num_embeddings for m in model.modules() if isinstance(getattr(m, "vocab_table", None), str)]
        vocab = max([e.num_embeddings for e in embeddings.values()] + wrapped)
        # a head is never inside the repeated blocks (a block's Linear can be vocabulary-sized by chance)
        inside = stack.contains if stack is not None and stack.kind == "modulelist" else (lambda n: False)
        vocab_sized = [n for n, m in linears.items() if _out_features(m) == vocab and not inside(n)]
        head = vocab_sized[-1] if vocab_sized else None
    tied = emb_by_weight.get(id(linears[head].weight)) if head else None
    return head, tied


def _out_features(m: nn.Module) -> int:
    return m.nf if is_conv1d(m) else m.out_features


def _linear_shape(m: nn.Module) -> list[int]:
    return [m.nf, m.weight.shape[0]] if is_conv1d(m) else list(m.weight.shape)


def discover(model: nn.Module, exclude: list[str] | tuple = ()) -> ModelStructure:
    stacks = find_block_stacks(model)
    stack = largest_stack(stacks)
    patterns = [re.compile(p) for p in exclude]
    skip = lambda name: any(p.search(name) for p in patterns)  # noqa: E731
    linears = {n: m for n, m in model.named_modules() if is_linear(m) and not skip(n)}
    embeddings = {n: m for n, m in model.named_modules() if isinstance(m, nn.Embedding) and not skip(n)
                  and lookup_multiplier(m) is not None}
    rnns = {n: m for n, m in model.named_modules() if isinstance(m, RNN_TYPES) and not skip(n)}
    head, tied = _find_head(model, linears, embeddings, stack)
    in_blocks = (lambda n: in_stacks(stacks, n)) if any(s.kind == "modulelist" for s in stacks) else None

    layers = []
    for n, e in embeddings.items():
        layers.append(LayerInfo(n, "embedding", "embedding", list(e.weight.shape), e.weight.numel()))
    for n, r in rnns.items():
        layers.append(LayerInfo(n, "rnn", "block", [r.num_layers, r.hidden_size], _n_params(r)))
    for n, m in linears.items():
        if n == head:
            role = "head"
        elif in_blocks is None or in_blocks(n):
            # no repeated stack found (or an RNN model): every Linear but the head is core compute
            role = "block" if in_blocks is not None or not rnns else "outside"
        else:
            role = "outside"
        kind = "conv1d" if is_conv1d(m) else "linear"
        layers.append(LayerInfo(n, kind, role, _linear_shape(m), m.weight.numel()))
    return ModelStructure(stack, layers, head, tied, stacks)
