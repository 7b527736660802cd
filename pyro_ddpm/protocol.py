"""The protocol a reverse-process model and a forward-process guide follow.

Both programs expose the same two entry points with the same arguments, so that Pyro's ``SVI``,
``Predictive`` and this package's evaluator can pair any model with any guide.

``chain(x0=None, num_images=None)`` -- the full chain, Eq. 5 term by term.
    Under ``pyro.plate("images", B)`` the sites are ``x_T`` (written ``f"x_{T}"``, e.g. ``x_1000``),
    then ``x_{T-1}``, ..., ``x_1`` (latent, event shape = the image shape) and the observed ``x_0``.
    With ``TraceMeanField_ELBO`` the latent site ``x_s`` contributes L_s (s = 1..T; ``x_T`` gives
    L_T) and ``x_0`` contributes L_0: site ``x_s`` <-> term L_s. Run with ``x0=None`` the model is
    ancestral sampling (Algorithm 2).

``per_timestep(x0, t, weight=None)`` -- the training form: ``t`` is a (B, K) integer tensor of
    timesteps in 1..T. Sites:

    - ``x_T`` under ``pyro.plate("images", B)``: L_T.
    - under :func:`timestep_plate`, a plate over the B*T (image, t) pairs subsampled to the B*K given
      ones (so each term carries the unbiasing scale T/K):

        - ``x_t``: x_t ~ q(x_t | x_0) (Eq. 4), masked out in both programs (it only conditions);
        - ``x_{t-1}``: q(x_{t-1} | x_t, x_0) against p_theta(x_{t-1} | x_t), masked to t > 1: L_{t-1};
        - ``x_0`` (observed, model only): the decoder at t = 1, masked to t = 1: L_0.

    - ``weight`` (optional, length T + 1, indexed by t) scales each pair's terms by weight[t] through
      ``poutine.scale`` in both programs: how L_simple reweights the bound.

Batch layout of the pair sites: pair b * K + k is image b at timestep t[b, k].

What the rest of the package reads from a pair:

- the trainer (``SVI`` with :class:`~pyro_ddpm.elbo.TermwiseELBO`) and the evaluator take every
  sample site's term as Pyro does: the analytic KL(guide || model) for a latent site, -log p for an
  observed one (``pyro.factor`` sites included), times the site's scale and mask; the evaluator runs
  ``per_timestep`` with every timestep and reads the sites ``x_T``, ``x_{t-1}`` and ``x_0`` per pair;
- both draw x_t from their own seeded standard noise of the guide's kind (``guide.noise``) through
  :class:`FixedNoise` and the guide's ``from_noise``;
- progressive coding asks the model for its prediction of x_0 read off the traced ``x_{t-1}``
  distribution (``model.x0_from_transition``), for a model class that declares it;
- the programs register their modules (the network, a learned schedule) with :func:`register`, which is
  ``pyro.module``; the trainer answers it after the first step (:class:`RegisterOnce`).

The programs themselves are defined by their distributions (:mod:`pyro_ddpm.programs`): the two forms
above are derived there once for every family. How a program is built (so that ``pyro-ddpm train
--model/--guide/--likelihood`` and checkpoints work for a class of one's own, registered or named
``"module:Class"``; see :mod:`pyro_ddpm.registry`): the guide by ``Guide.for_data(T, schedule, data)`` for
training and ``Guide.from_config(**config)`` from a checkpoint, its ``state_dict()`` stored and restored;
the model by ``Model.from_config(eps=network, schedule=guide.schedule, likelihood=..., **config)`` around
the guide's schedule object (so a learned schedule is shared), the network preset given the output the
class asks for by ``Model.network_config(preset, data)`` (:class:`DataSpec`: the data's shape and levels);
a decoder by ``Likelihood.for_data(dataset)``, rebuilt from its ``config()``.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.params import param_with_module_name
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import effectful


class DataSpec(NamedTuple):
    """What a program needs to know of the data: the shape of one datum and its levels per dimension.

    ``levels`` is K >= 2 for data on the K-level grid -1 + 2k/(K-1), 0 for continuous data. For an image
    (C, H, W) ``channels`` is C; for flat data (D,) it is D (the network's output has
    ``output_channels`` in that place, see :meth:`pyro_ddpm.models.ReverseProcess.output_channels`).
    """

    shape: tuple
    levels: int = 0

    @property
    def channels(self) -> int:
        return int(self.shape[0])

    @property
    def dims(self) -> int:
        out = 1
        for s in self.shape:
            out *= int(s)
        return out


IMAGES = "images"
PAIRS = "(x_0, t)"
X_T = "x_T"
X_t = "x_t"
X_PREV = "x_{t-1}"
X_0 = "x_0"


def chain_site(s: int) -> str:
    """The chain form's name of x_s (s = 0..T)."""
    return f"x_{s}"


