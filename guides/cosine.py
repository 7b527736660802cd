"""The cosine forward process of Nichol and Dhariwal (2021, Eq. 17).

abar_t = f(t) / f(0),   f(t) = cos^2( (t/T + s) / (1 + s) * pi/2 ),   s = 0.008,
beta_t = min(1 - abar_t / abar_{t-1}, 0.999)   (clipped so that beta_T < 1).
"""

from __future__ import annotations

from pyro_ddpm.registry import GUIDES
from pyro_ddpm.schedule import Schedule

from .forward_process import ForwardProcess


@GUIDES.register
class CosineForwardProcess(ForwardProcess):
    """:class:`ForwardProcess` over the cosine schedule (:meth:`Schedule.cosine`); its config is its
    constructor's arguments, and ``from_spec(T, "cosine")`` gives Nichol and Dhariwal's s = 0.008 and
    clipping at 0.999 with T steps."""

    NAME = "cosine"

    def __init__(self, T: int = 1000, s: float = 0.008, max_beta: float = 0.999, event_dim: int | None = None):
        super().__init__(Schedule.cosine(T, s, max_beta), event_dim=event_dim)
        self.s, self.max_beta = float(s), float(max_beta)
