"""Checkpoints: the one place that writes, reads, checks and rebuilds a training run's state.

A checkpoint is a ``torch.save``d dict of plain data and tensors, read back with
``torch.load(weights_only=True)`` (no pickled objects):

- ``format`` (:data:`FORMAT`), ``step``, ``finished`` (the run reached its step count);
- ``config``: the :class:`~pyro_ddpm.train.TrainConfig` as a dict, with the defaults it resolved
  (variance, warm-up) filled in, so a resumed run does what the first one did;
- ``programs``: for each of ``model``, ``guide``, ``likelihood``, ``network``, ``timesteps`` the
  self-description ``{"class": NAME, "config": {...}}`` of :mod:`pyro_ddpm.registry`;
- ``data``: name, source path, shape, levels, and the fingerprint of the training split
  (number of images and a SHA-256 of their values) that a resume must match;
- ``weights``: the state dicts of the network (``net``), its EMA (``ema``), the guide (schedule
  buffers and any learned parameters) and the timestep sampler;
- ``training``: optimizer and learning-rate scheduler state, EMA update count, the epoch's data
  order, RNG states, the number of processes and the recent per-image losses (divergence check).

:class:`TrainState` holds one; :meth:`TrainState.build` rebuilds the model and guide through the
registry, importing nothing that is not registered unless ``trust_code=True``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyro_ddpm.files import atomic_write
from pyro_ddpm.registry import GUIDES, LIKELIHOODS, MODELS, NETWORKS, TIMESTEPS

FORMAT = 2
FILENAME = "checkpoint.pt"
PROGRAMS = {"model": MODELS, "guide": GUIDES, "likelihood": LIKELIHOODS, "network": NETWORKS, "timesteps": TIMESTEPS}
_KEYS = {"format", "step", "finished", "config", "programs", "data", "weights", "training"}


def fingerprint(x: torch.Tensor) -> dict:
    """The number of images and the SHA-256 of their float32 values: what a resumed run's data must match."""
    values = x.detach().to(torch.float32).contiguous().cpu().numpy()
    return {"count": int(x.shape[0]), "sha256": hashlib.sha256(values.tobytes()).hexdigest()}


