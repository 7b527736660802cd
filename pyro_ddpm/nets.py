"""Noise-prediction networks eps_theta(x_t, t), t an integer in 1..T.

:class:`UNet` is the architecture of Ho et al. (2020, Appendix B; the official ``diffusion`` code):
a sinusoidal embedding of t fed to every residual block, residual blocks with GroupNorm, SiLU and
dropout, self-attention at chosen resolutions, ``ch * ch_mult[i]`` channels at level i and
``num_res_blocks`` blocks per level. The last convolution of each residual block, of each attention
block and of the network start at zero, as in the official code. :class:`MLP` is the same idea for
flat data (2-D toys).

The reverse process accepts any ``torch.nn.Module`` with this call signature, so analytic or
third-party networks plug in unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from pyro_ddpm.config import Configurable
from pyro_ddpm.registry import NETWORKS


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The Transformer's sinusoidal embedding of the (integer) timesteps ``t``: shape (len(t), dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, c_out)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (f(h).reshape(B, C, H * W).transpose(1, 2) for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


@NETWORKS.register(name="unet")
class UNet(Configurable, nn.Module):
    """The DDPM U-Net eps_theta(x_t, t) for images of shape (in_channels, resolution, resolution).

    ``out_channels`` (default ``in_channels``) sets the output's channels: twice the input's for a
    model that also predicts its variance (:class:`~pyro_ddpm.models.LearnedVarianceReverseProcess`).
    ``config()`` is the constructor's arguments: ``UNet(**net.config())`` builds the same architecture.
    """

    def __init__(
        self,
        resolution: int,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        groups: int = 32,
        out_channels: int | None = None,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else int(out_channels)
        if out_channels < 1:
            raise ValueError(f"UNet: out_channels must be positive, got {out_channels}")
        self.record_config(out_channels=out_channels)
        self.shape = (in_channels, resolution, resolution)
        self.ch = ch
        temb_dim = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips, c, res = [ch], ch, resolution
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                blocks = [ResBlock(c, ch * mult, temb_dim, dropout, groups)]
                c = ch * mult
                if res in attn_resolutions:
                    blocks.append(AttnBlock(c, groups))
                self.down.append(nn.ModuleList(blocks))
                skips.append(c)
            if level != len(ch_mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
                res //= 2

        self.mid = nn.ModuleList(
            [ResBlock(c, c, temb_dim, dropout, groups), AttnBlock(c, groups), ResBlock(c, c, temb_dim, dropout, groups)]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                blocks = [ResBlock(c + skips.pop(), ch * mult, temb_dim, dropout, groups)]
                c = ch * mult
                if res in attn_resolutions:
                    blocks.append(AttnBlock(c, groups))
                self.up.append(nn.ModuleList(blocks))
            if level != 0:
                self.up.append(
                    nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1))
                )
                res *= 2
        self.norm_out = _norm(c, groups)
        self.conv_out = _zero(nn.Conv2d(c, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb(timestep_embedding(t, self.ch).to(x.dtype))
        hs = [self.conv_in(x)]
        for layer in self.down:
            if isinstance(layer, nn.ModuleList):
                h = layer[0](hs[-1], temb)
                for attn in layer[1:]:
                    h = attn(h)
                hs.append(h)
            else:
                hs.append(layer(hs[-1]))
        h = hs[-1]
        h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = layer[0](torch.cat([h, hs.pop()], dim=1), temb)
                for attn in layer[1:]:
                    h = attn(h)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@NETWORKS.register(name="mlp")
class MLP(Configurable, nn.Module):
    """eps_theta(x_t, t) for flat data of shape (dim,): residual MLP blocks with a time embedding.

    ``out_channels`` (default ``dim``) sets the output's size, as it does for :class:`UNet`: for flat
    data the D features stand where an image's channels do.
    """

    def __init__(
        self, dim: int = 2, hidden: int = 128, depth: int = 3, temb_dim: int = 64, out_channels: int | None = None
    ):
        super().__init__()
        out_dim = dim if out_channels is None else int(out_channels)
        if out_dim < 1:
            raise ValueError(f"MLP: out_channels must be positive, got {out_dim}")
        self.record_config(out_channels=out_dim)
        self.shape = (dim,)
        self.temb_dim = temb_dim
        self.temb = nn.Sequential(nn.Linear(temb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb(timestep_embedding(t, self.temb_dim).to(x.dtype))
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h + temb)
        return self.out(h)


class EpsNetwork(Configurable, nn.Module):
    """``eps(x_t, t)`` in the library's convention around any network or plain callable.

    An ``nn.Module`` even when the callable has no parameters, so that ``pyro.module`` (which needs
    an object with ``.parameters()``) registers it; a callable that is itself an ``nn.Module`` is a
    submodule (its parameters are registered, ``.to(device)`` moves it).

    :param fn: ``fn(x, t)`` returning a tensor shaped like ``x`` (eps), (B, 2C, ...) (eps and v), an
        object with ``.sample`` or a tuple whose first entry is that tensor.
    :param zero_based: call ``fn(x, t - 1)`` (improved-diffusion, guided-diffusion, diffusers).
    :param time_scale: multiply the network's timestep by this (improved-diffusion's
        ``rescale_timesteps``: 1000 / T); 1 leaves it an integer.
    :param dtype: the dtype the network is run in (a ``torch.dtype`` or its name, e.g. ``"float16"``);
        default the dtype of its first floating-point parameter, and for a network without parameters
        (a plain function) the dtype of its input.
    :param shape: the shape of one datum (read by ``ReverseProcess`` as ``eps.shape``).

    ``t`` may be a float tensor (the probability-flow ODE calls the network between the integers):
    it is shifted and scaled the same way and passed on as a float. The wrapped callable is what the
    wrapper is built around: ``config()`` holds the other arguments (``dtype`` by name), and
    ``EpsNetwork.from_config(fn=fn, **config)`` wraps a callable the same way.
    """

    built_around = ("fn",)

    def __init__(
        self, fn, zero_based: bool = False, time_scale: float = 1.0, dtype: torch.dtype | str | None = None, shape=None
    ):
        super().__init__()
        if not callable(fn):
            raise ValueError(f"EpsNetwork: the network must be callable as fn(x_t, t), got {type(fn).__name__}")
        if isinstance(dtype, str):
            named = getattr(torch, dtype, None)
            if not isinstance(named, torch.dtype):
                raise ValueError(f"EpsNetwork: {dtype!r} names no torch dtype (e.g. 'float32', 'bfloat16')")
            dtype = named
        self.fn = fn  # an nn.Module becomes a registered submodule; a plain function is a plain attribute
        self.zero_based = bool(zero_based)
        self.time_scale = float(time_scale)
        self._dtype = dtype
        self.record_config(dtype=None if dtype is None else str(dtype).removeprefix("torch."))
        if shape is not None:
            self.shape = tuple(int(s) for s in shape)

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype the network is run in (None: a network without parameters runs in its input's)."""
        if self._dtype is not None:
            return self._dtype
        for p in self.parameters():
            if p.dtype.is_floating_point:
                return p.dtype
        return None

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """The wrapped network's timestep for the library's t: (t - 1 if zero-based) * time_scale."""
        t = t - 1 if self.zero_based else t
        return t * self.time_scale if self.time_scale != 1.0 else t

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype or x.dtype
        tn = self.network_time(t)
        if tn.dtype.is_floating_point:
            tn = tn.to(dtype)
        out = self.fn(x.to(dtype), tn)
        if hasattr(out, "sample") and torch.is_tensor(out.sample):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if not torch.is_tensor(out):
            raise ValueError(
                f"EpsNetwork: the network returned {type(out).__name__}, expected a tensor (or an object with .sample)"
            )
        return out.to(x.dtype)


def build_network(config: dict) -> nn.Module:
    """A network from a preset-style config: ``{"kind": NAME, **constructor arguments}``, NAME registered in
    :data:`pyro_ddpm.registry.NETWORKS` (``unet``, ``mlp``, or a class of one's own)."""
    config = dict(config)
    kind = config.pop("kind", None)
    if kind is None:
        raise ValueError(f"network config {config!r} names no 'kind'; choose one of {NETWORKS.names()}")
    return NETWORKS.build({"class": kind, "config": config}, origin="the network config")


def network_config(net: nn.Module) -> dict:
    """The config that rebuilds ``net`` with :func:`build_network` (for checkpoints)."""
    if not callable(getattr(net, "config", None)):
        raise ValueError(f"network: cannot record the configuration of a {type(net).__name__} (it has no config())")
    return {"kind": NETWORKS.name_of(type(net)), **net.config()}
