"""Pyro models: reverse processes p_theta(x_{0:T}). Installed as ``pyro_ddpm.models``."""

from .clipped_reverse_process import ClippedReverseProcess
from .ddim import DDIM
from .hybrid import HybridReverseProcess
from .learned_variance import LearnedVarianceReverseProcess
from .reverse_process import ReverseProcess
from .v_prediction import VPredictionReverseProcess
from .x0_prediction import X0PredictionReverseProcess

__all__ = [
    "ReverseProcess",
    "ClippedReverseProcess",
    "X0PredictionReverseProcess",
    "VPredictionReverseProcess",
    "LearnedVarianceReverseProcess",
    "HybridReverseProcess",
    "DDIM",
]