@dataclass
class TrainState:
    """A training run's state as a checkpoint stores it (see the module docstring)."""

    step: int
    config: dict
    programs: dict
    data: dict
    weights: dict
    training: dict = field(default_factory=dict)
    finished: bool = False
    path: Path | None = None  # where it was read from (not stored)

    # ----------------------------------------------------------------- files
    def to_bytes(self) -> bytes:
        """The checkpoint file's contents: a snapshot of the state now (later changes to the tensors do not
        reach it), to be written with :func:`write_bytes`, possibly later."""
        payload = {
            "format": FORMAT,
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "path"},
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()

    def save(self, path: str | os.PathLike) -> Path:
        return write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike, map_location="cpu") -> TrainState:
        """Read a checkpoint file (or the ``checkpoint.pt`` of a run directory); one ValueError for any problem."""
        path = resolve(path)
        try:
            raw = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - one clear message for any unreadable file
            raise ValueError(
                f"{path} is not a readable pyro-ddpm checkpoint: {type(e).__name__}: {str(e).splitlines()[0]}"
            ) from None
        if not isinstance(raw, dict) or "format" not in raw:
            raise ValueError(f"{path} is not a pyro-ddpm checkpoint (no 'format' entry)")
        if raw["format"] != FORMAT:
            raise ValueError(
                f"{path} is a pyro-ddpm checkpoint of format {raw['format']!r}; this version reads format "
                f"{FORMAT} (checkpoints of format 1 predate self-describing programs: train again)"
            )
        missing = sorted(_KEYS - set(raw))
        if missing:
            raise ValueError(
                f"{path} is a damaged pyro-ddpm checkpoint: it lacks {', '.join(repr(k) for k in missing)}"
            )
        for key in ("config", "programs", "data", "weights", "training"):
            if not isinstance(raw[key], dict):
                raise ValueError(
                    f"{path} is a damaged pyro-ddpm checkpoint: its {key!r} is a {type(raw[key]).__name__}, not a dict"
                )
        if isinstance(raw["step"], bool) or not isinstance(raw["step"], int) or raw["step"] < 0:
            raise ValueError(f"{path} is a damaged pyro-ddpm checkpoint: its step is {raw['step']!r}")
        for key, needed in (("data", ("name", "shape", "levels")), ("config", ("steps", "objective", "data"))):
            absent = [k for k in needed if k not in raw[key]]
            if absent:
                raise ValueError(f"{path} is a damaged pyro-ddpm checkpoint: its {key!r} lacks {absent}")
        lacking = sorted(set(PROGRAMS) - set(raw["programs"]))
        if lacking:
            raise ValueError(f"{path} is a damaged pyro-ddpm checkpoint: its programs lack {lacking}")
        for key in ("net", "ema", "guide"):
            if key not in raw["weights"]:
                raise ValueError(f"{path} is a damaged pyro-ddpm checkpoint: its weights lack {key!r}")
        return cls(**{k: raw[k] for k in _KEYS - {"format"}}, path=path)

    @property
    def origin(self) -> str:
        return f"checkpoint {self.path}" if self.path is not None else "the checkpoint"

    # ----------------------------------------------------------------- checks
    def check_data(self, shape, levels: int, what: str = "the data") -> None:
        """Raise ValueError unless data of ``shape`` with ``levels`` levels is what the run was trained on."""
        if tuple(shape) != tuple(self.data["shape"]):
            raise ValueError(
                f"{what} has images of shape {tuple(shape)}, the checkpoint was trained on shape "
                f"{tuple(self.data['shape'])}"
            )
        if int(levels) != int(self.data["levels"]):
            raise ValueError(
                f"{what} has {levels} levels per dimension, the checkpoint was trained on {self.data['levels']}"
            )

    def check_fingerprint(self, now: dict) -> None:
        """Raise ValueError unless ``now`` (the :func:`fingerprint` of the training split) is the one the run
        was trained on (count and hash)."""
        stored = self.data.get("fingerprint")
        if stored is not None and stored != now:
            raise ValueError(
                f"cannot resume: the training data changed since the checkpoint ({stored['count']} images, "
                f"sha256 {stored['sha256'][:12]}...; now {now['count']} images, sha256 {now['sha256'][:12]}...)"
            )

    def resume_config(self, asked: dict, resumable) -> dict:
        """The config a resumed run uses: the stored one, with the ``resumable`` fields the user set again.

        Every other field the user set (a value other than None) must equal the stored one (for a dict
        field such as ``net_overrides``, each key the user set); the error names each differing setting
        with its stored and its asked value.
        """
        stored = dict(self.config)
        differ = []
        for k, v in asked.items():
            if k in resumable or v is None or k not in stored:
                continue
            if isinstance(v, dict) and isinstance(stored[k], dict):  # e.g. net_overrides: the keys set again
                differ += [
                    (f"{k}.{key}", stored[k].get(key), value) for key, value in v.items() if stored[k].get(key) != value
                ]
            elif stored[k] != v:
                differ.append((k, stored[k], v))
        if differ:
            raise ValueError(
                "cannot resume: the run was trained with different settings: "
                + ", ".join(f"{k} = {old!r} (asked {new!r})" for k, old, new in differ)
                + "; only "
                + ", ".join(resumable)
                + " may change"
            )
        config = dict(stored, **{k: v for k, v in asked.items() if k in resumable and v is not None})
        if config["steps"] < self.step:
            raise ValueError(f"cannot resume to {config['steps']} steps: the checkpoint is at step {self.step}")
        return config

    # ----------------------------------------------------------------- the programs
    def build(
        self,
        *,
        trust_code: bool = False,
        use_ema: bool = True,
        device="cpu",
        likelihood=None,
        clip_denoised: bool = False,
        schedule=None,
    ):
        """The model and guide the run trained, with its EMA (or raw) weights, on ``device``, in eval mode.

        Classes are resolved through the registry; a class that is not registered is imported only with
        ``trust_code=True``. Configs are checked against each class's schema before anything is built.

        :param likelihood: a decoder to use instead of the stored one (e.g. the official tanh approximation).
        :param clip_denoised: the model with its x_0 prediction clipped (``model.with_clipping()``).
        :param schedule: the schedule the caller expects; a different T or betas raises ValueError.
        """

        def make(kind, **objects):
            return PROGRAMS[kind].build(self.programs[kind], trust_code=trust_code, origin=self.origin, **objects)

        guide = make("guide")
        _load_weights(guide, self.weights["guide"], "guide", self.origin)
        if schedule is not None:
            schedule.check_matches(guide.schedule.betas.detach())
        net = make("network")
        _load_weights(net, self.weights["ema" if use_ema else "net"], "network", self.origin)
        lik = likelihood if likelihood is not None else make("likelihood")
        model = make("model", eps=net, schedule=guide.schedule, likelihood=lik)
        if clip_denoised:
            model = model.with_clipping()
        model.to(device).eval()
        guide.to(device).eval()
        return model, guide

    def timestep_sampler(self, *, trust_code: bool = False):
        sampler = PROGRAMS["timesteps"].build(self.programs["timesteps"], trust_code=trust_code, origin=self.origin)
        if self.weights.get("timesteps") is not None:
            _load_weights(sampler, self.weights["timesteps"], "timestep sampler", self.origin)
        return sampler


def _load_weights(module: torch.nn.Module, state: dict, what: str, origin: str) -> None:
    """``module.load_state_dict(state)`` with a mismatch named in one line (missing/unexpected keys, shapes)."""
    own = module.state_dict()
    if not isinstance(state, dict):
        raise ValueError(f"{origin}: the {what} weights are not a state dict")
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and torch.is_tensor(state[k]) and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if shapes:
            parts.append(f"shapes differ: {'; '.join(shapes[:3])}{'...' if len(shapes) > 3 else ''} (stored vs built)")
        raise ValueError(f"{origin}: the {what} weights do not fit the {what} its config builds: " + ", ".join(parts))
    module.load_state_dict(state)


