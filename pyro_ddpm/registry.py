"""The registry: which program classes a name may stand for, and the one rule for code read from files.

Every configurable piece of a run -- reverse-process model, forward-process guide, decoder
(likelihood), network, timestep sampler -- is a class that describes itself: ``obj.config()`` returns
plain data (numbers, strings, lists, dicts) and ``Class.from_config(**config)`` rebuilds it (models
take the objects they are built around, e.g. the network, as keyword arguments beside the config).
The shipped classes derive both from their constructor's arguments (:class:`pyro_ddpm.config.Configurable`).
A checkpoint stores ``{"class": NAME, "config": {...}}`` for each, nothing else.

``NAME`` is resolved here, in one of two ways:

- a registered name: the shipped classes register themselves where they are defined
  (``@MODELS.register`` above the class), and a user's class registers the same way under its
  ``"module:Class"`` name (or a name it chooses). Importing the module that defines it is the user's act.
- an importable ``"module:Class"`` that is not registered: it is imported only when the caller says so
  (``trust_code=True``; ``--trust-code`` on the command line). A name typed by the user on a command
  line or passed in Python is the user's say-so; a name read from a checkpoint is not, so a
  checkpoint can never make ``pyro-ddpm sample`` or ``evaluate`` import code by itself.

Configs read from a file are checked against the class's own schema before anything is built
(:func:`check_config`): plain data only, only the keyword arguments ``from_config`` accepts, and none
of the objects the class is built around.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers


def check_complete(cls: type, what: str = "program") -> None:
    """Raise one TypeError naming the abstract (contract) methods ``cls`` leaves undefined."""
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise TypeError(f"{cls.__name__} is not a complete {what}: it does not define {', '.join(missing)}")


class Registry:
    """Names -> classes for one kind of program (``kind`` names it in errors).

    :param kind: e.g. ``"model"``.
    :param package: the package whose import registers the shipped classes (imported on first use).
    """

    def __init__(self, kind: str, package: str | None = None):
        self.kind = kind
        self.package = package
        self._classes: dict[str, type] = {}

    def _load(self) -> None:
        if self.package is not None:
            importlib.import_module(self.package)

    def register(self, cls: type | None = None, *, name: str | None = None):
        """Register ``cls`` under ``name`` (default: its ``__name__`` for pyro-ddpm's own classes, else
        ``"module:Class"``). Usable as ``@REGISTRY.register`` or ``@REGISTRY.register(name="...")``."""

        def add(c: type) -> type:
            if not isinstance(c, type):
                raise TypeError(f"{self.kind} registry: can register classes only, got {c!r}")
            check_complete(c, self.kind)  # a program class must define its contract (pyro_ddpm.programs)
            key = name or (c.__name__ if c.__module__.startswith("pyro_ddpm.") else qualified_name(c))
            known = self._classes.get(key)
            if known is not None and known is not c and not _same_definition(known, c):
                raise ValueError(f"{self.kind} registry: the name {key!r} is taken by {qualified_name(known)}")
            self._classes[key] = c
            return c

        return add(cls) if cls is not None else add

    def names(self) -> list[str]:
        """The registered names, shipped classes first (in registration order)."""
        self._load()
        return list(self._classes)

    def name_of(self, cls: type) -> str:
        """The name under which ``cls`` is stored: its registered name, else ``"module:Class"``."""
        self._load()
        for key, c in self._classes.items():
            if c is cls:
                return key
        return qualified_name(cls)

    def resolve(self, spec, *, trust_code: bool = False, origin: str = "") -> type:
        """The class ``spec`` stands for: a class, a registered name, or (``trust_code``) an importable
        ``"module:Class"``. One ValueError naming the problem otherwise.

        :param origin: where the name came from, for the error (e.g. ``"checkpoint runs/x/checkpoint.pt"``).
        """
        if isinstance(spec, type):
            return spec
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"a {self.kind} class must be named by a non-empty string, got {spec!r}")
        self._load()
        if spec in self._classes:
            return self._classes[spec]
        where = f" (named by {origin})" if origin else ""
        if ":" not in spec:
            raise ValueError(
                f"unknown {self.kind} {spec!r}{where}; choose one of {self.names()} "
                f"or a class of one's own as 'module:Class'"
            )
        for c in self._classes.values():  # a class registered under another name, stored by its qualified name
            if qualified_name(c) == spec:
                return c
        if not trust_code:
            raise ValueError(
                f"the {self.kind} class {spec!r}{where} is not registered, and importing it would run "
                f"its code: pass --trust-code (trust_code=True) if you trust it, or import and register it"
            )
        module_name, _, attribute = spec.partition(":")
        try:
            obj = importlib.import_module(module_name)
            for part in attribute.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"no {self.kind} class {spec!r}{where}: {e}") from None
        if not isinstance(obj, type):
            raise ValueError(f"{spec!r}{where} is not a class")
        return obj

    @staticmethod
    def _check_program_class(cls: type, spec, origin: str) -> None:
        """Raise ValueError unless ``cls`` describes itself (``from_config`` and ``config``); checked before
        anything is built, so a trusted import of some other class calls nothing of it."""
        if not callable(getattr(cls, "from_config", None)) or not callable(getattr(cls, "config", None)):
            where = f" (named by {origin})" if origin else ""
            raise ValueError(
                f"{spec!r}{where} is not a pyro-ddpm program class: it has no from_config/config "
                "(see pyro_ddpm.registry)"
            )

    def build(self, entry, *, trust_code: bool = False, origin: str = "", **objects):
        """``Class.from_config(**objects, **config)`` for a stored ``{"class": NAME, "config": {...}}``.

        The config is checked with :func:`check_config` first; ``objects`` are what the class is built
        around (a network, a schedule, a likelihood), passed by the caller, never read from a file.
        """
        if not isinstance(entry, dict) or set(entry) != {"class", "config"}:
            raise ValueError(
                f"a stored {self.kind}{' in ' + origin if origin else ''} must be "
                f"{{'class': NAME, 'config': {{...}}}}, got {_short(entry)}"
            )
        cls = self.resolve(entry["class"], trust_code=trust_code, origin=origin)
        self._check_program_class(cls, entry["class"], origin)
        what = f"{self.kind} {entry['class']!r}" + (f" of {origin}" if origin else "")
        config = check_config(cls, entry["config"], reserved=objects, what=what)
        try:
            return cls.from_config(**objects, **config)
        except (TypeError, ValueError) as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"cannot build the {what} from its config: {message}") from None

    def describe(self, obj) -> dict:
        """``{"class": name_of(type(obj)), "config": obj.config()}``: what a checkpoint stores."""
        config = obj.config()
        check_plain(config, f"{type(obj).__name__}.config()")
        return {"class": self.name_of(type(obj)), "config": config}


def _same_definition(a: type, b: type) -> bool:
    """Whether two classes are one definition loaded twice (same qualified name and source file), as when a
    script is run and also imported under another module name."""
    try:
        return a.__qualname__ == b.__qualname__ and inspect.getfile(a) == inspect.getfile(b)
    except TypeError:  # built-in or dynamically made classes have no file
        return False


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_plain(value, what: str = "config") -> None:
    """Raise ValueError unless ``value`` is plain data: None, bool, finite-or-not numbers, str, and lists,
    tuples and str-keyed dicts of plain data (what JSON and ``torch.load(weights_only=True)`` carry)."""
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, numbers.Real) and not hasattr(value, "shape"):
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            check_plain(v, what)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{what}: keys must be strings, got {k!r}")
            check_plain(v, what)
        return
    raise ValueError(f"{what}: only plain data (numbers, strings, lists, dicts) is allowed, got {type(value).__name__}")


def accepted_arguments(function) -> tuple[set[str], bool]:
    """(keyword names ``function`` accepts, whether it also takes ``**kwargs``)."""
    parameters = inspect.signature(function).parameters.values()
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names - {"self", "cls"}, any(p.kind == p.VAR_KEYWORD for p in parameters)


def check_config(cls: type, config, *, reserved=(), what: str = "") -> dict:
    """``config`` checked against ``cls.from_config``'s keyword arguments (its schema) and returned.

    Plain data only (:func:`check_plain`); every key must be an argument of ``from_config`` (or, when
    that takes ``**kwargs``, of ``__init__``); no key may name an object: one the caller passes
    (``reserved``) or one the class is built around (its ``built_around``).
    Floats must be finite where they stand alone (a NaN or inf hyper-parameter is refused).
    """
    what = what or cls.__name__
    reserved = set(reserved) | set(getattr(cls, "built_around", ()))
    if not isinstance(config, dict):
        raise ValueError(f"{what}: its config must be a dict, got {_short(config)}")
    check_plain(config, what)
    names, open_ended = accepted_arguments(cls.from_config)
    if open_ended:
        init_names, init_open = accepted_arguments(cls.__init__)
        names |= init_names
        open_ended = init_open
    unknown = sorted(set(config) - names) if not open_ended else []
    if unknown:
        raise ValueError(
            f"{what}: unknown config keys {unknown}; {cls.__name__} accepts {sorted(names - set(reserved))}"
        )
    clash = sorted(set(config) & set(reserved))
    if clash:
        raise ValueError(f"{what}: config keys {clash} are objects the caller provides, not stored data")
    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{what}: config value {key} = {value!r} is not finite")
    return dict(config)


MODELS = Registry("model", "pyro_ddpm.models")
GUIDES = Registry("guide", "pyro_ddpm.guides")
LIKELIHOODS = Registry("likelihood", "pyro_ddpm.likelihoods")
NETWORKS = Registry("network", "pyro_ddpm.nets")
TIMESTEPS = Registry("timestep sampler", "pyro_ddpm.timesteps")
