"""The bound of Eq. 5, term by term, for each image: L_T, every L_{t-1}, L_0 (nats), and bits/dim.

The terms are the traced per-site values of the model/guide pair (:class:`pyro_ddpm.elbo.TermwiseELBO`
on the per-timestep form with every timestep), not a parallel formula. Network calls are batched
over (image, timestep) pairs, at most ``max_batch`` pairs per call. Each L_{t-1} uses one draw of
x_t ~ q(x_t | x_0). The decoder uses the exact normal log-CDF and the predicted x_0 is not clipped
(``clip_denoised=False``): this is the bound the ``elbo`` objective trains.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from pyro_ddpm import protocol
from pyro_ddpm.elbo import TermwiseELBO


@torch.no_grad()
def bound_terms(model, guide, x0: torch.Tensor, max_batch: int = 4096, progress: bool = False) -> torch.Tensor:
    """Per-image terms in nats: a (N, T + 1) float64 tensor whose column s holds L_s (s = 0..T).

    Column 0 is L_0 (distortion), columns 1..T-1 the rate terms L_1..L_{T-1}, column T is L_T.
    """
    T, N = model.T, x0.shape[0]
    images_per_call = max(1, max_batch // T)
    steps_per_call = min(T, max_batch)
    elbo = TermwiseELBO()
    L = torch.zeros(N, T + 1, dtype=torch.float64)
    was_training = model.training
    model.eval()
    calls = math.ceil(N / images_per_call) * math.ceil(T / steps_per_call)
    bar = tqdm(total=calls, desc="bound", disable=not progress, dynamic_ncols=True)
    try:
        for i in range(0, N, images_per_call):
            x = x0[i:i + images_per_call]
            for t0 in range(1, T + 1, steps_per_call):
                steps = torch.arange(t0, min(t0 + steps_per_call, T + 1), device=x.device)
                t = steps.expand(x.shape[0], -1)
                terms = elbo.terms(model.per_timestep, guide.per_timestep, x, t)
                per_pair = terms[protocol.X_PREV].value + terms[protocol.X_0].value  # masked to t>1 / t=1
                L[i:i + x.shape[0], steps.cpu() - 1] = per_pair.reshape(t.shape).double().cpu()
                if t0 == 1:
                    L[i:i + x.shape[0], T] = terms[protocol.X_T].value.double().cpu()
                bar.update()
    finally:
        bar.close()
        model.train(was_training)
    return L


def summarize(L: torch.Tensor, dims: int) -> dict:
    """Bits/dim of the total, L_T, the rate L_1..L_{T-1} and the distortion L_0: mean and standard error over images."""
    per_image = {
        "total": L.sum(1),
        "prior_L_T": L[:, -1],
        "rate_L_1_to_L_T-1": L[:, 1:-1].sum(1),
        "distortion_L_0": L[:, 0],
    }
    n = L.shape[0]
    out = {"images": n, "dims": dims}
    for name, v in per_image.items():
        bpd = v / (dims * math.log(2))
        se = bpd.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
        out[name] = {"bits_per_dim": bpd.mean().item(), "se": se}
    return out


def format_summary(summary: dict) -> str:
    rows = [f"{'term':<20} {'bits/dim':>12} {'+- s.e.':>10}"]
    for name in ("total", "prior_L_T", "rate_L_1_to_L_T-1", "distortion_L_0"):
        v = summary[name]
        rows.append(f"{name:<20} {v['bits_per_dim']:>12.5f} {v['se']:>10.5f}")
    rows.append(f"({summary['images']} images, D = {summary['dims']}; exact log-CDF, clip_denoised=False)")
    return "\n".join(rows)
