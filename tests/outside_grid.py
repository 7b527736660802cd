"""A reverse process written outside the library, as a researcher would (used by test_outside_program.py).

K logits per pixel from the network (K from the data's decoder: a network output that depends on the
data), x0_hat the posterior mean over the grid with the exact per-pixel likelihood of x_t, and a variance
rule of its own: sigma_t^2 between beta_tilde_t (where the posterior is sure) and beta_t (where it is
not), sigma_t^2 = beta_tilde_t + u (beta_t - beta_tilde_t) with u = 1 - max_k w_k. It trains on the bound
only. Nothing in the library names it: it is loaded as ``--model outside_grid:OutsideGridModel``.
"""

import torch

from pyro_ddpm.models import ReverseProcess
from pyro_ddpm.schedule import at


class OutsideGridModel(ReverseProcess):
    variances = ("certainty",)
    objectives = ("elbo",)

    @classmethod
    def output_channels(cls, data):
        return data.levels * data.channels

    def weights(self, x_t, t, out):
        K, s = self.data.levels, self.schedule
        v = torch.linspace(-1.0, 1.0, K, dtype=x_t.dtype, device=x_t.device).reshape(1, 1, K, *([1] * (x_t.dim() - 2)))
        logits = out.reshape(x_t.shape[0], x_t.shape[1], K, *x_t.shape[2:])
        sq = (x_t.unsqueeze(2) - at(s.sqrt_abar, t, x_t).unsqueeze(2) * v) ** 2
        return torch.softmax(logits - sq / (2 * at(1.0 - s.abar, t, x_t).unsqueeze(2)), dim=2), v

    def predict_x0(self, x_t, t, out):
        w, v = self.weights(x_t, t, out)
        return (w * v).sum(2)

    def eps_hat(self, x_t, t, out):
        return self.schedule.eps_from_x0(x_t, t, self.predict_x0(x_t, t, out))

    def mean(self, x_t, t, out):
        return self.mean_at_x0(x_t, t, out)

    def scale(self, x_t, t, out):
        s = self.schedule
        u = 1.0 - self.weights(x_t, t, out)[0].amax(2)
        small, large = at(s.sigma2_small, t, x_t), at(s.sigma2_large, t, x_t)
        return (small + u * (large - small)).sqrt()

    @property
    def sigma2(self):
        raise ValueError("OutsideGridModel: sigma_t^2 depends on x_t (the certainty rule)")
