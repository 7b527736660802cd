"""The x_0-parameterized reverse process over the K levels of grid data, for any categorical forward process.

Around a :class:`~pyro_ddpm.discrete.CategoricalSchedule` (the guide's: masked or uniform), with a
network that sees x_t (each element's level value and a mask indicator: 2C input channels) and returns
K logits l_k(x_t, t) per element:

    p_theta(x_0 = v_k | x_t) ∝ exp(l_k(x_t, t)) q(x_t | x_0 = v_k)                 (the element's own evidence)
    p_theta(x_{t-1} | x_t)   = sum_k p_theta(x_0 = v_k | x_t) q(x_{t-1} | x_t, x_0 = v_k)    (posterior mixture)
    p_theta(x_0 | x_1)       = p_theta(x_0 | x_t = x_1)
    p(x_T)                   = the schedule's prior (all-mask for the absorbing process, uniform otherwise)

As in the grid-posterior Gaussian models, the network supplies the first factor (what the rest of x_t
says about an element) and the element's own likelihood q(x_t | x_0) is multiplied in exactly: an
unmasked element of the absorbing process has q(x_t | x_0 = v_k) = 0 unless v_k = x_t, so it is carried
over with probability 1 whatever the logits (and costs nothing in the bound); a masked one gets the
softmax of the logits. The transition is the posterior mixture (the model's x_0 prediction pushed
through the forward posterior), which for the absorbing process is MD4's reverse step and for the uniform
process is exact whenever the prediction is.

Objectives: ``elbo`` (the bound) and ``simple``, for a schedule with a ``weight`` w_t (the absorbing
process: each L_{t-1} is w_t times the cross-entropy over masked elements): the pair terms scaled by
lambda_t = 1 / (T w_t) through ``poutine.scale``, which makes the training loss the unweighted per-image sum
of cross-entropies over the masked elements, averaged over t (Algorithm 1's form, with a cross-entropy
for the squared error).
"""

from __future__ import annotations

import torch
from pyro.distributions import Categorical
from torch import nn

from pyro_ddpm import protocol
from pyro_ddpm.discrete import GridCategorical, PosteriorMixture, level_value
from pyro_ddpm.elbo import simple_weights
from pyro_ddpm.programs import ReverseProgram
from pyro_ddpm.registry import MODELS


