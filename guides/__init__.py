"""Pyro guides: forward processes q(x_{1:T} | x_0). Installed as ``pyro_ddpm.guides``."""

from .forward_process import ForwardProcess

__all__ = ["ForwardProcess"]