def check_batch(x0, shape, t=None, T: int | None = None, name: str = "x_0") -> None:
    """Raise one ValueError naming the problem unless ``x0`` is a non-empty floating-point torch tensor of
    data of ``shape`` with finite values and, when given, ``t`` a (B, K) integer tensor of timesteps in 1..T.

    Both programs call this first (the guide runs first under every ELBO), whatever Pyro's validation
    flag says: bad input gives this error before any distribution is built.
    """
    if not torch.is_tensor(x0):
        raise ValueError(
            f"{name} must be a torch tensor, got {type(x0).__module__}.{type(x0).__name__}"
            + (" (use torch.as_tensor)" if hasattr(x0, "__array__") else "")
        )
    if not x0.dtype.is_floating_point:
        raise ValueError(
            f"{name} must be floating point in [-1, 1], got dtype {x0.dtype}"
            + (" (8-bit images: see pyro_ddpm.adapters.from_uint8)" if x0.dtype == torch.uint8 else "")
        )
    shape = tuple(int(s) for s in shape)
    if x0.dim() != len(shape) + 1 or tuple(x0.shape[1:]) != shape:
        raise ValueError(
            f"{name} has shape {tuple(x0.shape)}, but the data shape is (batch, {', '.join(map(str, shape))})"
        )
    if x0.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x0.shape)})")
    if not bool(torch.isfinite(x0).all()):
        bad = "NaN" if bool(torch.isnan(x0).any()) else "infinite values"
        raise ValueError(f"{name} contains {bad}")
    if t is None:
        return
    if not torch.is_tensor(t) or t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"timesteps t must be an integer torch tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.dim() != 2 or t.shape[0] != x0.shape[0] or t.shape[1] < 1:
        raise ValueError(f"timesteps t must have shape (batch, K) = ({x0.shape[0]}, K >= 1), got {tuple(t.shape)}")
    if T is not None and (int(t.min()) < 1 or int(t.max()) > T):
        raise ValueError(f"timesteps t must lie in 1..T = 1..{T}, got values in {int(t.min())}..{int(t.max())}")


def timestep_plate(t: torch.Tensor, T: int) -> pyro.plate:
    """``pyro.plate`` over all B*T (image, timestep) pairs, subsampled to the pairs in ``t`` (B, K).

    Pyro scales every site inside by B*T / (B*K) = T / K, which makes the K-term sum an unbiased
    estimate of sum_t L_{t-1}. The indices are passed as ``subsample=`` so the model and the guide see
    the same pairs without a random permutation over the full size.
    """
    B, K = t.shape
    image = torch.arange(B, device=t.device).unsqueeze(1)
    return pyro.plate(PAIRS, B * T, subsample=(image * T + (t - 1)).reshape(-1))