@MODELS.register
class CategoricalReverseProcess(ReverseProgram):
    """p_theta(x_{0:T}) over the states of a categorical forward process, x_0-parameterized.

    :param eps: the network ``net(h, t)``: ``h`` (B, 2C, ...) holds each element's level value (0 where
        masked) and its mask indicator; it returns (B, C * K, ...): channel c's K logits contiguous.
    :param schedule: the guide's :class:`~pyro_ddpm.discrete.CategoricalSchedule` (shared).
    :param likelihood: the data's decoder; only its ``levels`` (K) and its data check are read.
    :param shape: the shape of one datum.

    Its config is ``shape``: the network, schedule and likelihood are what it is built around.
    """

    family = "categorical"

    objectives = ("elbo", "simple")
    capabilities = ("progressive",)

    def __init__(self, eps: nn.Module, schedule, likelihood=None, shape=None):
        super().__init__()
        self.eps, self.schedule, self.likelihood = eps, schedule, likelihood
        levels = int(getattr(likelihood, "levels", 0) or 0)
        if levels != schedule.levels:
            raise ValueError(
                f"{type(self).__name__}: the data have {levels} levels but the forward process {schedule.levels}"
            )
        if shape is None:
            raise ValueError(f"{type(self).__name__}: give the data shape")
        self.shape = tuple(int(s) for s in shape)
        self.levels = levels
        self.autocast = None
        if getattr(schedule, "weight", None) is None:  # no weighted cross-entropy form: the bound only
            self.objectives = ("elbo",)

    @classmethod
    def network_config(cls, preset: dict, data: protocol.DataSpec) -> dict:
        """The preset with 2C inputs (value and mask indicator) and K logits per data channel."""
        if int(data.levels) < 2:
            raise ValueError(f"{cls.__name__} needs data on a grid of K >= 2 levels, got levels = {data.levels}")
        size = "in_channels" if "in_channels" in preset else "dim"
        return dict(preset, **{size: 2 * data.channels}, out_channels=int(data.levels) * data.channels)

    @classmethod
    def network_input_shape(cls, data: protocol.DataSpec) -> tuple:
        return (2 * data.channels,) + tuple(data.shape[1:])

    @classmethod
    def check_objective(cls, objective: str, guide_class: type) -> None:
        """``simple`` needs a schedule with a ``weight`` (the masked process's): refused for the others."""
        schedule_class = getattr(guide_class, "schedule_class", None)
        if objective == "simple" and schedule_class is not None and not hasattr(schedule_class, "weight"):
            raise ValueError(
                f"objective 'simple' needs a forward process whose terms are weighted cross-entropies; "
                f"{guide_class.__name__} has none: use 'elbo'"
            )

    def training_program(self, objective: str):
        """``elbo``: this model, no weights. ``simple``: lambda_t = 1 / (T w_t) of the schedule's ``weight``."""
        if objective == "elbo":
            return self, None
        weight = getattr(self.schedule, "weight", None)
        if objective == "simple" and weight is not None:
            return self, simple_weights(weight)
        if objective == "simple":
            raise ValueError(
                f"objective 'simple' needs a forward process whose terms are weighted cross-entropies "
                f"(a 'weight' on its schedule); {type(self.schedule).__name__} has none: use 'elbo'"
            )
        raise ValueError(f"{type(self).__name__}: unknown objective {objective!r}; it supports {list(self.objectives)}")

    @property
    def T(self) -> int:
        return self.schedule.T

    def check_data(self, x0: torch.Tensor, t: torch.Tensor | None = None) -> None:
        protocol.check_batch(x0, self.shape, t, self.T)
        self.likelihood.check(x0)  # data on its K-level grid (the constructor matched K to the schedule's)

    # ------------------------------------------------------------------ one network call
    def network_output(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p_theta(x_0 = v_k | x_t): (B, ..., K), from the network's logits and q(x_t | x_0 = v_k)."""
        if tuple(x_t.shape[1:]) != self.shape or t.shape != x_t.shape[:1]:
            raise ValueError(f"x_t must have shape (batch, {', '.join(map(str, self.shape))}) with one t per datum")
        self.schedule.check_timesteps(t)
        param = next(self.eps.parameters(), None)
        dtype = param.dtype if param is not None else torch.get_default_dtype()
        mask = self.schedule.mask
        masked = (x_t == mask) if mask is not None else torch.zeros_like(x_t, dtype=torch.bool)
        value = torch.where(masked, 0.0, level_value(x_t.clamp(max=self.levels - 1), self.levels, dtype))
        h = torch.cat([value, masked.to(dtype)], dim=1)
        with torch.autocast(h.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            out = self.eps(h, t)
        B, C, K = x_t.shape[0], self.shape[0], self.levels
        if tuple(out.shape) != (B, C * K) + self.shape[1:]:
            raise ValueError(f"the network returned shape {tuple(out.shape)}; expected {(B, C * K) + self.shape[1:]}")
        logits = out.to(dtype).reshape(B, C, K, *self.shape[1:]).movedim(2, -1)
        return torch.log_softmax(logits + self.schedule.evidence(x_t, t, dtype).log(), dim=-1)

    # ------------------------------------------------------------------ the program's distributions
    def p_xT(self, batch: int, like: torch.Tensor) -> Categorical:
        dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
        probs = self.schedule.prior(dtype).to(like.device)
        return Categorical(probs=probs).expand((batch,) + self.shape)

    def p_prev(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> PosteriorMixture:
        """The posterior mixture sum_k p_theta(x_0 = v_k | x_t) q(x_{t-1} | x_t, x_0 = v_k)."""
        return PosteriorMixture(self.schedule.mixture(x_t, out, t), out)

    def p_x0(self, x_1: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> GridCategorical:
        return GridCategorical(out)

    def x0_from_transition(self, fn, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[x_0 | x_t] under the prediction the traced mixture holds."""
        return GridCategorical(protocol.elementwise(fn).x0_logits).mean
