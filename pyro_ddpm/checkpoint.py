"""Checkpoints: written atomically, read back into a model and guide with every mismatch named.

A checkpoint is a ``torch.save``d dict: ``format``, ``step``, ``config`` (the training config),
``network`` (its config), ``schedule`` (``name`` and ``betas``), ``variance``, ``likelihood`` (its
config), ``data`` (name, shape, levels), ``net`` and ``ema`` (state dicts), ``guide`` (the guide's
state dict: schedule buffers and any learned parameters), ``optim`` (optimizer state),
``timesteps`` (the timestep sampler's state) and ``rng`` (torch RNG state). The model and guide
classes are named in ``config["model"]`` and ``config["guide"]``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import tempfile
from pathlib import Path

import torch

FORMAT = 1
FILENAME = "checkpoint.pt"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    A crash at any point leaves either the old file or the new one, never a partial file; on an
    exception the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(file)`` on a binary file that replaces ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save(state: dict, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the run directory holding ``checkpoint.pt``."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path} (expected a file or a run directory holding {FILENAME})")
    return path


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    path = resolve(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - one clear message for any unreadable file
        raise ValueError(f"{path} is not a readable pyro-ddpm checkpoint: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pyro-ddpm checkpoint of format {FORMAT}")
    return state


def check_data(state: dict, shape, levels: int, what: str = "the data") -> None:
    """Raise ValueError unless data of ``shape`` with ``levels`` levels is what the checkpoint was trained on."""
    data = state["data"]
    if tuple(shape) != tuple(data["shape"]):
        raise ValueError(f"{what} has images of shape {tuple(shape)}, the checkpoint was trained on shape {tuple(data['shape'])}")
    if int(levels) != int(data["levels"]):
        raise ValueError(f"{what} has {levels} levels per dimension, the checkpoint was trained on {data['levels']}")


def program_class(spec, package: str):
    """A model or guide class: the class itself, its name in ``package``, or an importable ``"module:Class"``."""
    if isinstance(spec, type):
        return spec
    module_name, _, name = spec.rpartition(":") if ":" in spec else (package, ":", spec)
    try:
        obj = importlib.import_module(module_name)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"no program class {spec!r} (a class name in {package} or an importable 'module:Class'): {e}") from e
    if not isinstance(obj, type):
        raise ValueError(f"{spec!r} is not a class")
    return obj


def program_name(spec, package: str) -> str:
    """How a checkpoint stores a program class: its bare name if ``package`` exports it, else ``"module:Class"``."""
    cls = program_class(spec, package)
    if getattr(importlib.import_module(package), cls.__name__, None) is cls:
        return cls.__name__
    return f"{cls.__module__}:{cls.__qualname__}"


def build(state: dict, schedule=None, use_ema: bool = True, device="cpu", model_class=None, likelihood=None,
          guide_class=None):
    """The model and guide a checkpoint describes, with its EMA (or raw) weights, in eval mode.

    The classes are the ones the run was trained with (``config["model"]``, ``config["guide"]``; a
    custom program must be importable under the stored ``"module:Class"`` or be passed here). The
    guide is built by its ``from_config(T, schedule, event_dim)`` and then given the stored guide state
    (schedule buffers, learned parameters); the model is built around the guide's schedule.

    :param schedule: optionally, the schedule the caller expects; a different T or betas raises ValueError.
    :param model_class: a model class to build instead (e.g. :class:`~pyro_ddpm.models.ClippedReverseProcess`
        for ``clip_denoised``).
    :param likelihood: a decoder to use instead of the stored one (e.g. the official tanh approximation).
    :param guide_class: a guide class to build instead of the stored one.
    """
    from pyro_ddpm.likelihoods import likelihood_from_config
    from pyro_ddpm.nets import build_network
    from pyro_ddpm.schedule import Schedule

    config = state["config"]
    model_class = program_class(model_class or config.get("model", "ReverseProcess"), "pyro_ddpm.models")
    guide_class = program_class(guide_class or config.get("guide", "ForwardProcess"), "pyro_ddpm.guides")
    shape = tuple(state["data"]["shape"])
    if "guide" in state:
        spec = config["schedule"]
        if spec not in ("linear", "cosine", "learned"):  # the betas themselves (a file or a list): use the stored ones
            spec = ",".join(repr(float(b)) for b in state["schedule"]["betas"])
        guide = guide_class.from_config(int(config["T"]), spec, len(shape))
        guide.load_state_dict(state["guide"])
    else:  # written before guides had state: a fixed schedule
        from pyro_ddpm.guides import ForwardProcess

        guide = ForwardProcess(Schedule(state["schedule"]["betas"]), event_dim=len(shape))
    if schedule is not None:
        schedule.check_matches(guide.schedule.betas.detach())
    net = build_network(state["network"])
    net.load_state_dict(state["ema" if use_ema else "net"])
    model = model_class(net, guide.schedule, state["variance"], likelihood or likelihood_from_config(state["likelihood"]),
                        shape=shape)
    model.to(device).eval()
    guide.to(device).eval()
    return model, guide
