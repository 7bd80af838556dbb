"""Command-line flags generated from the configuration dataclasses.

A setting is declared once, as a dataclass field with a trailing comment:

    seq_len: int = 128             # tokens per training sequence

`FlagSection` turns the fields of one dataclass into typer options (name from the
field, type from the annotation, help from the comment, choices from options.CHOICES);
`with_flags` adds them to a command, which receives the values given on the command
line as `flags: dict[section name, dict[field, value]]` (flags not given are absent,
so a recipe's values stay). Only positional arguments and flags that are not settings
(--recipe, --nproc, --json, --debug, ...) are declared by hand.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import re
import tokenize
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, List, Optional

import typer

from tritpress.cli.options import CHOICES

_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


@dataclass(frozen=True)
class FlagSection:
    """The flags of one config dataclass on one command.

    name: the recipe table the fields belong to ("" = top-level keys).
    prefix: put before each flag name (`onnx-` makes `block_size` `--onnx-block-size`).
    names: flag names that differ from prefix + field (`{"strategy": "sharing"}`); a tuple
        adds short aliases (`("out", "-o")`).
    only / skip: the fields that get a flag (positional arguments are skipped).
    hidden_aliases: old flag names still accepted but not listed (`{"data": "data"}`).
    required: fields whose flag must be given.
    """

    name: str
    cls: type
    prefix: str = ""
    names: dict = field(default_factory=dict)
    only: tuple = ()
    skip: tuple = ()
    hidden_aliases: dict = field(default_factory=dict)
    required: tuple = ()

    def fields(self) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(self.cls)
                if f.name not in self.skip and (not self.only or f.name in self.only)]

    def flag_names(self, name: str) -> tuple[str, ...]:
        """`--flag` and its short aliases for field `name`."""
        given = self.names.get(name, self.prefix + name.replace("_", "-"))
        names = (given,) if isinstance(given, str) else given
        return tuple(n if n.startswith("-") else "--" + n for n in names)

    def param_name(self, name: str, alias: bool = False) -> str:
        """The Python parameter of field `name` (unique across the sections of a command)."""
        return f"{'alias_' if alias else ''}{self.name or 'top'}__{name}"


def field_comments(cls) -> dict[str, str]:
    """Each field's trailing comment, with its continuation lines (comment-only lines indented
    deeper than the fields; a comment at the fields' own indent heads the next group), as one text."""
    source = inspect.getsource(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    comments: dict[str, list[str]] = {}
    current, indent = None, None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        text = tok.string.lstrip("#").strip()
        before = tok.line[:tok.start[1]]
        declared = re.match(r"(\s+)(\w+)\s*:", before)
        if before.strip() and declared and declared.group(2) in fields:
            current, indent = declared.group(2), len(declared.group(1))
            comments[current] = [text]
        elif not before.strip() and current and tok.start[1] > indent:
            comments[current].append(text)
        else:
            current = None
    return {name: " ".join(lines) for name, lines in comments.items()}


def field_type(cls, f: dataclasses.Field) -> tuple[type, bool]:
    """(scalar type, is a list) of a field annotated int, float, str, bool, `X | None` or list[X]."""
    annotation = f.type if isinstance(f.type, str) else _annotation_text(f.type)
    is_list = annotation.startswith(("list[", "List["))
    inner = annotation[5:-1] if is_list else annotation
    names = [part.strip() for part in inner.split("|") if part.strip() != "None"]
    if len(names) != 1 or names[0] not in _SCALARS:
        raise TypeError(f"{cls.__name__}.{f.name}: no flag type for annotation {annotation!r}")
    return _SCALARS[names[0]], is_list


def _annotation_text(annotation) -> str:
    if typing.get_origin(annotation) is list:
        return f"list[{typing.get_args(annotation)[0].__name__}]"
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return (args[0] if args else annotation).__name__


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def help_text(comment: str, f: dataclasses.Field, required: bool = False) -> str:
    """The comment as help: capitalized, with the field's default unless the comment names one."""
    text = comment[:1].upper() + comment[1:]
    default = _default(f)
    if required or "[default" in text or default is None or default is False or default == []:
        return text
    if isinstance(default, list):
        shown = ", ".join(map(str, default))
    else:
        shown = "on" if default is True else default
    return f"{text} [default: {shown}]"


_ENUMS: dict[tuple, type[Enum]] = {}


def choice_enum(cls, name: str) -> type[Enum] | None:
    """An Enum typer shows as a choice list, for a field with a fixed set of values."""
    values = CHOICES.get((cls.__name__, name))
    if values is None:
        return None
    key = (cls.__name__, name)
    if key not in _ENUMS:
        shown = [str(v) for v in values if v is not None]
        _ENUMS[key] = Enum(f"{cls.__name__}_{name}", {v: v for v in shown}, type=str)
    return _ENUMS[key]


def _option(section: FlagSection, f: dataclasses.Field, names: tuple, help: str, hidden=False) -> inspect.Parameter:
    scalar, is_list = field_type(section.cls, f)
    annotation = choice_enum(section.cls, f.name) or scalar
    decls = names
    if scalar is bool and _default(f) is True:
        decls = tuple(f"{n}/--no-{n[2:]}" if n.startswith("--") else n for n in names)
    annotation = List[annotation] if is_list else annotation
    required = f.name in section.required and not hidden
    info = typer.Option(... if required else None, *decls, help=help, hidden=hidden, show_default=False)
    return inspect.Parameter(section.param_name(f.name, alias=hidden), inspect.Parameter.KEYWORD_ONLY,
                             default=info, annotation=annotation if required else Optional[annotation])


def section_parameters(section: FlagSection) -> list[inspect.Parameter]:
    comments = field_comments(section.cls)
    params = []
    for f in section.fields():
        if not comments.get(f.name):
            raise TypeError(f"{section.cls.__name__}.{f.name} has no comment to use as its --help")
        help = help_text(comments[f.name], f, f.name in section.required)
        params.append(_option(section, f, section.flag_names(f.name), help))
        if f.name in section.hidden_aliases:
            params.append(_option(section, f, ("--" + section.hidden_aliases[f.name],), "", hidden=True))
    return params


def _plain(section: FlagSection, name: str, value):
    """A typer value as the field's own type (choices come as Enum members, lists as tuples)."""
    scalar, is_list = field_type(section.cls, next(f for f in dataclasses.fields(section.cls) if f.name == name))
    one = lambda v: scalar(v.value) if isinstance(v, Enum) else v  # noqa: E731
    return [one(v) for v in value] if is_list else one(value)


def given_flags(sections, values: dict) -> dict[str, dict]:
    """{section name: {field: value}} of the flags given (None / empty = not given)."""
    given: dict[str, dict] = {s.name: {} for s in sections}
    for section in sections:
        for f in section.fields():
            value = values.get(section.param_name(f.name))
            if value is None or value == [] or value == ():
                value = values.get(section.param_name(f.name, alias=True))
            if value is not None and value != [] and value != ():
                given[section.name][f.name] = _plain(section, f.name, value)
    return given


def with_flags(*sections: FlagSection) -> Callable:
    """Decorator: the command gets one option per field of `sections`, and their given
    values as the keyword argument `flags` (see given_flags)."""
    def decorate(command: Callable) -> Callable:
        generated = [p for s in sections for p in section_parameters(s)]
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "flags"]

        @functools.wraps(command)
        def wrapper(**kwargs):
            values = {p.name: kwargs.pop(p.name) for p in generated}
            return command(**kwargs, flags=given_flags(sections, values))

        wrapper.__signature__ = inspect.Signature(own + generated)
        wrapper.__annotations__ = {}  # the signature carries the resolved types
        wrapper.flag_sections = sections
        return wrapper
    return decorate
