"""The two contracts: a guide is defined by its two distributions, a model by its three.

A forward process (a guide, :class:`ForwardProgram`) states

    q(x_t | x_0)              :meth:`ForwardProgram.q_xt`                                     (Eq. 4)
    q(x_{t-1} | x_t, x_0)     :meth:`ForwardProgram.q_prev`                               (Eqs. 6, 7)

and how given noise becomes a draw of the first (:meth:`ForwardProgram.from_noise`). A reverse process (a
model, :class:`ReverseProgram`) states

    p(x_T)                    :meth:`ReverseProgram.p_xT`
    p_theta(x_{t-1} | x_t)    :meth:`ReverseProgram.p_prev`                                   (Eq. 1)
    p_theta(x_0 | x_1)        :meth:`ReverseProgram.p_x0`                                    (Eq. 13)

the last two from one network output (:meth:`ReverseProgram.network_output`). Each is a distribution
over one datum's elements (batch shape = the data's, no event dimensions): Normal, Categorical, anything
Pyro scores. Everything else is derived here, once, for every family:

- ``chain(x0, num_images)``: the full chain, one site per term of Eq. 5 (sites ``x_T`` ... ``x_1``, ``x_0``);
  the model's run with ``x0=None`` is ancestral sampling (Algorithm 2);
- ``per_timestep(x0, t, weight)``: the training form over (image, timestep) pairs (see
  :mod:`pyro_ddpm.protocol` for the sites, the plate and the weights);
- reproducible draws: the trainer and the evaluator hand the guide standard noise of its declared kind
  (:attr:`ForwardProgram.noise`) through :class:`~pyro_ddpm.protocol.FixedNoise`, and the guide turns it
  into its draw, so results do not depend on how work is split.

A class that leaves a contract method undefined cannot be registered or built: the error names what is
missing. Capabilities that only some families have (DDIM, respacing, the probability-flow ODE,
progressive coding) are declared by the model class in :attr:`ReverseProgram.capabilities` and asked for
with :func:`require`.
"""

from __future__ import annotations

import abc
import copy

import pyro
import torch
from pyro import poutine
from pyro.distributions import TorchDistribution, constraints
from torch import nn

from pyro_ddpm import protocol
from pyro_ddpm.config import Configurable
from pyro_ddpm.registry import check_complete


def require(program, capability: str, what: str | None = None) -> None:
    """Raise one ValueError unless ``program``'s class declares ``capability`` (see ``capabilities``)."""
    declared = tuple(getattr(type(program), "capabilities", ()))
    if capability not in declared:
        raise ValueError(
            f"{type(program).__name__} does not support {what or capability} "
            f"(it declares {list(declared) or 'no optional capabilities'})"
        )


class Complete:
    """Mixin: construction of a class with an undefined contract method fails with one line naming it."""

    def __new__(cls, *args, **kwargs):
        check_complete(cls)
        return super().__new__(cls)


def subset(value, where: torch.Tensor):
    """``value`` at the batch entries ``where`` (tensors indexed, tuples of tensors element by element)."""
    if isinstance(value, tuple):
        return tuple(subset(v, where) for v in value)
    return value[where] if torch.is_tensor(value) else value


def check_pair(model_class: type, guide_class: type) -> None:
    """Raise one ValueError unless the model class reverses the guide class's family (``family``)."""
    m, g = getattr(model_class, "family", ""), getattr(guide_class, "family", "")
    if m != g:
        raise ValueError(
            f"{model_class.__name__} reverses a {m or 'unstated'} forward process, but {guide_class.__name__} "
            f"is {g or 'unstated'}: choose a model and a guide of the same family"
        )


