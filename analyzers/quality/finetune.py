"""`compress finetune-head MODEL --task cls|tok|qa --train FILE --out DIR`: a task-finetuned
baseline (users compress fine-tuned models).

The encoder's weights are loaded into the transformers class with the task's head
(`AutoModelFor{SequenceClassification,TokenClassification,QuestionAnswering}`, head freshly
initialized), the whole model is fine-tuned with AdamW (linear decay, fixed seed and step
budget), and saved with its tokenizer as a Hugging Face folder that `compress` and
`compress evaluate` read like any other checkpoint (its own head is then used)."""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from tritpress.compressor.errors import TritpressError

from . import data as qdata
from .encode import encode_texts, encode_words, first_subtokens

AUTO_CLASSES = {"cls": "AutoModelForSequenceClassification", "tok": "AutoModelForTokenClassification",
                "qa": "AutoModelForQuestionAnswering"}


@dataclass
class FinetuneConfig:
    model: str = ""                   # an HF folder or pkg:NAME (a transformers encoder)
    task: str = "cls"                 # cls, tok or qa
    train: str = ""                   # training data (GLUE .tsv / CoNLL / SQuAD .json/.zip / .jsonl / .csv)
    out: str = ""                     # output HF folder (model + tokenizer)
    steps: int = 300                  # optimizer steps
    batch_size: int = 16              # examples per step
    lr: float = 5e-5                  # AdamW learning rate, linear decay
    max_length: int = 128             # cls/tok tokens; qa uses --qa-max-length / --doc-stride
    qa_max_length: int = 256          # QA window tokens
    doc_stride: int = 128             # QA window overlap
    max_samples: int = 0              # use at most N training examples, seeded; 0 = all
    qa_articles: float = 0.0          # qa: train on this leading fraction of the articles only (0 = all);
                                      # `compress evaluate --qa-heldout` then scores the other articles
    seed: int = 0                     # seed


def _folder(spec: str) -> str:
    from tritpress.compressor.bundled import resolve_bundled
    if spec.startswith("pkg:"):
        folder, gguf = resolve_bundled(spec)
        if gguf:
            raise TritpressError("finetune-head needs a transformers model folder, not a GGUF file")
        return folder
    if not (Path(spec) / "config.json").is_file():
        raise TritpressError(f"finetune-head needs a Hugging Face model folder with config.json: {spec}")
    return spec


def finetune_head(cfg: FinetuneConfig, progress=None) -> dict:
    import transformers
    from tritpress.compressor.fileio import refuse_overwrite_input, write_json
    if cfg.task not in AUTO_CLASSES:
        raise TritpressError(f"--task must be one of {', '.join(AUTO_CLASSES)}")
    folder = _folder(cfg.model)
    out = Path(cfg.out)
    refuse_overwrite_input([out / "config.json", out / "model.safetensors"], [folder])
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    batches, head_kw, labels_info = _training_batches(cfg, tok)
    torch.manual_seed(cfg.seed)
    model = getattr(transformers, AUTO_CLASSES[cfg.task]).from_pretrained(folder, **head_kw)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / cfg.steps))
    losses = []
    for step in range(cfg.steps):
        loss = model(**batches[step % len(batches)]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
        if progress:
            progress(step + 1, cfg.steps, losses[-1])
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    info = {"config": dataclasses.asdict(cfg), "base_folder": folder, "labels": labels_info,
            "first_loss": losses[0], "final_loss_mean_last_10": sum(losses[-10:]) / len(losses[-10:])}
    write_json(out / "finetune.json", info)
    return info


def _training_batches(cfg: FinetuneConfig, tok):
    """(batches of model inputs with labels, extra from_pretrained kwargs for the head, label names)."""
    return {"cls": _cls_batches, "tok": _tok_batches, "qa": _qa_batches}[cfg.task](cfg, tok)


def _shuffled_batches(n: int, cfg: FinetuneConfig) -> list[list[int]]:
    """range(n) in a seeded random order, the first cfg.max_samples (0 = all), in batches."""
    idx = list(range(n))
    random.Random(cfg.seed).shuffle(idx)
    idx = idx[:cfg.max_samples] if cfg.max_samples else idx
    return [idx[i:i + cfg.batch_size] for i in range(0, len(idx), cfg.batch_size)]


def _cls_batches(cfg: FinetuneConfig, tok):
    d = qdata.read_cls(cfg.train, "train")
    out = []
    for b in _shuffled_batches(len(d.texts), cfg):
        enc = encode_texts(tok, d, b, cfg.max_length)
        enc["labels"] = torch.tensor([d.labels[k] for k in b])
        out.append(dict(enc))
    return out, {"num_labels": len(d.label_names)}, d.label_names


def _tok_batches(cfg: FinetuneConfig, tok):
    d = qdata.read_tok(cfg.train, "train")
    tags = sorted({t for s in d.tags for t in s})
    index = {t: i for i, t in enumerate(tags)}
    out = []
    for b in _shuffled_batches(len(d.words), cfg):
        enc = encode_words(tok, d.words, b, cfg.max_length)
        labels = torch.full(enc["input_ids"].shape, -100)
        for r, k in enumerate(b):  # the first sub-token of each word carries its tag
            for w, t in enumerate(first_subtokens(enc, r, len(d.words[k]))):
                if t is not None:
                    labels[r, t] = index[d.tags[k][w]]
        enc["labels"] = labels
        out.append(dict(enc))
    return out, {"num_labels": len(tags), "id2label": dict(enumerate(tags)), "label2id": index}, tags


def _qa_batches(cfg: FinetuneConfig, tok):
    from .qa import encode_windows, span_labels
    d = qdata.read_qa(cfg.train, "train")
    if cfg.qa_articles:
        d, _ = qdata.split_by_article(d, cfg.qa_articles)
    out = []
    for b in _shuffled_batches(len(d.examples), cfg):
        chunk = [d.examples[k] for k in b]
        enc, sample, offsets, context = encode_windows(tok, chunk, cfg)
        enc["start_positions"], enc["end_positions"] = span_labels(chunk, sample, offsets, context)
        out.append(dict(enc))
    return out, {}, None
