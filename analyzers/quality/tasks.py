"""The four evaluation tasks, declared once (lm-evaluation-harness style) and run on one model.

Each runner takes the model, its tokenizer, the task data (already read: the same for the
baseline and the compressed model) and the EvalConfig, and returns
{"metrics": {...}, "protocol": {...}}. A model's own head is used when it has one for the
task; otherwise the probe protocol (analyzers/quality/probe.py) is used and labelled so.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tritpress.compressor.errors import TritpressError
from tritpress.compressor.modelio import features, is_hf

from . import lm, modelio
from .encode import batches, map_batches, model_inputs, progress_bar, ready_tokenizer
from .metrics import classification_scores, entity_scores, token_accuracy
from .probe import ProbeConfig, classifier_probe


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    default_data: str          # Hugging Face dataset used when no file is given (online)
    eval_split: str
    train_split: str           # probe training data when no --X-train is given
    metrics: tuple[str, ...]   # gated metrics, in report order
    probe_epochs: int = 10


TASKS = {
    "lm": Task("lm", "language modeling", "wikitext:wikitext-2-raw-v1", "test", "train",
               ("perplexity", "bits_per_byte"), probe_epochs=5),
    "cls": Task("cls", "text classification", "glue:sst2", "validation", "train",
                ("accuracy", "macro_f1", "f1"), probe_epochs=20),
    "tok": Task("tok", "token classification (NER)", "conll2003", "validation", "train",
                ("f1_lenient", "f1_strict", "token_accuracy"), probe_epochs=10),
    "qa": Task("qa", "extractive QA", "squad", "validation", "train", ("exact_match", "f1"), probe_epochs=10),
}


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise TritpressError(f"unknown task(s) {', '.join(unknown) or spec!r}; choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def use_own_head(model, task: str, probe: str) -> bool:
    if probe not in ("auto", "always"):
        raise TritpressError(f"probe must be auto or always, not {probe!r}")
    return probe == "auto" and modelio.has_head(model, task)


def probe_config(cfg, task: str) -> ProbeConfig:
    return ProbeConfig(epochs=cfg.probe_epochs or TASKS[task].probe_epochs, lr=cfg.probe_lr,
                       batch_size=cfg.probe_batch_size, seed=cfg.seed)


# ------------------------------------------------------------------ lm


def needs_lm_probe(model, tokenizer, probe: str) -> bool:
    """An encoder without its own LM head (e.g. a sentence-embedding BERT): masked-LM probe."""
    has_lm = modelio.lm_kind(model) is not None
    return is_hf(model) and getattr(tokenizer, "mask_token_id", None) is not None and (
        not has_lm or probe == "always" and modelio.lm_kind(model) == "masked")


def run_lm(model, tokenizer, texts: list[str], cfg, desc: str, train_texts: list[str] | None = None) -> dict:
    kind = "masked" if train_texts is not None else modelio.lm_kind(model)
    if kind is None:
        raise TritpressError(f"{type(model).__name__} has no language-model head (causal, masked or RNN)")
    from tritpress.compressor.data import tokenizer_fn
    if tokenizer is not None:
        encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        bos = tokenizer.bos_token_id if kind == "causal" else None
    else:
        # no tokenizer (e.g. an LSTM LM): a word vocabulary from the text, sized by the embedding
        encode, bos = tokenizer_fn(None, texts, modelio.vocab_size(model)), None
    stream = lm.build_stream(texts, encode, cfg.lm_tokens, bos)
    limit = modelio.max_positions(model)
    context = cfg.context or (128 if kind == "masked" else min(1024, limit or 1024))
    if limit and context > limit:
        raise TritpressError(f"--context {context} exceeds the model's {limit} positions")
    stride = cfg.stride or (context // 2 if kind == "causal" else context)
    protocol = {"kind": kind, "context": context, "tokens": len(stream.ids), "bytes": stream.n_bytes,
                "lines": stream.n_lines, "bos_prepended": bos is not None}
    unit_total = len(stream.ids) if kind != "masked" or not cfg.mlm_positions else min(cfg.mlm_positions,
                                                                                        len(stream.ids))
    with progress_bar(desc, unit_total, "tok", cfg.quiet) as update:
        if kind == "causal":
            protocol["stride"] = stride
            m = lm.causal_perplexity(model, stream, context, stride, cfg.batch_size,
                                     lambda n: update(min(stride, unit_total) * n))
        elif kind == "rnn":
            m = lm.rnn_perplexity(model, stream, context, update)
        else:
            tok = ready_tokenizer(tokenizer)
            protocol.update(metric="pseudo-perplexity", max_positions=cfg.mlm_positions, seed=cfg.seed)
            head = None
            if train_texts is not None:
                pc = probe_config(cfg, "lm")
                windows = cfg.lm_probe_windows
                train_stream = lm.build_stream(train_texts, encode, windows * context)
                head = lm.train_mlm_probe(model, train_stream, context, tok.mask_token_id, tok.cls_token_id,
                                          tok.sep_token_id, pc, windows, cfg.batch_size)
                protocol.update(probe=pc.to_dict(), probe_train_windows=windows, mask_rate=0.15,
                                probe_head="dense+GELU+LayerNorm, decoder = the model's own input embedding (frozen)")
            m = lm.pseudo_perplexity(model, stream, context, tok.mask_token_id, tok.cls_token_id,
                                     tok.sep_token_id, cfg.mlm_positions, cfg.seed, cfg.batch_size, update, head)
    protocol.update(scored_tokens=m["scored_tokens"], windows=m["windows"])
    metrics = {k: m[k] for k in ("perplexity", "bits_per_byte") if k in m}
    return {"metrics": metrics, "protocol": protocol, "head": "probe" if train_texts is not None else "own"}


# ------------------------------------------------------------------ cls


def _cls_encode(tok, data, idx, max_length):
    pairs = [data.pairs[i] for i in idx] if data.pairs else None
    return tok([data.texts[i] for i in idx], pairs, truncation=True, max_length=max_length, padding=True,
               return_tensors="pt")


def _pooled(model, tok, data, cfg, update) -> torch.Tensor:
    """Mean of the last hidden state over real tokens: one vector per example."""
    parts = batches(len(data.texts), cfg.batch_size)

    def one(i):
        enc = _cls_encode(tok, data, parts[i], cfg.max_length)
        h = features(model, model_inputs(model, enc))
        mask = enc["attention_mask"].unsqueeze(-1).float()  # CPU, like h
        return list((h * mask).sum(1) / mask.sum(1))
    return torch.stack(map_batches(one, len(parts), update))


def run_cls(model, tokenizer, train, test, cfg, desc: str) -> dict:
    tok = ready_tokenizer(tokenizer)
    n_labels = len(test.label_names)
    protocol = {"eval_examples": len(test.texts), "labels": test.label_names, "max_length": cfg.max_length}
    if use_own_head(model, "cls", cfg.probe):
        if model.config.num_labels != n_labels:
            raise TritpressError(f"the model's classifier has {model.config.num_labels} labels, the data {n_labels}")
        parts = batches(len(test.texts), cfg.batch_size)
        with progress_bar(desc, len(test.texts), "ex", cfg.quiet) as update:
            preds = map_batches(lambda i: model(**model_inputs(model, _cls_encode(tok, test, parts[i],
                                cfg.max_length))).logits.argmax(-1).tolist(), len(parts), update)
        head = "own"
    else:
        pc = probe_config(cfg, "cls")
        with progress_bar(desc + " (probe features)", len(train.texts) + len(test.texts), "ex", cfg.quiet) as u:
            x_train, x_test = _pooled(model, tok, train, cfg, u), _pooled(model, tok, test, cfg, u)
        probe = classifier_probe(x_train, torch.tensor(train.labels), n_labels, pc)
        with torch.no_grad():
            preds = probe(x_test).argmax(-1).tolist()
        head = "probe"
        protocol.update(probe=pc.to_dict(), probe_train_examples=len(train.texts), pooling="mean")
    return {"metrics": classification_scores(test.labels, preds, n_labels), "protocol": protocol, "head": head}


# ------------------------------------------------------------------ tok


def _first_subtokens(enc, row: int, n_words: int) -> list[int | None]:
    """Token index of each word's first sub-token (None if truncated away)."""
    first = [None] * n_words
    for t, w in enumerate(enc.word_ids(row)):
        if w is not None and first[w] is None:
            first[w] = t
    return first


