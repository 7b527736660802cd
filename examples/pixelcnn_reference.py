"""An autoregressive reference: what a PixelCNN trained on the same split codes the digits test set in.

    python examples/pixelcnn_reference.py            # 3000 steps: minutes on a CPU
    python examples/pixelcnn_reference.py --quick    # seconds

A diffusion model's bound is one number; whether it is good for this data needs what a different
likelihood model reaches on the same training images. The PixelCNN (van den Oord et al. 2016) factorizes
an image in raster order,

    p(x_0) = prod_i p(x_0^i | x_0^1, ..., x_0^{i-1}),

each factor a categorical over the K grid levels whose logits come from masked convolutions: the first
layer's mask ("A") hides the pixel itself and every later one, the following layers' ("B") let a
position see itself, which by then holds only what came before it. A per-position bias added after
the first layer lets the network know where it is (the digits' borders are blank) without seeing more.

As a Pyro program: :meth:`PixelCNNReference.model` registers the network (``pyro.module``) and observes
each image's level indices at the site ``x_0`` under that categorical, in a plate over images. There is
no latent variable, so the guide is empty and ``Trace_ELBO``'s loss is exactly -log p(x_0): SVI is
maximum likelihood, and the test number is the exact negative log-likelihood, not a bound.

The network overfits 1437 images within a few thousand steps, so ``--held-out`` images of the
*training* split (a seeded draw; never the test split) are scored every ``--eval-every`` steps and the
weights of the best step are the ones scored on the test split. Writes ``pixelcnn_reference.json``:
the test bits/dim with its standard error over images, the chosen step and the held-out curve.

Only single-channel grid data (digits, MNIST): the masks order pixels, not channels.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from pyro_ddpm import data, grid, stats
from pyro_ddpm.files import atomic_write
from pyro_ddpm.protocol import X_0

NAME = "pixelcnn_reference"


class MaskedConv2d(nn.Conv2d):
    """A same-size convolution that sees only the pixels before its centre in raster order (mask "A"),
    or those and the centre (mask "B")."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, see_centre: bool):
        super().__init__(in_channels, out_channels, kernel, padding=kernel // 2)
        mask = torch.ones_like(self.weight)
        c = kernel // 2
        mask[:, :, c, c + int(see_centre) :] = 0.0  # the centre row: the centre (mask A) and what follows it
        mask[:, :, c + 1 :] = 0.0  # every row below
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class PixelCNN(nn.Module):
    """Logits (B, K, H, W) of p(x_0^i | x_0^{<i}) for single-channel images (B, 1, H, W) in [-1, 1]."""

    def __init__(self, levels: int, height: int, width: int, channels: int, layers: int, dropout: float):
        super().__init__()
        self.first = MaskedConv2d(1, channels, 7, see_centre=False)
        self.position = nn.Parameter(torch.zeros(1, channels, height, width))
        self.layers = nn.ModuleList(MaskedConv2d(channels, channels, 3, see_centre=True) for _ in range(layers))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Dropout(dropout), nn.Conv2d(channels, levels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x) + self.position
        for layer in self.layers:
            h = h + self.drop(layer(F.relu(h)))
        return self.head(h)


class PixelCNNReference:
    """The autoregressive model as a Pyro program over the network ``net``."""

    def __init__(self, net: PixelCNN, levels: int):
        self.net, self.levels = net, levels

    def model(self, x0: torch.Tensor) -> None:
        """x_0 ~ prod_i Categorical(logits_i(x_0^{<i})) over the K levels, one image per plate entry."""
        pyro.module("pixelcnn", self.net)
        logits = self.net(x0).movedim(1, -1)  # (B, H, W, K)
        with pyro.plate("images", x0.shape[0]):
            pyro.sample(X_0, dist.Categorical(logits=logits).to_event(2), obs=grid.index(x0[:, 0], self.levels))

    def guide(self, x0: torch.Tensor) -> None:
        """No latent variables: the ELBO is the log-likelihood itself."""

    def log_prob(self, x0: torch.Tensor, batch: int = 512) -> torch.Tensor:
        """log p(x_0) per image (nats), read off the model's trace, in evaluation mode (no dropout)."""
        was = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                out = []
                for chunk in x0.split(batch):
                    trace = poutine.trace(self.model).get_trace(chunk)
                    trace.compute_log_prob()
                    out.append(trace.nodes[X_0]["log_prob"])
                return torch.cat(out)
        finally:
            self.net.train(was)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="digits", help="a single-channel grid data set (default %(default)s)")
    ap.add_argument("--out", default=f"runs/examples/{NAME}", help="output folder (default %(default)s)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 3000; --quick: 20)")
    ap.add_argument("--channels", type=int, default=None, help="network width (default 96; --quick: 8)")
    ap.add_argument("--layers", type=int, default=None, help="masked 3 x 3 layers (default 6; --quick: 1)")
    ap.add_argument("--dropout", type=float, default=0.5, help="default %(default)s")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=128, help="default %(default)s")
    ap.add_argument(
        "--held-out", type=int, default=200, help="training images kept out to pick the step (default %(default)s)"
    )
    ap.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="score the held-out images every N steps (default 250; --quick: 10)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a tiny network, a few steps (for tests)")
    args = ap.parse_args(argv)
    for name, (quick, full) in {
        "steps": (20, 3000),
        "channels": (8, 96),
        "layers": (1, 6),
        "eval_every": (10, 250),
    }.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in ("steps", "channels", "batch_size", "held_out", "eval_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.layers < 0:
        raise ValueError(f"--layers must be >= 0, got {args.layers}")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must lie in [0, 1), got {args.dropout}")
    return args


def bits_per_dim(log_p: torch.Tensor, dims: int) -> tuple[float, float]:
    """Mean and standard error over images of -log2 p(x_0) / D."""
    return stats.mean_se(stats.bits_per_dim(-log_p.double(), dims).numpy())


def main(argv=None) -> dict:
    args = parse(argv)
    ds = data.load(args.data)
    if ds.levels < 2 or len(ds.shape) != 3 or ds.shape[0] != 1:
        raise ValueError(
            f"{NAME}: needs single-channel grid images, {args.data} has shape {ds.shape}, levels {ds.levels}"
        )
    if args.held_out >= len(ds.train):
        raise ValueError(f"--held-out {args.held_out} leaves no training images of {len(ds.train)}")
    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    order = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(args.seed))
    held, fit = ds.train[order[: args.held_out]], ds.train[order[args.held_out :]]
    _, height, width = ds.shape
    net = PixelCNN(ds.levels, height, width, args.channels, args.layers, args.dropout)
    ref = PixelCNNReference(net, ds.levels)
    svi = SVI(ref.model, ref.guide, pyro.optim.Adam({"lr": args.lr}), Trace_ELBO())

    curve, best = [], (math.inf, 0, None)  # (held-out bits/dim, step, weights); the last step is always scored
    net.train()
    for step in range(1, args.steps + 1):
        batch = fit[torch.randint(len(fit), (args.batch_size,))]
        loss = svi.step(batch)
        if step % args.eval_every == 0 or step == args.steps:
            held_bpd, _ = bits_per_dim(ref.log_prob(held), ds.dims)
            train_bpd = stats.bits_per_dim(loss, args.batch_size * ds.dims)
            curve.append({"step": step, "held_out_bits_per_dim": held_bpd, "train_batch_bits_per_dim": train_bpd})
            if held_bpd < best[0]:
                best = (held_bpd, step, copy.deepcopy(net.state_dict()))
    net.load_state_dict(best[2])
    test, test_se = bits_per_dim(ref.log_prob(ds.test), ds.dims)
    result = {
        "data": args.data,
        "levels": ds.levels,
        "D": ds.dims,
        "train_images": len(fit),
        "held_out_images": len(held),
        "test_images": len(ds.test),
        "settings": {
            k: getattr(args, k) for k in ("steps", "channels", "layers", "dropout", "lr", "batch_size", "seed")
        },
        "parameters": sum(p.numel() for p in net.parameters()),
        "best_step": best[1],
        "held_out_bits_per_dim": best[0],
        "test_bits_per_dim": test,
        "test_se": test_se,
        "curve": curve,
    }
    path = Path(args.out) / f"{NAME}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(result, indent=2).encode()))
    print(
        f"PixelCNN ({result['parameters']} parameters), weights of step {best[1]} of {args.steps} "
        f"(held-out {best[0]:.4f}): test {test:.4f} +- {test_se:.4f} bits/dim on {len(ds.test)} images; "
        f"written {path}"
    )
    return result


if __name__ == "__main__":
    main()
