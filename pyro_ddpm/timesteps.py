"""Timestep samplers: the draw of t in Algorithm 1, uniform or from an importance proposal p(t).

Every training run draws its timesteps from a sampler object (:class:`UniformSampler` is Algorithm 1's
uniform draw); each is registered (:data:`pyro_ddpm.registry.TIMESTEPS`: ``uniform``, ``importance``),
describes itself with ``config()`` (its constructor's arguments) and keeps its state in buffers.

The training form (:mod:`pyro_ddpm.protocol`) scores K (image, t) pairs per image under a plate that
scales each by T/K, and scales pair (b, k) by ``weight[t_bk]``. Drawing t_k ~ p and weighting by

    weight[t] = 1 / (T p_t)                                                    (t = 1..T)

keeps the estimate of the bound unbiased:

    E[(T/K) sum_k weight[t_k] L_{t_k - 1}] = T sum_t p_t L_{t-1} / (T p_t) = sum_{t=1}^T L_{t-1},

where every p_t must be positive. A sampler's :meth:`~TimestepSampler.draw` returns both ``t``
(batch, K) and ``weight`` (length T + 1, index 0 unused and 0); pass them to both programs'
``per_timestep(x0, t, weight)``. To combine with L_simple's lambda_t, multiply the two weight arrays.

:class:`FixedProposal` takes given probabilities. :class:`LossAwareSampler` is the loss-aware
sampler of Nichol and Dhariwal (2021, section 3.3; improved-diffusion's second-moment resampler):
p_t proportional to sqrt(E[L_t^2]) over the last ``history`` values of each term, uniform until every
t has a full history, mixed with a ``uniform_fraction`` of the uniform distribution. Samplers are
``nn.Module``s whose state lives in buffers, so ``state_dict()`` / ``load_state_dict()`` resume exactly.
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from pyro_ddpm.config import Configurable
from pyro_ddpm.registry import TIMESTEPS


def _check_count(value, what: str, least: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value or value < least:
        raise ValueError(f"timestep sampler: {what} must be an integer >= {least}, got {value!r}")
    return int(value)


class TimestepSampler(Configurable, nn.Module, abc.ABC):
    """A proposal p_1..p_T over the timesteps 1..T, the weights 1/(T p_t) and draws from it.

    ``learns``: whether :meth:`update` changes the proposal (the trainer then feeds it each pair's loss).
    """

    learns = False

    def __init__(self, T: int):
        super().__init__()
        self.T = _check_count(T, "T")

    @abc.abstractmethod
    def probs(self) -> torch.Tensor:
        """p_1..p_T (length T, float64, positive, summing to 1)."""

    def weights(self) -> torch.Tensor:
        """weight[t] = 1 / (T p_t) for t = 1..T, indexed by t (length T + 1; weight[0] = 0, unused)."""
        p = self.probs()
        return torch.cat([p.new_zeros(1), 1.0 / (self.T * p)])

    def draw(self, batch: int, K: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``t`` (batch, K), each entry i.i.d. from p on 1..T, and the weights (length T + 1)."""
        batch, K = _check_count(batch, "batch"), _check_count(K, "K")
        p = self.probs()
        t = torch.multinomial(p, batch * K, replacement=True, generator=generator).view(batch, K) + 1
        return t, self.weights()

    def _check_update(self, t: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t, values = torch.as_tensor(t), torch.as_tensor(values)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"timestep sampler: timesteps t must be an integer tensor, got dtype {t.dtype}")
        if t.shape != values.shape:
            raise ValueError(
                f"timestep sampler: t has shape {tuple(t.shape)} but values have shape {tuple(values.shape)}"
            )
        if t.numel() and (int(t.min()) < 1 or int(t.max()) > self.T):
            raise ValueError(
                f"timestep sampler: timesteps t must lie in 1..T = 1..{self.T}, "
                f"got values in {int(t.min())}..{int(t.max())}"
            )
        values = values.detach().to(dtype=torch.float64, device="cpu").reshape(-1)
        if not torch.isfinite(values).all():
            raise ValueError("timestep sampler: the term values must be finite")
        return t.detach().cpu().reshape(-1), values

    def update(self, t: torch.Tensor, values: torch.Tensor) -> None:
        """Record the term values of the pairs at timesteps ``t`` (same shape); a fixed proposal only checks them."""
        self._check_update(t, values)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = self.state_dict()
        for name, value in own.items():
            if name in state_dict and tuple(torch.as_tensor(state_dict[name]).shape) != tuple(value.shape):
                raise ValueError(
                    f"timestep sampler: state {name!r} has shape {tuple(state_dict[name].shape)}, "
                    f"this sampler's has {tuple(value.shape)} (different T or history?)"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_repr(self) -> str:
        return f"T={self.T}"


class FixedProposal(TimestepSampler):
    """A fixed proposal with the given probabilities p_1..p_T (each > 0, summing to 1).

    :param probs: length-T array of p_1..p_T; they must sum to 1 within 1e-6 (then renormalized exactly).
    """

    def __init__(self, probs):
        p = torch.as_tensor(probs, dtype=torch.float64).detach().cpu()
        if p.dim() != 1 or p.numel() < 1:
            raise ValueError(
                f"fixed proposal: probabilities must be a non-empty 1-D array p_1..p_T, got shape {tuple(p.shape)}"
            )
        super().__init__(p.numel())
        if not torch.isfinite(p).all() or (p <= 0).any():
            bad = (~torch.isfinite(p) | (p <= 0)).nonzero().reshape(-1) + 1
            raise ValueError(
                f"fixed proposal: every p_t must be finite and > 0 (weight 1/(T p_t)), "
                f"violated at t = {bad[:5].tolist()}"
            )
        if abs(float(p.sum()) - 1.0) > 1e-6:
            raise ValueError(f"fixed proposal: probabilities must sum to 1, got {float(p.sum())!r}")
        self.register_buffer("p", p / p.sum())

    @classmethod
    def uniform(cls, T: int) -> UniformSampler:
        """p_t = 1/T: Algorithm 1's draw, with weights 1."""
        return UniformSampler(T)

    def probs(self) -> torch.Tensor:
        return self.p


@TIMESTEPS.register(name="uniform")
class UniformSampler(FixedProposal):
    """p_t = 1/T for t = 1..T: Algorithm 1's uniform draw, every weight 1."""

    def __init__(self, T: int):
        T = _check_count(T, "T")
        super().__init__(torch.full((T,), 1.0 / T, dtype=torch.float64))


@TIMESTEPS.register(name="importance")
class LossAwareSampler(TimestepSampler):
    """p_t proportional to sqrt(mean of the last ``history`` values of L_t squared), mixed with uniform.

    Until every t has ``history`` recorded values the proposal is uniform. Feed it with
    :meth:`update` the per-pair *unweighted* term values (L_{t-1} for t >= 2, L_0 for t = 1).

    :param T: number of timesteps.
    :param history: values kept per timestep (10 in improved-diffusion).
    :param uniform_fraction: the weight of the uniform distribution in the mixture, in (0, 1]
        (0.001 in improved-diffusion); p_t >= uniform_fraction / T bounds every weight by 1 / uniform_fraction.
    """

    learns = True

    def __init__(self, T: int, history: int = 10, uniform_fraction: float = 0.001):
        super().__init__(T)
        history = _check_count(history, "history")
        if not (isinstance(uniform_fraction, (int, float)) and 0.0 < uniform_fraction <= 1.0):
            raise ValueError(f"loss-aware sampler: uniform_fraction must lie in (0, 1], got {uniform_fraction!r}")
        self.uniform_fraction = float(uniform_fraction)
        self.register_buffer("history", torch.zeros(self.T, history, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(self.T, dtype=torch.long))

    def warmed_up(self) -> bool:
        """Whether every timestep has a full history."""
        return bool((self.count == self.history.shape[1]).all())

    def probs(self) -> torch.Tensor:
        uniform = torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        if not self.warmed_up():
            return uniform
        rms = self.history.pow(2).mean(1).sqrt()
        total = rms.sum()
        if not total > 0:
            return uniform
        return (1.0 - self.uniform_fraction) * rms / total + self.uniform_fraction * uniform

    def update(self, t: torch.Tensor, values: torch.Tensor) -> None:
        """Append each pair's value to its timestep's history in order, dropping the oldest beyond ``history``."""
        t, values = self._check_update(t, values)
        history, count, H = self.history.numpy(), self.count.numpy(), self.history.shape[1]
        for s, v in zip((t - 1).tolist(), values.tolist()):
            if count[s] == H:
                history[s, :-1] = history[s, 1:].copy()
                history[s, -1] = v
            else:
                history[s, count[s]] = v
                count[s] += 1

    def extra_repr(self) -> str:
        return f"T={self.T}, history={self.history.shape[1]}, uniform_fraction={self.uniform_fraction}"