def _tok_encode(tok, words, idx, max_length):
    try:
        return tok([words[i] for i in idx], is_split_into_words=True, truncation=True, max_length=max_length,
                   padding=True, return_tensors="pt")
    except Exception as e:  # e.g. byte-level BPE without add_prefix_space
        raise TritpressError(f"the tokenizer cannot encode pre-split words: {str(e).splitlines()[0]}") from e


def _word_outputs(model, tok, words, cfg, update, fn) -> list:
    """fn(per-token tensor [T, ...]) at each word's first sub-token; None for truncated words."""
    parts = batches(len(words), cfg.batch_size)

    def one(i):
        enc = _tok_encode(tok, words, parts[i], cfg.max_length)
        out = fn(model_inputs(model, enc))
        rows = []
        for r, s in enumerate(parts[i]):
            rows.append([None if t is None else out[r, t] for t in _first_subtokens(enc, r, len(words[s]))])
        return rows
    return map_batches(one, len(parts), update)


def run_tok(model, tokenizer, train, test, cfg, desc: str) -> dict:
    tok = ready_tokenizer(tokenizer, need_fast=True)
    protocol = {"eval_sentences": len(test.words), "eval_words": sum(map(len, test.words)),
                "tagging": "IOB2 (IOB1 input converted)", "first_subtoken_labels_word": True,
                "seqeval": {"lenient": "default (conlleval)", "strict": "mode='strict', scheme=IOB2"},
                "max_length": cfg.max_length}
    with progress_bar(desc, len(test.words) + (0 if use_own_head(model, "tok", cfg.probe) else len(train.words)),
                      "sent", cfg.quiet) as update:
        if use_own_head(model, "tok", cfg.probe):
            id2label = {int(k): v for k, v in model.config.id2label.items()}
            gold_tags = {t for s in test.tags for t in s}
            if not gold_tags & set(id2label.values()) - {"O"}:
                raise TritpressError(f"the model's labels {sorted(id2label.values())[:6]} do not match the data's "
                                     f"tags {sorted(gold_tags)[:6]}")
            per_word = _word_outputs(model, tok, test.words, cfg, update,
                                     lambda enc: model(**enc).logits.argmax(-1).cpu())
            preds = [["O" if p is None else id2label[int(p)] for p in row] for row in per_word]
            head = "own"
        else:
            pc = probe_config(cfg, "tok")
            tags = sorted({t for s in train.tags for t in s})
            index = {t: i for i, t in enumerate(tags)}
            feats = lambda enc: features(model, enc)  # noqa: E731
            train_rows = _word_outputs(model, tok, train.words, cfg, update, feats)
            x = torch.stack([v for row in train_rows for v in row if v is not None])
            y = torch.tensor([index[t] for row, ts in zip(train_rows, train.tags) for v, t in zip(row, ts)
                              if v is not None])
            probe = classifier_probe(x, y, len(tags), pc)
            test_rows = _word_outputs(model, tok, test.words, cfg, update, feats)
            flat = [v for row in test_rows for v in row if v is not None]
            with torch.no_grad():
                predicted = iter(probe(torch.stack(flat)).argmax(-1).tolist() if flat else [])
            preds = [["O" if v is None else tags[next(predicted)] for v in row] for row in test_rows]
            head = "probe"
            protocol.update(probe=pc.to_dict(), probe_train_sentences=len(train.words), probe_train_words=len(y))
    lenient, strict = entity_scores(test.tags, preds, "lenient"), entity_scores(test.tags, preds, "strict")
    metrics = {"f1_lenient": lenient["f1"], "f1_strict": strict["f1"], "token_accuracy": token_accuracy(test.tags, preds),
               "precision_lenient": lenient["precision"], "recall_lenient": lenient["recall"],
               "precision_strict": strict["precision"], "recall_strict": strict["recall"]}
    return {"metrics": metrics, "protocol": protocol, "head": head}
