"""Respacing: the S-step reverse process that visits only timesteps tau_1 < ... < tau_S = T.

Nichol and Dhariwal (2021, section 4) sample a model trained with T steps in S < T steps by keeping
abar at the chosen timesteps. With tau_0 = 0 (abar_0 = 1) the respaced forward process has

    abar'_i = abar_{tau_i},   beta'_i = 1 - abar_{tau_i} / abar_{tau_{i-1}},   i = 1..S,

so q'(x_i | x_0) = q(x_{tau_i} | x_0) (Eq. 4), and every other constant (alpha'_i, beta_tilde'_i,
the Eq. 7 coefficients, the model variances) follows from beta' as for any schedule: it is a
:class:`~pyro_ddpm.schedule.Schedule`. The network was trained on the original timesteps, so
:class:`RespacedNetwork` calls it at tau_i when the respaced chain asks for step i.

:func:`respace` rebuilds a model around the two (``copy.copy`` of the model, as ``with_network``
does): the result is the same Pyro program -- same class, likelihood, variance rule, parameterization
of the network's output -- over S steps, so its ``chain`` is respaced ancestral sampling (Algorithm 2
with beta'), ``Predictive`` runs it, and its bound is evaluated with the guide
``ForwardProcess(respaced.schedule)``. Its chain sites are named by the respaced index, ``x_S``,
..., ``x_1``, ``x_0`` (site ``x_i`` holds x_{tau_i}; ``timesteps`` maps back). This holds for any
model that reads its schedule constants from ``self.schedule`` and its network from ``self.eps``
(eps-, x_0- or v-predicting, clipped, learned variance).

The timesteps are evenly spaced from 1 to T (the rule of :func:`respaced_timesteps`), so tau_1 = 1:
beta'_1 = beta_1 and the decoder p(x_0 | x_1) has the original mean; its scale follows the respaced
schedule (sigma'_1^2 = beta_tilde'_2, the official code's replacement).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from pyro_ddpm.schedule import Schedule


def respaced_timesteps(T: int, steps: int) -> list[int]:
    """tau_i = 1 + floor((i - 1)(T - 1) / (S - 1)), i = 1..S: evenly spaced, tau_1 = 1, tau_S = T.

    Consecutive values differ by (T - 1)/(S - 1) >= 1 before the floor, so they are strictly
    increasing; S = T gives every timestep. Raises ValueError unless 2 <= S <= T.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ValueError(f"respacing: the number of steps must be an integer, got {steps!r}")
    T, S = int(T), int(steps)
    if not 2 <= S <= T:
        raise ValueError(f"respacing: the number of steps S must satisfy 2 <= S <= T = {T}, got S = {S}")
    return [1 + (i - 1) * (T - 1) // (S - 1) for i in range(1, S + 1)]


def respaced_schedule(schedule: Schedule, timesteps) -> Schedule:
    """The :class:`Schedule` with beta'_i = 1 - abar_{tau_i} / abar_{tau_{i-1}} (tau_0 = 0), in float64.

    The ratio is the product of alpha_s over tau_{i-1} < s <= tau_i, so beta'_i is computed from the
    original beta_s directly rather than as a difference of two nearly equal abar values.

    ``timesteps`` must be strictly increasing integers in 1..T ending at T (so abar'_S = abar_T).
    """
    tau = np.asarray(timesteps)
    if tau.ndim != 1 or tau.size < 2 or not np.issubdtype(tau.dtype, np.integer):
        raise ValueError(f"respacing: timesteps must be a 1-D list of at least 2 integers, got {timesteps!r}")
    if tau[0] < 1 or tau[-1] != schedule.T or np.any(np.diff(tau) <= 0):
        raise ValueError(
            f"respacing: timesteps must increase strictly from >= 1 to T = {schedule.T}, got {tau.tolist()}"
        )
    beta = schedule.beta.detach().cpu().numpy().astype(np.float64)
    betas = []
    for start, stop in zip(np.concatenate([[0], tau[:-1]]), tau):
        # 1 - prod_{s in (start, stop]} (1 - beta_s), accumulated as r <- r + (1 - r) beta_s: no
        # cancellation, and a one-step group gives beta_s exactly (so S = T reproduces the schedule).
        r = 0.0
        for b in beta[start + 1 : stop + 1]:
            r = r + (1.0 - r) * b
        betas.append(r)
    return Schedule(np.asarray(betas, dtype=np.float64)).to(schedule.beta.device)


class RespacedNetwork(nn.Module):
    """``net`` called at the original timestep: ``forward(x, i) = net(x, tau_i)`` for i in 1..S.

    The network is shared, not copied; ``timesteps`` (tau_0 = 0, tau_1..tau_S) is a buffer, so it
    follows ``.to(device)``.
    """

    def __init__(self, net: nn.Module, timesteps):
        super().__init__()
        self.net = net
        anchor = next(net.parameters(), None)
        device = anchor.device if anchor is not None else None
        self.register_buffer("timesteps", torch.tensor([0, *timesteps], dtype=torch.long, device=device))
        if hasattr(net, "shape"):
            self.shape = net.shape

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.timesteps[t])


def respace(model, steps: int):
    """``model`` rebuilt over S = ``steps`` evenly spaced timesteps (see the module docstring).

    The copy has the respaced schedule and a :class:`RespacedNetwork` around the shared network; its
    ``timesteps`` attribute holds (tau_1, ..., tau_S). ``steps = T`` gives the same chain as ``model``.
    """
    tau = respaced_timesteps(model.T, steps)
    new = copy.copy(model)
    # copy.copy shares the module's registries: give the copy its own so .to() and assignments stay local.
    new._modules = dict(
        model._modules, eps=RespacedNetwork(model.eps, tau), schedule=respaced_schedule(model.schedule, tau)
    )
    new._buffers = dict(model._buffers)
    new._parameters = dict(model._parameters)
    new.timesteps = tuple(tau)
    return new
