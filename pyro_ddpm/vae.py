"""A one-latent Pyro VAE beside the DDPM: the same decoder, the same unit, read term by term.

p(z) = N(0, I), p_theta(x_0 | z) the data's decoder (the discretized Gaussian of Eq. 13; for binary data the
Bernoulli decoder of :mod:`pyro_ddpm.likelihoods`) at an MLP's mean with learned
per-dimension scales, q_phi(z | x_0) a Gaussian MLP encoder: the DDPM's programs with one latent layer
in place of T (the comparison of :mod:`pyro_ddpm.compare` and ``examples/diffusion_vs_vae.py`` put the
two side by side). Trained with ``SVI`` on the mean-field ELBO (analytic KL for z); scored with the
negative ELBO and the importance-weighted bound of Burda et al. (2016), which is Pyro's ``RenyiELBO``
with alpha = 0.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, RenyiELBO, TraceMeanField_ELBO
from torch import nn
from torch.nn import functional as F

from pyro_ddpm import protocol, stats
from pyro_ddpm.elbo import TermwiseELBO
from pyro_ddpm.likelihoods import default_likelihood


class Decoder(nn.Module):
    """z -> the mean of p_theta(x_0 | z) (an MLP) and its per-dimension scale (learned, softplus)."""

    def __init__(self, z_dim: int, shape: tuple[int, ...], hidden: int):
        super().__init__()
        self.shape = shape
        self.net = nn.Sequential(
            nn.Linear(z_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, int(np.prod(shape))),
        )
        self.raw_scale = nn.Parameter(torch.full(shape, math.log(math.expm1(0.1))))  # scale 0.1 at the start

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = self.net(z).reshape(*z.shape[:-1], *self.shape)
        return loc, F.softplus(self.raw_scale).expand_as(loc)


class Encoder(nn.Module):
    """x_0 -> the mean and scale of q_phi(z | x_0) (an MLP)."""

    def __init__(self, z_dim: int, shape: tuple[int, ...], hidden: int):
        super().__init__()
        self.event_dim = len(shape)
        self.net = nn.Sequential(
            nn.Linear(int(np.prod(shape)), hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2 * z_dim),
        )

    def forward(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = self.net(x0.flatten(-self.event_dim)).chunk(2, dim=-1)
        return loc, F.softplus(raw) + 1e-4


class VAE(nn.Module):
    """p(z) p_theta(x_0 | z) with the guide q_phi(z | x_0): the DDPM's programs with one latent layer.

    ``model(x0=None, num_images=None)`` and ``guide(x0)`` mirror the DDPM's ``chain``: a plate
    ``images`` over the batch, the latent site(s), then the observed ``x_0`` with the decoder of Eq. 13.
    """

    def __init__(self, shape: tuple[int, ...], levels: int, z_dim: int = 16, hidden: int = 256):
        super().__init__()
        self.shape, self.z_dim = tuple(shape), int(z_dim)
        self.decoder = Decoder(self.z_dim, self.shape, hidden)
        self.encoder = Encoder(self.z_dim, self.shape, hidden)
        self.likelihood = default_likelihood(levels)  # Eq. 13 on a K-level grid; the Bernoulli decoder for K = 2

    def model(self, x0: torch.Tensor | None = None, num_images: int | None = None) -> torch.Tensor:
        pyro.module("decoder", self.decoder)
        n = x0.shape[0] if x0 is not None else num_images
        with pyro.plate(protocol.IMAGES, n, dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(()), 1.0).expand((n, self.z_dim)).to_event(1))
            loc, scale = self.decoder(z)
            return pyro.sample(protocol.X_0, self.likelihood(loc, scale).to_event(len(self.shape)), obs=x0)

    def guide(self, x0: torch.Tensor, num_images: int | None = None) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate(protocol.IMAGES, x0.shape[0], dim=-1):
            loc, scale = self.encoder(x0)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def train_vae(
    dataset, steps: int = 3000, z_dim: int = 16, hidden: int = 256, seed: int = 0, batch_size: int = 128
) -> tuple[VAE, list[float]]:
    """SVI on the mean-field ELBO (analytic KL for z), minibatches of ``batch_size`` training images of the
    :class:`~pyro_ddpm.data.Dataset`; returns the VAE and the per-step loss in bits/dim. Pyro's param
    store is cleared before and after (the VAE keeps its modules)."""
    digits = dataset
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    vae = VAE(digits.shape, digits.levels, z_dim, hidden=hidden)
    svi = SVI(vae.model, vae.guide, pyro.optim.ClippedAdam({"lr": 1e-3, "clip_norm": 10.0}), TraceMeanField_ELBO())
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        x0 = digits.train[torch.randint(len(digits.train), (batch_size,), generator=g)]
        losses.append(stats.bits_per_dim(svi.step(x0), len(x0) * digits.dims))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"VAE training diverged at step {step + 1}")
    pyro.clear_param_store()
    return vae, losses


@torch.no_grad()
def vae_bounds(vae: VAE, x0: torch.Tensor, draws: int, particles: int) -> dict[str, np.ndarray]:
    """Per image, in nats: the rate KL(q || p), the distortion E_q -log p(x_0 | z) (``draws`` draws), and
    the importance-weighted bound -log (1/K) sum_k p(x_0, z_k) / q(z_k | x_0) with K = ``particles``."""
    terms = [TermwiseELBO().terms(vae.model, vae.guide, x0) for _ in range(draws)]
    rate = terms[0]["z"].value.double().numpy()  # analytic: the same for every draw
    distortion = np.mean([t[protocol.X_0].value.double().numpy() for t in terms], axis=0)
    iwae = RenyiELBO(alpha=0.0, num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    iw = np.array([iwae.loss(vae.model, vae.guide, x0[i : i + 1]) for i in range(len(x0))])
    return {"rate": rate, "distortion": distortion, "elbo": rate + distortion, "iwae": iw}
