"""The optimizer SVI steps: one torch optimizer over all parameters, global-norm clipping, warm-up.

:class:`JointOptimizer` is a :class:`pyro.optim.PyroOptim`, so ``SVI(model, guide, JointOptimizer(...),
loss)`` works as with any Pyro optimizer. It exists because ``PyroOptim`` builds one torch optimizer
(and one gradient clip) per parameter tensor, which differs from the paper and costs time:

- the paper (Ho et al. 2020, Appendix B; the official ``tf.clip_by_global_norm``) clips the *global*
  gradient norm to 1; ``PyroOptim``'s ``clip_norm`` clips each tensor separately;
- a U-Net has 100+ parameter tensors: a Python loop of 100+ optimizer steps and norm computations per
  SVI step was about a third of a digits training step on CPU (``benchmarks/train_speed.py``). The torch
  optimizer keeps torch's own choice of implementation (``foreach`` on CUDA): on CPU the foreach update is
  faster for the digits U-Net's 144 small tensors (2.8 against 4.1 ms per Adam step) but slower for the
  CIFAR-10 network's 35.7M parameters (82 against 58 ms); pass ``{"foreach": True}`` to choose it.

Parameters are grouped in the order of their names in Pyro's param store, so the optimizer state
saved by :meth:`get_state` is restored onto the same tensors by :meth:`set_state` (checked by name).
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from pyro.optim import PyroOptim


class JointOptimizer(PyroOptim):
    """One ``optimizer`` over every parameter SVI has handed it: once given, a parameter is stepped at every
    call (the trainer registers its modules on the first step only, after which SVI hands none).

    :param optimizer: a ``torch.optim.Optimizer`` class (default Adam).
    :param optim_args: its keyword arguments (e.g. ``{"lr": 2e-4}``).
    :param clip_norm: clip the global gradient norm to this value before each step (None: no clipping).
    :param lr_lambda: the learning rate at optimizer step n is ``lr * lr_lambda(n)`` (``LambdaLR``);
        e.g. a linear warm-up.
    :param lr_scale: ``lr_scale(param) -> factor``: parameters with a factor other than 1 get their own
        group at ``lr * factor`` (e.g. a learned schedule beside the network); default 1 for all.
    """

    def __init__(
        self,
        optimizer=torch.optim.Adam,
        optim_args: dict | None = None,
        clip_norm: float | None = None,
        lr_lambda: Callable[[int], float] | None = None,
        lr_scale: Callable[[torch.Tensor], float] | None = None,
    ):
        super().__init__(optimizer, dict(optim_args or {}))
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be positive, got {clip_norm}")
        self.clip_norm = clip_norm
        self.lr_lambda = lr_lambda
        self.lr_scale = lr_scale
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []  # in the order of ``names``
        self._known: set = set()
        self._pending: dict | None = None

    def _groups(self, params: list[torch.Tensor]) -> list[dict]:
        """Parameter groups by learning-rate factor (one group when every factor is 1)."""
        lr = self.pt_optim_args.get("lr")
        factors: dict[float, list] = {}
        for p in params:
            factors.setdefault(1.0 if self.lr_scale is None else float(self.lr_scale(p)), []).append(p)
        return [{"params": ps} if f == 1.0 or lr is None else {"params": ps, "lr": lr * f} for f, ps in factors.items()]

    def _add(self, params: list[torch.Tensor]) -> None:
        store = pyro.get_param_store()
        params = sorted(params, key=store.param_name)
        groups = self._groups(params)
        params = [p for g in groups for p in g["params"]]  # in group order: get_state's names follow it
        names = [store.param_name(p) for p in params]
        if self.optimizer is None:
            self.optimizer = self.pt_optim_constructor(groups, **self.pt_optim_args)
            if self.lr_lambda is not None:
                self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_lambda)
        else:  # parameters first seen after the first step join as new groups at the current rate
            for group in groups:
                base = group.get("lr", self.optimizer.defaults["lr"])
                if self.scheduler is not None:
                    group.update(initial_lr=base, lr=base * self.lr_lambda(self.scheduler.last_epoch))
                    self.scheduler.base_lrs.append(base)
                    self.scheduler.lr_lambdas.append(self.lr_lambda)
                self.optimizer.add_param_group(group)
        self.names += names
        self.params += params
        self._known.update(params)

    def __call__(self, params, *args, **kwargs) -> None:
        new = [p for p in params if p not in self._known]
        if new:
            self._add(new)
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None
        grads = [p for p in self.params if p.grad is not None]
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(grads, self.clip_norm)
        self.optimizer.step()
        for p in grads:  # Pyro's zero_grads then has nothing to allocate
            p.grad = None

    def step(self) -> None:
        """Advance the learning-rate schedule by one step (as Pyro's schedulers' ``.step()``)."""
        if self.scheduler is not None:
            self.scheduler.step()

    @property
    def lr(self) -> float:
        """The current learning rate of the first parameter group."""
        return self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else self.pt_optim_args.get("lr")

    def get_state(self) -> dict:
        if self.optimizer is None:
            return dict(self._pending or {})
        return {
            "names": list(self.names),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }

    def set_state(self, state: dict) -> None:
        """Restore a :meth:`get_state`; applied at the next step if the parameters are not known yet."""
        if not state:
            return
        if self.optimizer is None:
            self._pending = state
        else:
            self._restore(state)

    def _restore(self, state: dict) -> None:
        if list(state["names"]) != self.names:
            missing = sorted(set(state["names"]) ^ set(self.names))
            raise ValueError(
                "optimizer state is for other parameters: "
                + (", ".join(missing[:5]) if missing else "same names in another order")
            )
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