# ----------------------------------------------------------------------------- a trainer's state
def snapshot(trainer, step: int) -> TrainState:
    """The state of a :class:`~pyro_ddpm.train.Trainer` after ``step`` steps: what its resume needs to go on
    exactly as the uninterrupted run (weights, optimizer, EMA, data order, losses, every random stream)."""
    optim = trainer.svi.optim.get_state()
    return TrainState(
        step=step,
        config=dataclasses.asdict(trainer.config),
        programs={
            "model": MODELS.describe(trainer.model),
            "guide": GUIDES.describe(trainer.guide),
            "likelihood": LIKELIHOODS.describe(trainer.model.likelihood),
            "network": NETWORKS.describe(trainer.net),
            "timesteps": TIMESTEPS.describe(trainer.sampler),
        },
        data=trainer.data_record,
        weights={
            "net": _cpu(trainer.net.state_dict()),
            "ema": _cpu(trainer.ema.module.state_dict()),
            "guide": _cpu(trainer.guide.state_dict()),
            "timesteps": _cpu(trainer.sampler.state_dict()),
        },
        training={
            "optim": dict(optim, names=[k.replace(trainer.param_prefix, "$$$", 1) for k in optim["names"]]),
            "ema_updates": int(trainer.ema.n_averaged),
            "order": trainer.order,
            "losses": list(trainer.losses),
            "rng": {
                "torch": torch.get_rng_state(),
                "generator": trainer.generator.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            "world_size": trainer.processes.world,
        },
        finished=step >= trainer.config.steps,
    )


def restore(trainer, state: TrainState, *, trust_code: bool = False) -> None:
    """Put a freshly built :class:`~pyro_ddpm.train.Trainer` in the state ``state`` holds (the inverse of
    :func:`snapshot`); its random streams are set last, so nothing drawn after them is lost."""
    _load_weights(trainer.net, state.weights["net"], "network", state.origin)
    _load_weights(trainer.guide, state.weights["guide"], "guide", state.origin)
    stored = state.programs["timesteps"]  # its class is imported only if it is the one the (checked) config names
    trainer.sampler = state.timestep_sampler(
        trust_code=trust_code and isinstance(stored, dict) and stored.get("class") == trainer.config.timesteps
    )
    training = state.training
    names = [k.replace("$$$", trainer.param_prefix, 1) for k in training["optim"]["names"]]
    trainer.svi.optim.set_state(dict(training["optim"], names=names))
    _load_weights(trainer.ema.module, state.weights["ema"], "network (EMA)", state.origin)
    trainer.ema.n_averaged.fill_(int(training["ema_updates"]))
    trainer.start, trainer.order, trainer.losses = state.step, training["order"], list(training.get("losses", []))
    trainer.generator.set_state(training["rng"]["generator"])
    torch.set_rng_state(training["rng"]["torch"])
    if torch.cuda.is_available() and training["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state_all(training["rng"]["cuda"])


# The config fields that name program classes, and where each is resolved.
CLASS_FIELDS = {"model": MODELS, "guide": GUIDES, "likelihood": LIKELIHOODS, "timesteps": TIMESTEPS}


def resumed_config(path: Path, asked: dict, resumable, trust_code: bool | None) -> tuple[TrainState, dict]:
    """The checkpoint at ``path`` and the config its resumed run uses (:meth:`TrainState.resume_config`).

    A class name that only the checkpoint supplies (the caller did not name it) must be registered,
    unless ``trust_code`` is True: importing it would run code the checkpoint chose.
    """
    state = TrainState.load(path)
    unknown = sorted(set(state.config) - set(asked))
    if unknown:
        raise ValueError(f"{state.origin} holds settings this version does not know: {unknown}")
    config = state.resume_config(asked, resumable)
    for field_name, registry in CLASS_FIELDS.items():
        name = config.get(field_name)
        if name is None or trust_code is True or asked.get(field_name) == name:
            continue
        registry.resolve(name, trust_code=False, origin=state.origin)
    return state, config


def stamp(path: Path):
    """(size, mtime) of ``path``, or None: whether a file was replaced between two looks."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state.items()}


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the run directory holding ``checkpoint.pt``."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path} (expected a file or a run directory holding {FILENAME})")
    return path


def load_run(run: str | os.PathLike) -> tuple[TrainState, Path]:
    """A run's checkpoint (the run directory or the file) and the run's folder; a run that has not finished
    training (still training, or interrupted) is said on stderr."""
    state = TrainState.load(run)
    if not state.finished:
        print(
            f"pyro-ddpm: note: {resolve(run)} is at step {state.step} of {state.config['steps']}: the run is "
            "not finished (still training, or interrupted)",
            file=sys.stderr,
        )
    return state, Path(run) if Path(run).is_dir() else Path(run).parent


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write checkpoint contents (:meth:`TrainState.to_bytes`) over ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def load(path: str | os.PathLike, map_location="cpu") -> TrainState:
    """:meth:`TrainState.load`."""
    return TrainState.load(path, map_location=map_location)


def build(state: TrainState, **kwargs):
    """:meth:`TrainState.build` (``trust_code``, ``use_ema``, ``device``, ``likelihood``, ``clip_denoised``,
    ``schedule``)."""
    return state.build(**kwargs)
