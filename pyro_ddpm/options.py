"""Options declared once: a dataclass field says its default, its help, its check and whether a resumed run
may change it; the command line's flags and the checks are generated from the fields::

    @dataclass
    class Settings:
        steps: int = option(3000, "total training steps", check=positive, resumable=True)

:func:`add_arguments` turns every field into a flag (``steps`` -> ``--steps``, its type from the
annotation, ``dict`` fields as repeatable ``KEY=VALUE``, ``bool`` fields as switches: ``--name``, or
``--no-name`` for one that is on by default, both for one a resumed run may change) whose default is
"not given", and :func:`given` reads back the fields a command line set, so a caller can tell the
settings a user chose from the defaults (a resumed run keeps its stored ones).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing

NOT_GIVEN = argparse.SUPPRESS


def option(
    default=None,
    help: str | typing.Callable[[], str] = "",
    *,
    check: typing.Callable[[str, object], None] | None = None,
    resumable: bool = False,
    choices: typing.Callable[[], list] | list | None = None,
    flags: tuple[str, ...] = (),
    name: str | None = None,
    shortcuts: dict[str, tuple[type, str]] | None = None,
    metavar: str | None = None,
    factory: typing.Callable[[], object] | None = None,
):
    """A dataclass field with what the command line and the checks need.

    :param help: the flag's help (or a function returning it, for text read from the registries); " (default
        X)" is added unless the default is None, whose meaning the help states.
    :param check: ``check(name, value)`` raises one ValueError naming the field (see :func:`positive` etc.).
    :param resumable: a resumed run may set it again (every other field must match the stored run).
    :param choices: the allowed values (or a function returning them), offered by the flag; a fixed list is
        also the field's check when it has no other.
    :param flags: extra flag spellings (e.g. ``("-K",)``) beside ``--field-name``.
    :param name: the flag instead of ``--field-name`` (e.g. ``--model-option`` for ``model_options``).
    :param shortcuts: for a ``dict`` field, ``{key: (type, help)}``: a flag ``--key`` that sets that key.
    :param factory: a default factory (for a ``dict`` field), instead of ``default``.
    """
    if check is None and choices is not None and not callable(choices):  # a fixed list checks itself
        check = optional(one_of(choices))
    metadata = {
        "help": help,
        "check": check,
        "resumable": resumable,
        "choices": choices,
        "flags": tuple(flags),
        "name": name,
        "shortcuts": dict(shortcuts or {}),
        "metavar": metavar,
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# ----------------------------------------------------------------------------- checks
def positive(name: str, value) -> None:
    """A positive integer (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def integer(name: str, value) -> None:
    """An integer (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")


def plain_dict(name: str, value) -> None:
    """A dict with string keys."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{name} must be a dict with string keys, got {value!r}")


def positive_number(name: str, value) -> None:
    """A finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def optional(check):
    """``check``, or None."""

    def checked(name: str, value) -> None:
        if value is not None:
            check(name, value)

    return checked


def at_least(low: float, integer: bool = False):
    """A finite number >= ``low`` (an integer when ``integer``)."""

    def checked(name: str, value) -> None:
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value < low:
            what = "an integer" if integer else "a number"
            raise ValueError(f"{name} must be {what} >= {low:g}, got {value!r}")

    return checked


def greater_than(low: float):
    """A finite number > ``low``."""

    def checked(name: str, value) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= low:
            raise ValueError(f"{name} must be a number > {low:g}, got {value!r}")

    return checked


def within(low: float, high: float):
    """A number in [low, high)."""

    def checked(name: str, value) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
            raise ValueError(f"{name} must lie in [{low:g}, {high:g}), got {value!r}")

    return checked


def one_of(values):
    """One of ``values`` (or of ``values()`` when it is a function)."""

    def checked(name: str, value) -> None:
        allowed = list(values() if callable(values) else values)
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; choose one of {allowed}")

    return checked


def check_all(obj, as_flags: bool = False) -> None:
    """Run every field's check on ``obj`` (a dataclass instance), in field order; ``as_flags``: the error
    names the field's flag (``--max-batch``), as a command's options do."""
    for f in dataclasses.fields(obj):
        if f.metadata.get("check") is not None:
            f.metadata["check"](flag_name(f) if as_flags else f.name, getattr(obj, f.name))


def resumable(cls) -> tuple[str, ...]:
    """The fields a resumed run may change."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("resumable"))


