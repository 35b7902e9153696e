"""The U-Net, in pure torch.

``UNet(in_channels=3, out_channels=1)`` with default arguments is the reference network of the
original U-Net paper as commonly implemented: four ``DoubleConv`` encoder levels (widths
64-128-256-512), a 1024-wide bottleneck, a decoder of stride-2 transposed convolutions whose
outputs are concatenated with the encoder feature map of the same size (encoder first) and fed to
a ``DoubleConv``, and a final 1x1 convolution: 31,037,633 parameters.

The generalisation keeps that network as a special case: ``base_channels``, ``depth``, ``ndim``
(2 or 3), up-sampling by transposed convolution or by interpolation followed by a 1x1 convolution,
and optional dropout. Unlike the reference, any input size works: the input is padded to a
multiple of ``2**depth`` and the output cropped back.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DoubleConv", "Down", "Up", "UNet", "count_parameters"]


def _conv(ndim: int) -> type[nn.Module]:
    return nn.Conv2d if ndim == 2 else nn.Conv3d


def _norm(ndim: int) -> type[nn.Module]:
    return nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d


class DoubleConv(nn.Sequential):
    """(3x3 conv, BatchNorm, ReLU) twice. ``(B, in, *S) -> (B, out, *S)``.

    The convolutions have no bias (BatchNorm follows), as in the reference.
    """

    def __init__(self, in_ch: int, out_ch: int, ndim: int = 2, dropout: float = 0.0):
        conv, norm = _conv(ndim), _norm(ndim)
        layers: list[nn.Module] = [
            conv(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
            norm(out_ch),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout) if ndim == 2 else nn.Dropout3d(dropout))
        layers += [
            conv(out_ch, out_ch, kernel_size=3, padding=1, bias=False),
            norm(out_ch),
            nn.ReLU(inplace=True),
        ]
        super().__init__(*layers)


class Down(nn.Sequential):
    """2x max-pooling then ``DoubleConv``. ``(B, in, *S) -> (B, out, *S/2)``."""

    def __init__(self, in_ch: int, out_ch: int, ndim: int = 2, dropout: float = 0.0):
        pool = nn.MaxPool2d(2) if ndim == 2 else nn.MaxPool3d(2)
        super().__init__(pool, DoubleConv(in_ch, out_ch, ndim, dropout))


class Up(nn.Module):
    """Up-sample x2, concatenate the skip (encoder first), ``DoubleConv``.

    ``x: (B, in, *S/2), skip: (B, in/2, *S) -> (B, out, *S)``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        ndim: int = 2,
        mode: Literal["transpose", "interp"] = "transpose",
        dropout: float = 0.0,
    ):
        super().__init__()
        half = in_ch // 2
        if mode == "transpose":
            tconv = nn.ConvTranspose2d if ndim == 2 else nn.ConvTranspose3d
            self.up: nn.Module = tconv(in_ch, half, kernel_size=2, stride=2)
        elif mode == "interp":
            interp = "bilinear" if ndim == 2 else "trilinear"
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode=interp, align_corners=False),
                _conv(ndim)(in_ch, half, kernel_size=1),
            )
        else:
            raise ValueError(f"up_mode must be 'transpose' or 'interp', not {mode!r}")
        self.conv = DoubleConv(half + (in_ch - half), out_ch, ndim, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """U-Net for 2D or 3D images.

    Parameters
    ----------
    in_channels, out_channels
        Channels of the input image and of the output map.
    base_channels
        Width of the first level; level ``k`` has ``base_channels * 2**k`` channels.
    depth
        Number of down-sampling steps (4 in the reference). Inputs are padded to a multiple of
        ``2**depth`` and the output is cropped back, so any size works.
    ndim
        2 for images (B, C, Y, X), 3 for volumes (B, C, Z, Y, X).
    up_mode
        ``"transpose"`` (the reference: 2x2 stride-2 transposed conv) or ``"interp"``
        (bilinear/trilinear interpolation followed by a 1x1 conv; fewer parameters, no
        checkerboard artefacts).
    dropout
        Dropout probability after the first conv of each block (0 disables it).
    pad_mode
        How the input is padded to a multiple of ``2**depth``: ``"reflect"`` or ``"zeros"``.

    Shapes
    ------
    ``forward``: ``(B, in_channels, *S) -> (B, out_channels, *S)`` (logits).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        base_channels: int = 64,
        depth: int = 4,
        ndim: int = 2,
        up_mode: Literal["transpose", "interp"] = "transpose",
        dropout: float = 0.0,
        pad_mode: Literal["reflect", "zeros"] = "reflect",
    ):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, not {ndim!r}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, not {depth!r}")
        if in_channels < 1 or out_channels < 1 or base_channels < 1:
            raise ValueError("in_channels, out_channels and base_channels must be positive")
        if pad_mode not in ("reflect", "zeros"):
            raise ValueError(f"pad_mode must be 'reflect' or 'zeros', not {pad_mode!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.base_channels, self.depth, self.ndim = base_channels, depth, ndim
        self.up_mode, self.dropout, self.pad_mode = up_mode, dropout, pad_mode

        widths = [base_channels * 2**k for k in range(depth + 1)]
        self.inc = DoubleConv(in_channels, widths[0], ndim, dropout)
        self.downs = nn.ModuleList(
            Down(widths[k], widths[k + 1], ndim, dropout) for k in range(depth)
        )
        self.ups = nn.ModuleList(
            Up(widths[k + 1], widths[k], ndim, up_mode, dropout) for k in reversed(range(depth))
        )
        self.outc = _conv(ndim)(widths[0], out_channels, kernel_size=1)

    @property
    def divisor(self) -> int:
        """Spatial sizes the network handles without padding are multiples of this."""
        return 2**self.depth

    def config(self) -> dict:
        """The constructor arguments, JSON-serialisable (to rebuild the network)."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "base_channels": self.base_channels,
            "depth": self.depth,
            "ndim": self.ndim,
            "up_mode": self.up_mode,
            "dropout": self.dropout,
            "pad_mode": self.pad_mode,
        }

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        spatial = x.shape[2:]
        if len(spatial) != self.ndim:
            raise ValueError(
                f"a {self.ndim}D U-Net expects input (B, C, {'Z, ' if self.ndim == 3 else ''}"
                f"Y, X), got shape {tuple(x.shape)}"
            )
        d = self.divisor
        extra = [(-s) % d for s in spatial]
        if not any(extra):
            return x, tuple(spatial)
        pad: list[int] = []
        for e in reversed(extra):  # F.pad wants the last axis first
            pad += [e // 2, e - e // 2]
        mode = "constant"
        if self.pad_mode == "reflect":
            # reflect needs pad < size; tiny inputs fall back to replicate
            ok = all(e - e // 2 < s for e, s in zip(extra, spatial, strict=True))
            mode = "reflect" if ok else "replicate"
        return F.pad(x, pad, mode=mode), tuple(spatial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            # export (napari_unet.engines): inputs are multiples of the divisor, checked by
            # the caller; Python checks on traced shapes would only warn
            return self._layers(x)
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"the network expects {self.in_channels} input channel(s), got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})"
            )
        x, spatial = self._pad(x)
        y = self._layers(x)
        if tuple(y.shape[2:]) != spatial:
            extra = [p - s for p, s in zip(y.shape[2:], spatial, strict=True)]
            crop = tuple(slice(e // 2, e // 2 + s) for e, s in zip(extra, spatial, strict=True))
            y = y[(slice(None), slice(None)) + crop]
        return y


    def _layers(self, x: torch.Tensor) -> torch.Tensor:
        """The network proper, on an input whose sizes are multiples of :attr:`divisor`."""
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.outc(y)


def count_parameters(net: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``net``."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)