class ScoredWhere(TorchDistribution):
    """A distribution scored only at the batch entries ``where``: ``make(where)`` builds it there, lazily.

    Elsewhere ``log_prob`` is 0. The per-timestep form scores the decoder p_theta(x_0 | x_1) only at t = 1
    pairs (under ``poutine.mask``); building and scoring it at every (image, t) pair would spend most of
    its work on entries the mask discards. Values and gradients at the kept entries are the decoder's own.

    :param make: ``make(where)`` -> the decoder over the kept entries.
    :param where: a boolean tensor over the leading batch dimension.
    :param batch_shape: the full batch shape (leading dimension = ``len(where)``).
    """

    arg_constraints = {}
    support = constraints.real

    def __init__(self, make, where: torch.Tensor, batch_shape, dtype=None):
        self.make, self.where, self.dtype = make, where, dtype
        super().__init__(torch.Size(batch_shape), torch.Size(), validate_args=False)

    def log_prob(self, value):
        dtype = self.dtype or (value.dtype if value.is_floating_point() else torch.get_default_dtype())
        zeros = torch.zeros(self.batch_shape, dtype=dtype, device=value.device)
        if self.where.device.type == "cpu" and not bool(self.where.any()):  # no t = 1 pair in this batch
            return zeros  # the decoder's work is skipped (on the GPU the check would cost a synchronization)
        kept = self.make(self.where).log_prob(value[self.where])
        return zeros.index_put((self.where,), kept.to(dtype))

    def sample(self, sample_shape=torch.Size()):
        return self.make(torch.ones(self.batch_shape[:1], dtype=torch.bool, device=self.where.device)).sample(
            sample_shape
        )


