"""Pyro models: reverse processes p_theta(x_{0:T}). Installed as ``pyro_ddpm.models``."""

from .reverse_process import ReverseProcess  # first: the paper's model is the first registered (the default)

# isort: split
from .categorical import CategoricalReverseProcess
from .ddim import DDIM
from .grid_posterior import GridPosteriorReverseProcess
from .learned_variance import HybridReverseProcess, LearnedVarianceReverseProcess
from .logistic_grid import LogisticGridReverseProcess, MomentMatchedLogisticGridReverseProcess
from .moment_matched import MomentMatchedGridReverseProcess
from .v_prediction import VPredictionReverseProcess
from .x0_prediction import X0PredictionReverseProcess

__all__ = [
    "ReverseProcess",
    "X0PredictionReverseProcess",
    "VPredictionReverseProcess",
    "LearnedVarianceReverseProcess",
    "HybridReverseProcess",
    "GridPosteriorReverseProcess",
    "MomentMatchedGridReverseProcess",
    "LogisticGridReverseProcess",
    "MomentMatchedLogisticGridReverseProcess",
    "CategoricalReverseProcess",
    "DDIM",
]
