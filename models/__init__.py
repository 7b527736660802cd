"""Pyro models: reverse processes p_theta(x_{0:T}). Installed as ``pyro_ddpm.models``."""

from .clipped_reverse_process import ClippedReverseProcess
from .reverse_process import ReverseProcess

__all__ = ["ReverseProcess", "ClippedReverseProcess"]
