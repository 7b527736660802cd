"""Denoising diffusion probabilistic models (Ho, Jain, Abbeel 2020) as Pyro programs.

The reverse process is a Pyro model (:mod:`pyro_ddpm.models`), the forward process a Pyro guide
(:mod:`pyro_ddpm.guides`), and SVI with ``TraceMeanField_ELBO`` optimizes the bound of Eq. 5.
"""

__version__ = "0.1.0"
