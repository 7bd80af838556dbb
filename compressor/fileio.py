"""Atomic writes: a crash never leaves a half-written output behind."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from .errors import TritpressError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; rename it over `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder next to `path`; on success it takes the place of `path` (a folder
    already there is moved aside, then removed), so `path` is never a half-written folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_dir(path, "tmp")
    try:
        yield tmp
        old = _new_dir(path, "old")
        if path.exists():
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _new_dir(path: Path, kind: str) -> Path:
    """An empty folder .NAME.<random>.KIND next to `path`, with the umask's permissions (not
    mkdtemp's 0700: the output folder is meant to be read by others)."""
    new = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.{kind}"
    new.mkdir()
    return new


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def refuse_overwrite_input(outputs: list, inputs: list) -> None:
    """Outputs must never replace an input checkpoint, nor be written into an input model folder."""
    for out in outputs:
        out = Path(out).resolve()
        for src in inputs:
            if src is None or not Path(src).exists():
                continue
            src = Path(src).resolve()
            if out == src or (src.is_dir() and out.parent == src):
                raise TritpressError(f"refusing to write {out.name} into/over the input {src}; choose another --out")