# ----------------------------------------------------------------------------- the command line
def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag_name(f: dataclasses.Field) -> str:
    """The flag of a field: its declared ``name``, else ``--field-name`` (``--no-name`` for a switch that is on
    by default and that a resumed run may not change; one it may change has both, under ``--field-name``)."""
    if f.metadata.get("name"):
        return f.metadata["name"]
    switched_off = f.default is True and not f.metadata.get("resumable")
    return "--no-" + flag(f.name)[2:] if switched_off else flag(f.name)


def _bare(annotation):
    """``X`` for ``X | None``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _kind(annotation) -> type:
    """int, float, str, bool, list or dict: the type a field's annotation names (``X | None`` is X)."""
    annotation = _bare(annotation)
    return typing.get_origin(annotation) or annotation


def parse_value(text: str):
    """A ``KEY=VALUE`` value: a number, true/false/none, or the text itself."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def add_arguments(
    parser: argparse.ArgumentParser,
    cls,
    *,
    defaults=None,
    note: typing.Callable[[str], str | None] | None = None,
    skip: tuple[str, ...] = (),
) -> None:
    """A flag for every field of ``cls`` not in ``skip``; none has a default (``given`` reads what was set).

    :param defaults: an instance whose ``dict`` fields' values the shortcuts' help quotes (default: ``cls()``);
        every other default quoted is the field's declared one.
    :param note: ``note(field)`` -> the default's text for the help instead of its value (or None); for a
        shortcut of a ``dict`` field, ``note("field.key")``.
    """
    defaults = defaults if defaults is not None else cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta = f.metadata
        help_text = meta.get("help", "")
        help_text = help_text() if callable(help_text) else help_text
        value = f.default if f.default is not dataclasses.MISSING else None  # as declared ("auto", not its resolution)
        default_text = note(f.name) if note is not None else None
        if default_text is None and value is not None and value != {} and not isinstance(value, bool):
            default_text = f"default {value}"
        if default_text:
            help_text = f"{help_text} ({default_text})"
        kwargs = {"dest": f.name, "default": NOT_GIVEN, "help": help_text.replace("%", "%%")}
        kind = _kind(hints[f.name])
        name = flag_name(f)
        if kind is bool and meta.get("resumable"):  # a resumed run may turn it on or off: --name / --no-name
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif kind is bool:  # a switch: --name sets True; a field that defaults to True is switched off by --no-name
            kwargs.update(action="store_const", const=not f.default)
        elif kind is list:  # one or more values
            kwargs.update(nargs="+", type=typing.get_args(_bare(hints[f.name]))[0])
        elif kind is dict:
            kwargs.update(action="append", metavar=meta.get("metavar") or "KEY=VALUE")
            for key, (key_type, key_help) in meta.get("shortcuts", {}).items():
                shown = (note(f"{f.name}.{key}") if note is not None else None) or default_of(defaults, f.name, key)
                shown = f" ({shown})" if shown else ""
                parser.add_argument(
                    flag(key),
                    dest=f"{f.name}.{key}",
                    type=key_type,
                    default=NOT_GIVEN,
                    metavar=key.upper(),
                    help=f"override {key_help}{shown}",
                )
        else:
            kwargs["type"] = kind
            choices = meta.get("choices")
            if choices is not None:
                kwargs["choices"] = list(choices() if callable(choices) else choices)
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
        parser.add_argument(name, *meta.get("flags", ()), **kwargs)


def default_of(defaults, field: str, key: str) -> str:
    """The text a shortcut's help quotes: the key's value in the defaults' dict, if it is set there."""
    value = getattr(defaults, field, {}).get(key)
    return "" if value is None else f"default {value}"


def given(args: argparse.Namespace, cls) -> dict:
    """The fields of ``cls`` that the parsed command line set, ``dict`` fields read from their KEY=VALUEs."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if _kind(hints[f.name]) is dict and isinstance(value, list):
            pairs = {}
            for item in value:
                key, sep, text = item.partition("=")
                if not sep or not key:
                    raise ValueError(f"{flag_name(f)} expects KEY=VALUE, got {item!r}")
                pairs[key] = parse_value(text)
            value = pairs
        out[f.name] = value
    for f in dataclasses.fields(cls):  # the dict fields' shortcut flags, beside their KEY=VALUEs
        for key in f.metadata.get("shortcuts", {}):
            if hasattr(args, f"{f.name}.{key}"):
                if key in out.get(f.name, {}):
                    raise ValueError(f"{flag(key)} and {flag_name(f)} {key}=... both set {key}: give one")
                out[f.name] = {**out.get(f.name, {}), key: getattr(args, f"{f.name}.{key}")}
    return out