def pairs(x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_0 repeated for each of its K timesteps and the flat timesteps: shapes (B*K, ...), (B*K,)."""
    return x0 if t.shape[1] == 1 else x0.repeat_interleave(t.shape[1], dim=0), t.reshape(-1)


def weighted(weight: torch.Tensor | None, t: torch.Tensor, like: torch.Tensor):
    """``poutine.scale`` by weight[t] per pair (in ``like``'s dtype), or nothing for the true bound."""
    if weight is None:
        return contextlib.nullcontext()
    return poutine.scale(scale=weight.to(like)[t])


def draw_timesteps(batch: int, K: int, T: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """K timesteps per image, each uniform on 1..T (drawn with replacement): a (batch, K) LongTensor."""
    t = torch.randint(1, T + 1, (batch, K), generator=generator)
    return t if device is None else t.to(device)


def all_timesteps(batch: int, T: int, device=None) -> torch.Tensor:
    """Every timestep for every image: (batch, T); with it the training form is the full bound."""
    return torch.arange(1, T + 1, device=device).expand(batch, T)


def elementwise(fn):
    """The elementwise distribution inside ``Independent``/expanded wrappers."""
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def register(name: str, module: torch.nn.Module) -> torch.nn.Module:
    """``pyro.module(name, module)`` as an effect of its own: how the programs register their networks.

    With no handler that answers it, it is ``pyro.module`` itself: each parameter becomes a ``param``
    site that ``SVI`` collects for its optimizer. :class:`RegisterOnce` runs it the first time only.
    """
    return _register(name, module, name=name)


@effectful(type="register")
def _register(name: str, module: torch.nn.Module) -> torch.nn.Module:
    return pyro.module(name, module)


class RegisterOnce(Messenger):
    """Run each module's :func:`register` the first time this handler sees it, and answer later calls
    with the module itself (no ``param`` sites then).

    Registering sends every parameter through every handler of the step (144 ``param`` sites for the
    digits U-Net, each recorded by the traces), to tell Pyro again what its parameter store already
    holds. A module is registered again when the store no longer holds it (e.g. after
    ``pyro.clear_param_store()``) or when another module takes its name.

    Only for an optimizer that keeps stepping every parameter it was once given
    (:class:`~pyro_ddpm.optim.JointOptimizer`): after the first step ``SVI`` collects no parameters from
    the programs and hands the optimizer an empty set. The trainer's ELBO runs both programs under one
    (:class:`~pyro_ddpm.elbo.TermwiseELBO` with ``register_once=True``).
    """

    def __init__(self):
        super().__init__()
        self.registered: dict[str, tuple[torch.nn.Module, str | None]] = {}

    def _pyro_register(self, msg) -> None:
        name, module = msg["args"]
        seen = self.registered.get(name)
        if seen is not None and seen[0] is module and (seen[1] is None or seen[1] in pyro.get_param_store()):
            msg["value"], msg["done"], msg["stop"] = module, True, True
            return
        first = next((n for n, p in module.named_parameters() if p.requires_grad), None)
        self.registered[name] = (module, None if first is None else param_with_module_name(name, first))


class FixedNoise(Messenger):
    """Draw the named sample sites from given standard noise: ``draw(fn, noise)`` turns the site's
    elementwise distribution ``fn`` and the noise into its value (the guide's
    :meth:`~pyro_ddpm.programs.ForwardProgram.from_noise`).

    A conditioned draw that stays latent: the site's KL is still taken, and for a reparameterizable family
    its value keeps its gradient with respect to the guide's parameters. The trainer and the evaluator use
    it on ``x_t`` so that results depend on their own seeded noise, not on how work is split.
    """

    def __init__(self, noise: dict[str, torch.Tensor], draw):
        super().__init__()
        self.noise = noise
        self.draw = draw

    def _pyro_sample(self, msg):
        if msg["name"] not in self.noise or msg["is_observed"] or msg["value"] is not None:
            return
        msg["value"] = self.draw(elementwise(msg["fn"]), self.noise[msg["name"]])


NOISE_KINDS = ("normal", "uniform")


def standard_noise(kind: str, shape, generator: torch.Generator | None = None, dtype=None) -> torch.Tensor:
    """Standard noise of ``kind`` (``"normal"``: N(0, 1); ``"uniform"``: U(0, 1)) of ``shape``."""
    if kind == "normal":
        return torch.randn(shape, generator=generator, dtype=dtype)
    if kind == "uniform":
        return torch.rand(shape, generator=generator, dtype=dtype)
    raise ValueError(f"unknown noise kind {kind!r}; a guide's noise is one of {list(NOISE_KINDS)}")
