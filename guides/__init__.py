"""Pyro guides: forward processes q(x_{1:T} | x_0). Installed as ``pyro_ddpm.guides``."""

from .cosine import CosineForwardProcess
from .forward_process import ForwardProcess
from .learned_schedule import GammaSchedule, LearnedForwardProcess, LearnedSchedule
from .learned_table import LearnedTableForwardProcess, TableSchedule
from .linear import LinearForwardProcess
from .masked import MaskedForwardProcess, MaskingSchedule
from .uniform import UniformForwardProcess, UniformSchedule
from .user_betas import UserBetasForwardProcess

__all__ = [
    "ForwardProcess",
    "LinearForwardProcess",
    "CosineForwardProcess",
    "UserBetasForwardProcess",
    "GammaSchedule",
    "LearnedSchedule",
    "LearnedForwardProcess",
    "TableSchedule",
    "LearnedTableForwardProcess",
    "MaskedForwardProcess",
    "MaskingSchedule",
    "UniformForwardProcess",
    "UniformSchedule",
]