class ForwardProgram(Configurable, Complete, nn.Module, abc.ABC):
    """A forward process q(x_{1:T} | x_0) as a Pyro guide, defined by :meth:`q_xt` and :meth:`q_prev`.

    It is run in the reverse factorization q(x_T | x_0) prod_{t>=2} q(x_{t-1} | x_t, x_0) of the joint, so
    each latent's parents are its parents in the model: the condition under which
    ``TraceMeanField_ELBO``'s per-site KLs are exactly the terms L_T and L_{t-1} of Eq. 5.

    A subclass defines :meth:`q_xt`, :meth:`q_prev`, :meth:`from_noise` and :attr:`T`, and says in
    :attr:`noise` which standard noise its :meth:`from_noise` takes. ``schedule`` is the object the model
    is built around (``Model.from_config(schedule=guide.schedule, ...)``).
    """

    noise: str = "normal"  # the standard noise from_noise turns into a draw: "normal" or "uniform"
    family: str = ""  # the family of states it moves through; a model pairs with guides of its own family
    event_dim: int | None = None

    @property
    @abc.abstractmethod
    def T(self) -> int:
        """The number of diffusion steps."""

    @abc.abstractmethod
    def q_xt(self, x0: torch.Tensor, t: torch.Tensor):
        """q(x_t | x_0) per element (Eq. 4), ``t`` one timestep per datum of ``x0``."""

    @abc.abstractmethod
    def q_prev(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor):
        """q(x_{t-1} | x_t, x_0) per element; where t = 1 any finite stand-in (those entries are masked)."""

    @abc.abstractmethod
    def from_noise(self, fn, noise: torch.Tensor) -> torch.Tensor:
        """The draw of ``fn`` (a distribution of :meth:`q_xt`) that the standard noise ``noise`` gives."""

    @classmethod
    def for_data(cls, T: int, spec: str, data: protocol.DataSpec) -> ForwardProgram:
        """The guide a training run asks for: T steps, the schedule named ``spec``, for ``data``. By default
        ``from_spec(T, spec, event_dim)``; a guide that needs the data's levels overrides this."""
        return cls.from_spec(T, spec, len(data.shape))

    def check(self, x0: torch.Tensor, t: torch.Tensor | None = None) -> None:
        """One ValueError naming bad input (the guide runs first under every ELBO)."""
        if torch.is_tensor(x0) and self.event_dim is not None and x0.dim() != self.event_dim + 1:
            raise ValueError(
                f"x_0 has shape {tuple(x0.shape)}: expected a batch of data with {self.event_dim} dimension(s)"
            )
        protocol.check_batch(x0, x0.shape[1:] if torch.is_tensor(x0) else (), t, self.T)

    def register(self) -> None:
        """Parameters of the schedule (a learned one) are registered with Pyro: SVI trains them, and the
        model, built around the same schedule object, follows."""
        schedule = getattr(self, "schedule", None)
        if isinstance(schedule, nn.Module) and next(schedule.parameters(), None) is not None:
            protocol.register("schedule", schedule)

    def _event(self, d, x0):
        return d.to_event(self.event_dim if self.event_dim is not None else x0.dim() - 1)

    def chain(self, x0: torch.Tensor, num_images: int | None = None) -> None:
        """q(x_T | x_0) prod_{t=T..2} q(x_{t-1} | x_t, x_0)."""
        self.register()
        self.check(x0)
        B = x0.shape[0]
        with pyro.plate(protocol.IMAGES, B):
            t = torch.full((B,), self.T, dtype=torch.long, device=x0.device)
            x = pyro.sample(protocol.chain_site(self.T), self._event(self.q_xt(x0, t), x0))
            for step in range(self.T, 1, -1):
                x = pyro.sample(
                    protocol.chain_site(step - 1), self._event(self.q_prev(x, x0, torch.full_like(t, step)), x0)
                )

    def per_timestep(self, x0: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """q(x_T | x_0), then for each (image, t) pair x_t ~ q(x_t | x_0) and x_{t-1} ~ q(x_{t-1} | x_t, x_0)."""
        self.register()
        self.check(x0, t)
        B = x0.shape[0]
        with pyro.plate(protocol.IMAGES, B):
            T = torch.full((B,), self.T, dtype=torch.long, device=x0.device)
            pyro.sample(protocol.X_T, self._event(self.q_xt(x0, T), x0))
        x0, t = protocol.pairs(x0, t)
        with protocol.timestep_plate(t.view(B, -1), self.T), protocol.weighted(weight, t, x0):
            with poutine.mask(mask=False):
                x_t = pyro.sample(protocol.X_t, self._event(self.q_xt(x0, t), x0))
            with poutine.mask(mask=t > 1):
                pyro.sample(protocol.X_PREV, self._event(self.q_prev(x_t, x0, t), x0))


class ReverseProgram(Configurable, Complete, nn.Module, abc.ABC):
    """A reverse process p_theta(x_{0:T}) as a Pyro model, defined by :meth:`p_xT`, :meth:`p_prev` and
    :meth:`p_x0` around one network output :meth:`network_output`.

    A subclass holds its network as ``self.eps`` (registered with ``protocol.register("eps", ...)``, which is
    ``pyro.module``), the data shape as ``self.shape``, and defines the four methods, :attr:`T` and
    :meth:`check_data`.

    What the class declares for the rest of the package:

    - :attr:`objectives`: what it can be trained on (``training_program(objective)`` builds each);
    - :attr:`capabilities`: optional operations it supports (``"ddim"``, ``"respace"``, ``"ode"``,
      ``"progressive"``: progressive coding from the traced transition, :meth:`x0_from_transition`).
    """

    # a model's config (what a checkpoint stores) is its constructor's arguments (pyro_ddpm.config.Configurable),
    # less the objects it is built around, which the caller passes when it is rebuilt
    built_around = ("eps", "schedule", "likelihood")

    objectives: tuple[str, ...] = ("elbo",)
    family: str = ""  # the guides' family it reverses (ForwardProgram.family)
    variances: tuple[str, ...] = ()  # the variance rules a Gaussian class implements, the first the default
    capabilities: tuple[str, ...] = ()
    shape: tuple

    @property
    @abc.abstractmethod
    def T(self) -> int:
        """The number of diffusion steps."""

    @abc.abstractmethod
    def network_output(self, x_t: torch.Tensor, t: torch.Tensor):
        """The one network call at (x_t, t) that the transition and the decoder are read from."""

    @abc.abstractmethod
    def p_xT(self, batch: int, like: torch.Tensor):
        """p(x_T) per element, for ``batch`` data, in the dtype and on the device of ``like``."""

    @abc.abstractmethod
    def p_prev(self, x_t: torch.Tensor, t: torch.Tensor, out):
        """p_theta(x_{t-1} | x_t) per element, from the network output ``out`` at (x_t, t)."""

    @abc.abstractmethod
    def p_x0(self, x_1: torch.Tensor, t: torch.Tensor, out):
        """p_theta(x_0 | x_1) per element (the decoder), from the network output ``out`` at (x_1, t = 1)."""

    @abc.abstractmethod
    def check_data(self, x0: torch.Tensor, t: torch.Tensor | None = None) -> None:
        """One ValueError naming bad data (always checked, whatever Pyro's validation flag says)."""

    def p_step(self, x_t: torch.Tensor, t: torch.Tensor, out):
        """(:meth:`p_prev` at every pair, ``make(where)`` -> :meth:`p_x0` at the pairs ``where``): what the
        training form scores, from one network output. A class whose two distributions share work may
        override it to compute that work once; the distributions must be :meth:`p_prev`'s and :meth:`p_x0`'s."""
        return self.p_prev(x_t, t, out), lambda w: self.p_x0(x_t[w], t[w], subset(out, w))

    @classmethod
    def check_objective(cls, objective: str, guide_class: type) -> None:
        """Raise one ValueError if ``objective`` (one of :attr:`objectives`) cannot be trained with guides of
        ``guide_class``: asked before anything is built or written. Every pairing works by default."""

    @classmethod
    def network_input_shape(cls, data: protocol.DataSpec) -> tuple:
        """The shape of one network input for ``data`` (the network preset's ``shape``): the data's own here."""
        return tuple(data.shape)

    def x0_from_transition(self, fn, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The prediction of x_0 read off a traced transition ``fn`` = :meth:`p_prev` at (x_t, t) (for
        progressive coding, with no further network call); a class declaring ``"progressive"`` defines it."""
        require(self, "progressive", "progressive coding")
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Where the program's tensors live (its first parameter's or buffer's device; the CPU without either)."""
        tensor = next(self.parameters(), None)
        tensor = tensor if tensor is not None else next(self.buffers(), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def with_network(self, eps: nn.Module) -> ReverseProgram:
        """The same program around another network module (e.g. the same network wrapped for DDP)."""
        new = copy.copy(self)
        new._modules = dict(self._modules, eps=eps)
        return new

    def _event(self, d):
        return d.to_event(len(self.shape))

    def chain_start(self, x0: torch.Tensor | None, num_images: int | None) -> tuple[int, torch.Tensor]:
        """(number of images, a tensor whose dtype and device x_T takes) for a chain over ``x0`` or ``num_images``."""
        if x0 is not None:
            self.check_data(x0)
            return x0.shape[0], x0
        if num_images is None:
            raise ValueError("chain: give x0 or num_images")
        param = next(self.eps.parameters(), None)
        dtype = param.dtype if param is not None else torch.get_default_dtype()
        return num_images, torch.zeros((), dtype=dtype, device=self.device)

    def chain(self, x0: torch.Tensor | None = None, num_images: int | None = None) -> torch.Tensor:
        """p(x_T) prod_t p_theta(x_{t-1} | x_t) p_theta(x_0 | x_1): every term of Eq. 5 at its own site.

        With ``x0=None`` this is Algorithm 2 (ancestral sampling) of ``num_images`` data; the returned
        x_0 is an exact draw of the decoder.
        """
        protocol.register("eps", self.eps)
        num_images, like = self.chain_start(x0, num_images)
        with pyro.plate(protocol.IMAGES, num_images):
            x = pyro.sample(protocol.chain_site(self.T), self._event(self.p_xT(num_images, like)))
            t = torch.empty(num_images, dtype=torch.long, device=x.device)
            for step in range(self.T, 1, -1):
                s = torch.full_like(t, step)
                x = pyro.sample(
                    protocol.chain_site(step - 1), self._event(self.p_prev(x, s, self.network_output(x, s)))
                )
            s = torch.full_like(t, 1)
            return pyro.sample(protocol.X_0, self._event(self.p_x0(x, s, self.network_output(x, s))), obs=x0)

    def begin_per_timestep(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        """What every training form starts with: the network registered, the input checked, the site
        ``x_T`` (L_T, per image); returns B and the pairs (x_0 repeated per timestep, flat t)."""
        protocol.register("eps", self.eps)
        self.check_data(x0, t)
        B = x0.shape[0]
        with pyro.plate(protocol.IMAGES, B):
            pyro.sample(protocol.X_T, self._event(self.p_xT(B, x0)))
        return (B, *protocol.pairs(x0, t))

    def per_timestep(self, x0: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """The bound's terms at K timesteps per image, all scored with one network call.

        ``t`` is (B, K); see :mod:`pyro_ddpm.protocol`. The prior of the conditioning site ``x_t`` is a
        placeholder: the site is masked out in both programs and only carries the guide's draw.
        """
        B, x0, t = self.begin_per_timestep(x0, t)
        with protocol.timestep_plate(t.view(B, -1), self.T), protocol.weighted(weight, t, x0):
            with poutine.mask(mask=False):
                x_t = pyro.sample(protocol.X_t, self._event(self.p_xT(x0.shape[0], x0)))
            p_prev, p_x0 = self.p_step(x_t, t, self.network_output(x_t, t))
            with poutine.mask(mask=t > 1):
                pyro.sample(protocol.X_PREV, self._event(p_prev))
            decoder = ScoredWhere(p_x0, t == 1, x0.shape, dtype=x0.dtype)  # built and scored at t = 1 pairs only
            with poutine.mask(mask=t == 1):
                pyro.sample(protocol.X_0, self._event(decoder), obs=x0)
