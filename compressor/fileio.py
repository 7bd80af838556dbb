"""Atomic writes: a crash never leaves a half-written output behind."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

from .errors import TritpressError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path` (not yet created: the writer creates it); rename it over
    `path` only on success, with the umask's permissions: outputs are meant to be read by others, and
    some writers (safetensors) create their file 0600 whatever the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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


def check_writable(folder, flag: str) -> None:
    """Fail now, in one line, if nothing can be written to `folder` (it or the nearest folder above it
    that exists), not at the first write after all the compute. Writes and removes a probe file: a
    permission bit says nothing for root, a read-only mount or a full disk."""
    folder = Path(folder)
    here = folder
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        raise TritpressError(f"cannot create the output folder {folder}: {here} is a file; choose another {flag}")
    probe = here / f".tritpress-write-check.{uuid.uuid4().hex[:12]}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise TritpressError(f"cannot write to {here} ({e.strerror or e}): choose another {flag}, or make "
                             "it writable") from None


def read_text_file(path, what: str = "file", encoding: str = "utf-8") -> str:
    """A text file's contents, or one line naming the file and what is wrong with it (not UTF-8,
    a folder, unreadable) instead of the raw UnicodeDecodeError / OSError."""
    try:
        return Path(path).read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise TritpressError(f"{what} {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                             f"{e.start}): convert it to UTF-8, e.g. iconv -f latin1 -t utf-8") from None
    except OSError as e:
        raise TritpressError(f"cannot read {what} {path}: {e.strerror or e}") from None


def read_json_file(path, what: str = "file"):
    """A JSON file's value, or one line naming the file and where its JSON breaks."""
    text = read_text_file(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TritpressError(f"{what} {path} is not valid JSON: {e}") from None


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
