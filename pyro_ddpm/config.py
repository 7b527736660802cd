"""Classes that describe themselves from their constructor's arguments.

A class that mixes in :class:`Configurable` (first among its bases) writes no ``config()`` of its own:
the arguments its constructor is called with are recorded when an object is made, and

- ``obj.config()`` returns them as plain data (numbers, strings, lists, dicts), defaults filled in,
  minus the objects the class is built around (:attr:`Configurable.built_around`, e.g. a model's
  network, schedule and likelihood), which whoever rebuilds it passes again, and minus the choices of
  how the object is used (:attr:`Configurable.chosen_at_use`, e.g. a model's clipping of x_0), which
  whoever uses the rebuilt object makes again;
- ``Class.from_config(**objects, **config)`` is ``Class(**objects, **config)``.

A checkpoint stores ``{"class": NAME, "config": obj.config()}`` (see :mod:`pyro_ddpm.registry`, which
checks a stored config against the constructor before anything is built).

What is recorded is the call that made the object, ``Class(...)``, bound to ``Class``'s constructor.
Nothing is read back from attributes: a subclass whose constructor takes other arguments than its
base's and calls ``super().__init__`` with arguments of its own making (``LinearForwardProcess(T,
beta_1, beta_T)`` hands its base a schedule object) is described by its own arguments, and an
attribute that shares an argument's name but holds something else (a categorical guide's ``schedule``
object, built from the ``schedule`` name it was given) cannot leak into the config.

Two refinements, both written in the class itself:

- a constructor that resolves an argument's default from the others (a model's ``variance``, a
  network's ``out_channels``) records the value it resolved with :meth:`Configurable.record_config`,
  so the config says what was built;
- a class whose stored form legitimately differs from its constructor (a guide over a schedule
  object stores the schedule's betas) overrides ``config`` and ``from_config``. Such an override
  belongs to that constructor: a subclass that defines a constructor of its own is described from
  its own arguments again, unless it overrides the two as well.
"""

from __future__ import annotations

import copy
import functools
import inspect

import numpy as np
import torch

from pyro_ddpm.registry import check_plain

_ARGUMENTS = "_constructor_arguments"  # where an object keeps the arguments it was made with
_POSITIONAL = "*args"  # not an identifier: marks positional arguments a constructor took through *args


def snapshot(value):
    """``value`` as plain data where it has a plain form: tensors and arrays as (nested) lists, numpy
    scalars as Python numbers, tuples as lists (recursively); anything else is returned as it is."""
    if torch.is_tensor(value):
        return value.detach().cpu().tolist()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [snapshot(v) for v in value]
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    return value


@functools.cache
def _signature(init) -> inspect.Signature:
    """A constructor's signature, read once per constructor (objects are made often, e.g. decoders)."""
    return inspect.signature(init)


def _bind(cls: type, args: tuple, kwargs: dict) -> dict | None:
    """The named arguments of the call ``cls(*args, **kwargs)``, defaults filled in, ``**kwargs`` merged,
    ``built_around`` and ``chosen_at_use`` left out, values snapshotted; None when the call does not fit
    the constructor (then the constructor refuses it itself, or the object is being copied or unpickled
    and gets its record with the rest of its state)."""
    signature = _signature(cls.__init__)
    try:
        bound = signature.bind(None, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    arguments = {}
    for name, value in list(bound.arguments.items())[1:]:  # the first is self
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                arguments[_POSITIONAL] = len(value)
        else:
            arguments[name] = value
    return {k: snapshot(v) for k, v in arguments.items() if k not in cls.built_around + cls.chosen_at_use}


class Configurable:
    """Mixin: ``config()`` and ``from_config()`` from the constructor's arguments (see the module docstring).

    Put it first among the bases (``class ReverseProgram(Configurable, Complete, nn.Module, abc.ABC)``), so
    that it sees the constructor call before any base that drops the arguments.
    """

    built_around: tuple[str, ...] = ()
    """Constructor arguments that are objects the class is built around: never stored, always passed
    again to ``from_config`` (and refused in a stored config)."""

    chosen_at_use: tuple[str, ...] = ()
    """Constructor arguments that say how the object is used rather than what it is: not stored, so a
    rebuilt object starts from their defaults (a stored config may still set them)."""

    def __new__(cls, *args, **kwargs):
        following = super().__new__
        obj = following(cls) if following is object.__new__ else following(cls, *args, **kwargs)
        obj.__dict__[_ARGUMENTS] = _bind(cls, args, kwargs)
        return obj

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in vars(cls):  # a constructor of its own is described by its own arguments ...
            for name in ("config", "from_config"):
                if name not in vars(cls):  # ... unless the class overrides the description too
                    setattr(cls, name, vars(Configurable)[name])

    def constructor_arguments(self) -> dict:
        """The arguments this object was made with (a copy): defaults filled in, as refined by
        :meth:`record_config`, without :attr:`built_around` and :attr:`chosen_at_use`; values as the
        constructor got them where they have no plain form (for an override of :meth:`config` to store
        as data)."""
        arguments = self.__dict__.get(_ARGUMENTS)
        if arguments is None:
            raise ValueError(f"{type(self).__name__}: the object was not made by calling its class: it has no config")
        if _POSITIONAL in arguments:
            raise ValueError(
                f"{type(self).__name__}: its constructor took {arguments[_POSITIONAL]} argument(s) through *args, "
                "which have no names to store them under: pass them by name, or override config() and from_config()"
            )
        return dict(arguments)

    def record_config(self, **values) -> None:
        """Record what the constructor made of some of its arguments (a default resolved from the others, a
        normalized form), so that :meth:`config` says what was built.

        Only arguments of the object's own constructor are recorded: a base class records for every subclass
        that passes the argument on under the same name, and a subclass that does not take it is unaffected.
        """
        arguments = self.__dict__.get(_ARGUMENTS)
        if arguments is None:
            return
        known = {k: snapshot(v) for k, v in values.items() if k in arguments}
        if known:  # a new dict: a copy.copy of this object shares the old one
            self.__dict__[_ARGUMENTS] = {**arguments, **known}

    def config(self) -> dict:
        """The constructor's arguments as plain data, without :attr:`built_around` and :attr:`chosen_at_use`:
        ``type(self).from_config(**objects, **self.config())`` builds the same object."""
        arguments = self.constructor_arguments()
        for name, value in arguments.items():
            try:
                check_plain(value)
            except ValueError:
                raise ValueError(
                    f"{type(self).__name__}.config(): its constructor argument {name!r} is a {type(value).__name__}, "
                    "not plain data: list it in built_around if whoever rebuilds the object passes it in, or store "
                    "it as data in an override of config() and from_config()"
                ) from None
        return copy.deepcopy(arguments)  # plain data: the caller may change it without changing the record

    @classmethod
    def from_config(cls, **config):
        """``cls(**config)``, the objects the class is built around among the keyword arguments."""
        return cls(**config)
