"""The paper's forward process: a linear variance schedule (Ho, Jain, Abbeel 2020, section 4).

beta_t = beta_1 + (beta_T - beta_1) (t - 1) / (T - 1),   t = 1..T,
with T = 1000, beta_1 = 1e-4, beta_T = 0.02 in the paper.
"""

from __future__ import annotations

from pyro_ddpm.registry import GUIDES
from pyro_ddpm.schedule import Schedule

from .forward_process import ForwardProcess


@GUIDES.register
class LinearForwardProcess(ForwardProcess):
    """:class:`ForwardProcess` over the linear schedule (:meth:`Schedule.linear`)."""

    NAME = "linear"

    def __init__(self, T: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02, event_dim: int | None = None):
        super().__init__(Schedule.linear(T, beta_1, beta_T), event_dim=event_dim)
        self.beta_1, self.beta_T = float(beta_1), float(beta_T)

    def config(self) -> dict:
        return {"T": self.T, "beta_1": self.beta_1, "beta_T": self.beta_T, "event_dim": self.event_dim}

    @classmethod
    def from_config(cls, **config) -> LinearForwardProcess:
        return cls(**config)

    @classmethod
    def from_spec(cls, T: int, spec: str = NAME, event_dim: int | None = None) -> LinearForwardProcess:
        """The paper's endpoints with T steps; ``spec`` must be ``"linear"``."""
        if spec != cls.NAME:
            raise ValueError(f"{cls.__name__}: schedule must be {cls.NAME!r}, got {spec!r}")
        return cls(T, event_dim=event_dim)
