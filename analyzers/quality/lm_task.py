"""The language-modeling task: read the texts, run a model over them (perplexity, bits per byte).

A causal LM, a masked LM (pseudo-perplexity), an RNN LM or a model that predicts only the next
token (one window per token) is scored with its own head; an
encoder without an LM head gets the masked-LM probe (analyzers/quality/lm.py). One job per
--lm-data text, labelled lm:<dataset>."""
from __future__ import annotations

from tritpress.compressor.errors import TritpressError
from tritpress.compressor.modelio import is_hf

from . import data as qdata
from . import heads, lm
from .bootstrap import lm_stats
from .encode import progress_bar, ready_tokenizer
from .probe import probe_config
from .registry import TaskData


def needs_lm_probe(task, model, tokenizer, cfg) -> bool:
    """An encoder without its own LM head (e.g. a sentence-embedding BERT): masked-LM probe."""
    has_lm = heads.lm_kind(model) is not None
    return is_hf(model) and getattr(tokenizer, "mask_token_id", None) is not None and (
        not has_lm or cfg.probe == "always" and heads.lm_kind(model) == "masked")


def read_lm(task, cfg, need_train: bool) -> list[TaskData]:
    """One job per evaluation text; the probe's training text (if needed) is read once, first."""
    train = None
    if need_train:
        train = _texts(task.train_data(cfg) or qdata.hf_train_spec(task.eval_data(cfg)[0], task.train_flag,
                                                                   task.train_split), task, cfg)
    jobs = []
    for spec in task.eval_data(cfg):
        texts = _texts(spec, task, cfg)
        prot = {"eval": {"data": spec, "lines_available": len(texts)}}
        if train is not None:
            prot["probe_train"] = {"data": task.train_data(cfg) or "train split", "lines_available": len(train)}
        jobs.append(TaskData(f"{task.name}:{qdata.short_name(spec)}", texts, train, prot))
    return jobs


def _texts(spec: str, task, cfg) -> list[str]:
    from tritpress.compressor.data import read_texts
    if qdata.is_local(spec) or spec.startswith("pkg:"):
        name, split = spec.partition("@")[0], spec.partition("@")[2] or task.eval_split
        return read_texts(name, split, cfg.lm_text_column)
    name, config, split = qdata.split_spec(spec, task.eval_split)
    return read_texts(f"{name}:{config}" if config else name, split, cfg.lm_text_column)


def _encoder(model, tokenizer, texts: list[str], kind: str, vocab: str | None = None):
    """(text -> token ids, BOS id to prepend or None): the --vocab vocabulary, else the tokenizer."""
    from tritpress.compressor.data import TokenVocab, tokenizer_fn
    if vocab:
        return TokenVocab.read(vocab, heads.vocab_size(model)).encode, None
    if tokenizer is not None:
        encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        return encode, tokenizer.bos_token_id if kind == "causal" else None
    # no tokenizer (e.g. an LSTM LM): a word vocabulary from the text, sized by the embedding
    return tokenizer_fn(None, texts, heads.vocab_size(model)), None


def check_lm(task, model, tokenizer, data: TaskData, cfg) -> None:
    """Before any model runs: a --vocab file that cannot be read, or does not fit the model, is refused."""
    if cfg.vocab:
        from tritpress.compressor.data import TokenVocab
        TokenVocab.read(cfg.vocab, heads.vocab_size(model))


def _window(model, kind: str, cfg) -> tuple[int, int]:
    """(context, stride) in tokens: the flags, else what suits the model (a next-token-only model
    runs one forward per token: 128)."""
    limit = heads.max_positions(model)
    context = cfg.context or (128 if kind in ("masked", "next") else min(256 if kind == "seq2seq" else 1024, limit or 1024))
    if limit and context > limit:
        raise TritpressError(f"--context {context} exceeds the model's {limit} positions")
    return context, cfg.stride or (context // 2 if kind == "causal" else context)


def run_lm(task, model, tokenizer, data: TaskData, cfg, desc: str) -> dict:
    kind = "masked" if data.train is not None else heads.lm_kind(model)
    if kind is None:
        raise TritpressError(f"{type(model).__name__} has no language-model head (causal, masked or RNN)")
    encode, bos = _encoder(model, tokenizer, data.test, kind, cfg.vocab)
    stream = lm.build_stream(data.test, encode, cfg.lm_tokens, bos)
    context, stride = _window(model, kind, cfg)
    protocol = {"kind": kind, "context": context, "tokens": len(stream.ids), "bytes": stream.n_bytes,
                "lines": stream.n_lines, "bos_prepended": bos is not None, "vocab": cfg.vocab}
    unit_total = len(stream.ids) if kind != "masked" or not cfg.mlm_positions else min(cfg.mlm_positions,
                                                                                        len(stream.ids))
    with progress_bar(desc, unit_total, "tok", cfg.quiet) as update:
        if kind == "causal":
            protocol["stride"] = stride
            m = lm.causal_perplexity(model, stream, context, stride, cfg.batch_size,
                                     lambda n: update(min(stride, unit_total) * n))
        elif kind == "seq2seq":
            protocol["metric"] = "target-side perplexity (each window: first half source, second half target)"
            m = lm.seq2seq_perplexity(model, stream, context, cfg.batch_size, update)
        elif kind == "rnn":
            m = lm.rnn_perplexity(model, stream, context, update)
        elif kind == "next":
            protocol["stride"] = 1
            m = lm.next_token_perplexity(model, stream, context, cfg.batch_size, update)
        else:
            m = _masked(task, model, tokenizer, stream, encode, data.train, context, cfg, protocol, update)
    protocol.update(scored_tokens=m["scored_tokens"], windows=m["windows"])
    metrics = {k.name: m[k.name] for k in task.metrics if k.name in m}
    return {"metrics": metrics, "protocol": protocol, "head": "probe" if data.train is not None else "own",
            "per_example": lm_stats(m["per_window"], m.get("bytes"))}


def _masked(task, model, tokenizer, stream, encode, train_texts, context: int, cfg, protocol: dict, update):
    """Pseudo-perplexity, with the model's MLM head or (train_texts given) a masked-LM probe."""
    tok = ready_tokenizer(tokenizer)
    protocol.update(metric="pseudo-perplexity", max_positions=cfg.mlm_positions, seed=cfg.seed)
    head = None
    if train_texts is not None:
        pc, windows = probe_config(cfg, task), cfg.lm_probe_windows
        train_stream = lm.build_stream(train_texts, encode, windows * context)
        head = lm.train_mlm_probe(model, train_stream, context, tok.mask_token_id, tok.cls_token_id,
                                  tok.sep_token_id, pc, windows, cfg.batch_size)
        protocol.update(probe=pc.to_dict(), probe_train_windows=windows, mask_rate=0.15,
                        probe_head="dense+GELU+LayerNorm, decoder = the model's own input embedding (frozen)")
    return lm.pseudo_perplexity(model, stream, context, tok.mask_token_id, tok.cls_token_id, tok.sep_token_id,
                                cfg.mlm_positions, cfg.seed, cfg.batch_size, update, head)
