"""Draw the figures of ``docs/unet.md`` from the code itself.

Usage::

    python scripts/make_figures.py            # writes docs/images/*.png, prints the tables
    python scripts/make_figures.py --out DIR  # somewhere else

Three figures, all deterministic (fixed seeds, single-threaded torch, Agg backend):

``unet_architecture.png``
    The reference ``UNet(in_channels=3, out_channels=1)``. Widths are read from the modules
    of a real instance and spatial sizes from a forward pass on the ``meta`` device (shapes
    only, no arithmetic), for a 256x256 input.
``receptive_field.png``
    For depth 1..4: the gradient of the centre output pixel with respect to the input
    (random weights, eval mode, averaged over a few seeds), next to the receptive field
    computed from the layer list.
``skip_ablation.png``
    A synthetic nuclei image block-averaged by ``2**depth`` and interpolated back: the spatial
    detail available at the bottleneck alone, which the skip connections must supply.

The tables printed on stdout (per-level cost of the reference network, receptive fields) are
the numbers quoted in ``docs/unet.md``. Runtime: well under a minute on one CPU core.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402
from torch import nn  # noqa: E402

from napari_unet.data import make_nuclei  # noqa: E402
from napari_unet.model import UNet, count_parameters  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PNG_META = {"Software": None}  # no version string in the files: same bytes on every run

ENC, BOT, DEC = "#cfe2f3", "#d9c8ec", "#fde3c8"
C_POOL, C_UP, C_SKIP, C_OUT = "#c0392b", "#27864a", "#5f6b7a", "#1f4e9c"


# ------------------------------------------------------------------------------------------
# reading the network
# ------------------------------------------------------------------------------------------


def block_widths(net: UNet) -> tuple[list[int], list[int]]:
    """Output widths of the encoder blocks (level 0..depth) and decoder blocks (level 0..).

    Read from the convolutions of the modules, not recomputed from ``base_channels``.
    """

    def out_width(block: nn.Module) -> int:
        convs = [m for m in block.modules() if isinstance(m, nn.modules.conv._ConvNd)]
        return convs[-1].out_channels

    encoder = [out_width(net.inc)] + [out_width(d) for d in net.downs]
    decoder = [out_width(u.conv) for u in reversed(net.ups)]  # level 0 first
    return encoder, decoder


def reference() -> UNet:
    """The reference network, built on the meta device: shapes and counts, no weights."""
    with torch.device("meta"):
        return UNet(in_channels=3, out_channels=1)


def trace_shapes(net: UNet, size: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Input and output shape of every conv, pooling and up-sampling module for a
    ``size`` x ``size`` input, from a forward pass on the meta device (no arithmetic)."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    kinds = (nn.modules.conv._ConvNd, nn.MaxPool2d, nn.MaxPool3d, nn.Upsample)
    hooks = []
    for name, module in net.named_modules():
        if isinstance(module, kinds):

            def hook(m, inputs, output, name=name):
                shapes[name] = (tuple(inputs[0].shape), tuple(output.shape))

            hooks.append(module.register_forward_hook(hook))
    net.to("meta")(torch.empty(1, net.in_channels, *(size,) * net.ndim, device="meta"))
    for h in hooks:
        h.remove()
    return shapes


def macs(module: nn.Module, shape_in: tuple[int, ...], shape_out: tuple[int, ...]) -> int:
    """Multiply-accumulates of one conv / transposed conv for the traced shapes."""
    k = math.prod(module.kernel_size)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return math.prod(shape_in) * module.out_channels * k // module.groups
    return math.prod(shape_out) * module.in_channels * k // module.groups


def level_of(name: str, depth: int) -> int:
    """Resolution level (0 = full) of a named module of a UNet."""
    parts = name.split(".")
    if parts[0] in ("inc", "outc"):
        return 0
    if parts[0] == "downs":
        return int(parts[1]) + 1
    return depth - 1 - int(parts[1])  # ups[i] works at level depth-1-i


def _propagate(module: nn.Module, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Push 1D receptive-field intervals ``[lo, hi]`` (input pixels) through ``module``.

    Every position of a feature map (along one axis) sees the input pixels ``lo..hi``. A
    convolution takes the union over its window, max-pooling over its 2 pixels, a kernel-2
    stride-2 transposed convolution gives both children the interval of their one parent,
    interpolation the union of the two parents it blends. BatchNorm, ReLU and dropout act
    pixel by pixel and change nothing.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            k, s = m.kernel_size[0], m.stride[0]
            if k != s:
                raise NotImplementedError("only non-overlapping transposed convolutions")
            parent = np.arange(len(lo) * s) // s
            lo, hi = lo[parent], hi[parent]
        elif isinstance(m, nn.modules.conv._ConvNd):
            k, p, n = m.kernel_size[0], m.padding[0], len(lo)
            new_lo, new_hi = np.full(n, np.inf), np.full(n, -np.inf)
            for o in range(k):  # zero padding contributes no input pixel
                src = np.arange(n) - p + o
                ok = (src >= 0) & (src < n)
                new_lo[ok] = np.minimum(new_lo[ok], lo[src[ok]])
                new_hi[ok] = np.maximum(new_hi[ok], hi[src[ok]])
            lo, hi = new_lo, new_hi
        elif isinstance(m, (nn.MaxPool2d, nn.MaxPool3d)):
            k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
            n = len(lo) // k
            lo, hi = lo[: n * k].reshape(n, k).min(1), hi[: n * k].reshape(n, k).max(1)
        elif isinstance(m, nn.Upsample):
            f, n = int(m.scale_factor), len(lo)
            a = np.clip(np.floor((np.arange(n * f) + 0.5) / f - 0.5).astype(int), 0, n - 1)
            b = np.minimum(a + 1, n - 1)
            lo, hi = np.minimum(lo[a], lo[b]), np.maximum(hi[a], hi[b])
    return lo, hi


def _field(net: UNet, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last input pixel seen by every output pixel along one axis, following
    ``UNet.forward``: encoder, bottleneck, decoder with the skip concatenated (the union of
    the two fields), final 1x1 convolution."""
    skips = [_propagate(net.inc, pos, pos)]
    for down in net.downs:
        skips.append(_propagate(down, *skips[-1]))
    y = skips.pop()
    for up in net.ups:
        up_lo, up_hi = _propagate(up.up, *y)
        skip_lo, skip_hi = skips.pop()
        y = _propagate(up.conv, np.minimum(up_lo, skip_lo), np.maximum(up_hi, skip_hi))
    return _propagate(net.outc, *y)


def receptive_fields(net: UNet, size: int) -> np.ndarray:
    """Receptive-field width (input pixels) of every output pixel along one axis of length
    ``size`` (a multiple of ``2**depth``), computed from the layers."""
    lo, hi = _field(net, np.arange(size, dtype=float))
    return (hi - lo + 1).astype(int)


def theoretical_rf(net: UNet, size: int = 256) -> int:
    """Receptive field of the centre output pixel of a ``size`` x ``size`` input."""
    return int(receptive_fields(net, size)[size // 2])


def rf_range(net: UNet, size: int = 1024) -> tuple[int, int]:
    """Smallest and largest receptive field over output pixels away from the border.

    They differ once ``depth >= 3``: up-sampling hands one coarse pixel to a 2x2 block of
    fine ones, so the field depends on the position modulo ``2**depth``.
    """
    w = receptive_fields(net, size)[size // 4 : 3 * size // 4]
    return int(w.min()), int(w.max())


# ------------------------------------------------------------------------------------------
# figure 1: the architecture
# ------------------------------------------------------------------------------------------


def level_table(size: int = 256) -> list[dict]:
    """Per-level width, size, parameters, compute and receptive field of the reference net."""
    net = reference()
    depth = net.depth
    enc_w, _ = block_widths(net)
    params = [0] * (depth + 1)
    for name, p in net.named_parameters():
        params[level_of(name, depth)] += p.numel()
    named = dict(net.named_modules())
    shapes = trace_shapes(net, size)
    cost = [0] * (depth + 1)
    for name, (s_in, s_out) in shapes.items():
        module = named[name]
        if isinstance(module, nn.modules.conv._ConvNd):
            cost[level_of(name, depth)] += macs(module, s_in, s_out)
    rows = []
    for k in range(depth + 1):
        rf_k = rf_range(UNet(1, 1, base_channels=1, depth=k)) if k else None
        rows.append(
            {
                "level": k,
                "size": size // 2**k,
                "width": enc_w[k],
                "params": params[k],
                "gmacs": cost[k] / 1e9,
                "rf_if_depth": rf_k,
            }
        )
    return rows


def box(ax, xc, yc, w, h, color, text, fontsize=9.5):
    patch = FancyBboxPatch(
        (xc - w / 2, yc - h / 2),
        w,
        h,
        boxstyle="round,pad=0.02,rounding_size=0.08",
        facecolor=color,
        edgecolor="#333333",
        linewidth=1.2,
        zorder=3,
    )
    ax.add_patch(patch)
    ax.text(xc, yc, text, ha="center", va="center", fontsize=fontsize, zorder=4)


def arrow(ax, start, end, color, style="-|>", lw=2.0, ls="-", rad=0.0):
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle=style,
            mutation_scale=16,
            color=color,
            linewidth=lw,
            linestyle=ls,
            connectionstyle=f"arc3,rad={rad}",
            zorder=2,
        )
    )


def draw_architecture(path: Path, size: int = 256) -> None:
    net = reference()
    n_params = count_parameters(net)
    depth = net.depth
    enc_w, dec_w = block_widths(net)
    up_kind = type(net.ups[0].up).__name__
    shapes = trace_shapes(net, size)
    # spatial size per level, read from the traced encoder convolutions
    spatial = [shapes["inc.0"][1][-1]] + [shapes[f"downs.{k}.1.0"][1][-1] for k in range(depth)]
    out_ch = shapes["outc"][1][1]

    dy, dx, centre = 1.5, 1.8, 0.0
    bw, bh = 1.9, 0.9
    x_in, x_out = centre - depth * dx - 3.0, centre + depth * dx + 3.0

    fig, ax = plt.subplots(figsize=(15.5, 7.0))
    ax.set_xlim(x_in - 0.9, x_out + 0.9)
    ax.set_ylim(-depth * dy - 0.95, 1.75)
    ax.set_aspect("equal")
    ax.axis("off")

    def y(k: int) -> float:
        return -k * dy

    def xe(k: int) -> float:
        return centre - (depth - k) * dx

    def xd(k: int) -> float:
        return centre + (depth - k) * dx

    grey = {"fontsize": 9, "color": "#444444"}
    # input, output and the final 1x1 convolution
    box(ax, x_in, y(0), 1.6, bh, "white", f"input\n{net.in_channels} ch, {size}×{size}", 9)
    box(ax, x_out, y(0), 1.6, bh, "white", f"output\n{out_ch} ch, {size}×{size}", 9)
    arrow(ax, (x_in + 0.82, y(0)), (xe(0) - bw / 2 - 0.04, y(0)), C_OUT)
    arrow(ax, (xd(0) + bw / 2 + 0.04, y(0)), (x_out - 0.82, y(0)), C_OUT)
    ax.text(
        (xd(0) + bw / 2 + x_out - 0.8) / 2,
        y(0) + 0.12,
        "1×1 conv",
        color=C_OUT,
        ha="center",
        va="bottom",
        fontsize=9.5,
        fontweight="bold",
    )

    for k in range(depth + 1):
        res = f"{spatial[k]}×{spatial[k]}"
        if k == depth:
            box(ax, centre, y(k), bw + 0.4, bh, BOT, f"bottleneck\nDoubleConv, {enc_w[k]} ch")
            ax.text(centre, y(k) - bh / 2 - 0.08, res, ha="center", va="top", **grey)
            continue
        box(ax, xe(k), y(k), bw, bh, ENC, f"DoubleConv\n{enc_w[k]} ch")
        box(ax, xd(k), y(k), bw, bh, DEC, f"DoubleConv\n{enc_w[k]} + {dec_w[k]} → {dec_w[k]} ch", 9)
        if k == 0:
            ax.text(xe(k), y(k) + bh / 2 + 0.08, res, ha="center", va="bottom", **grey)
            ax.text(xd(k), y(k) + bh / 2 + 0.08, res, ha="center", va="bottom", **grey)
        else:
            ax.text(xe(k) - bw / 2 - 0.1, y(k) - 0.2, res, ha="right", va="center", **grey)
            ax.text(xd(k) + bw / 2 + 0.1, y(k) - 0.2, res, ha="left", va="center", **grey)
        # skip connection
        arrow(
            ax,
            (xe(k) + bw / 2 + 0.04, y(k)),
            (xd(k) - bw / 2 - 0.04, y(k)),
            C_SKIP,
            lw=1.6,
            ls="--",
        )
        what = "skip: copy + concatenate" if k == 0 else "skip"
        ax.text(
            centre,
            y(k) + 0.08,
            f"{what} ({enc_w[k]} ch)",
            ha="center",
            va="bottom",
            fontsize=8.5,
            color=C_SKIP,
        )
        # down: max-pooling, then the next DoubleConv
        below_e = xe(k + 1) if k + 1 < depth else centre - 0.45
        below_d = xd(k + 1) if k + 1 < depth else centre + 0.45
        arrow(
            ax,
            (xe(k) + 0.15, y(k) - bh / 2 - 0.03),
            (below_e - 0.25, y(k + 1) + bh / 2 + 0.03),
            C_POOL,
        )
        left = (xe(k + 1) - bw / 2 if k + 1 < depth else centre - (bw + 0.4) / 2) - 0.1
        ax.text(
            left,
            y(k + 1) + 0.22,
            "max-pool 2×2",
            ha="right",
            va="center",
            fontsize=8.5,
            color=C_POOL,
        )
        # up: transposed convolution
        arrow(
            ax,
            (below_d + 0.25, y(k + 1) + bh / 2 + 0.03),
            (xd(k) - 0.15, y(k) - bh / 2 - 0.03),
            C_UP,
        )
        w_in = enc_w[depth] if k + 1 == depth else dec_w[k + 1]
        right = (xd(k + 1) + bw / 2 if k + 1 < depth else centre + (bw + 0.4) / 2) + 0.1
        ax.text(
            right,
            y(k + 1) + 0.22,
            f"up-conv 2×2: {w_in} → {w_in // 2} ch",
            ha="left",
            va="center",
            fontsize=8.5,
            color=C_UP,
        )

    ax.text(
        xe(1),
        1.45,
        "encoder (contracting path): context grows, resolution drops",
        fontsize=10.5,
        ha="center",
        color="#1f4e79",
        fontweight="bold",
    )
    ax.text(
        xd(1),
        1.45,
        "decoder (expanding path): back to full resolution",
        fontsize=10.5,
        ha="center",
        color="#8a4b0f",
        fontweight="bold",
    )
    ax.set_title(
        f"UNet(in_channels={net.in_channels}, out_channels={net.out_channels}): depth {depth}, "
        f"base_channels {net.base_channels}, {n_params:,} parameters; sizes for a "
        f"{size}×{size} input",
        fontsize=12,
    )
    legend = (
        "DoubleConv = (3×3 conv, BatchNorm, ReLU) twice; Y, X unchanged (padding 1)\n"
        "max-pool 2×2: halves Y and X, keeps the channels\n"
        f"up-conv 2×2 ({up_kind}, stride 2): doubles Y and X, halves the channels\n"
        "skip: the encoder map is concatenated in front of the up-sampled map"
    )
    ax.text(
        x_in - 0.8,
        -depth * dy + 0.1,
        legend,
        fontsize=9,
        va="center",
        ha="left",
        bbox={"facecolor": "#f7f7f7", "edgecolor": "#bbbbbb", "boxstyle": "round"},
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata=PNG_META)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# figure 2: the receptive field, measured
# ------------------------------------------------------------------------------------------


def he_init(net: nn.Module) -> nn.Module:
    """Gaussian weights with std sqrt(2 / fan_in), the initialisation of the U-Net paper.

    It keeps the signal size through ReLU layers, so the deep path through the bottleneck is
    not drowned out by the short full-resolution path (as it is with torch's default init).
    """
    for m in net.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


def gradient_map(depth: int, size: int, seeds: range, base: int = 8, he: bool = True) -> np.ndarray:
    """Mean |d output[centre] / d input| over random networks and random inputs.

    ``he=False`` keeps torch's default initialisation (for comparison only).
    """
    total = torch.zeros(size, size, dtype=torch.float64)
    c = size // 2
    for seed in seeds:
        torch.manual_seed(seed)
        net = UNet(1, 1, base_channels=base, depth=depth)
        net = (he_init(net) if he else net).eval()
        x = torch.randn(1, 1, size, size, requires_grad=True)
        net(x)[0, 0, c, c].backward()
        g = x.grad[0, 0].abs().double()
        total += g / g.sum()
    return (total / len(seeds)).numpy()


def support_width(g: np.ndarray) -> tuple[int, int]:
    """Height and width of the bounding box of the non-zero gradient."""
    rows = np.flatnonzero(g.max(axis=1) > 0)
    cols = np.flatnonzero(g.max(axis=0) > 0)
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def mass_width(g: np.ndarray, fraction: float) -> int:
    """Side of the smallest square centred on the output pixel holding ``fraction`` of |grad|."""
    c = g.shape[0] // 2
    total = g.sum()
    for half in range(c):
        if g[c - half : c + half + 1, c - half : c + half + 1].sum() >= fraction * total:
            return 2 * half + 1
    return g.shape[0]


def _square(ax, centre: float, side: int, **style) -> None:
    ax.add_patch(Rectangle((centre - side / 2, centre - side / 2), side, side, fill=False, **style))


def draw_receptive_field(path: Path, size: int = 256, view: int = 208) -> list[dict]:
    depths = (1, 2, 3, 4)
    seeds = range(6)
    rows = []
    fig, axes = plt.subplots(1, len(depths), figsize=(14.0, 4.9))
    c, h = size // 2, view // 2
    window = (slice(c - h, c + h), slice(c - h, c + h))
    for ax, depth in zip(axes, depths, strict=True):
        net = UNet(1, 1, base_channels=1, depth=depth)
        lo, hi = _field(net, np.arange(size, dtype=float))
        rf = int(hi[c] - lo[c] + 1)
        g = gradient_map(depth, size, seeds)
        sup = support_width(g)
        m50, m90 = mass_width(g, 0.5), mass_width(g, 0.9)
        rows.append({"depth": depth, "theory": rf, "support": sup, "mass50": m50, "mass90": m90})
        crop = g[window] / g.max()
        logg = np.log10(np.where(crop > 0, crop, np.nan))  # white: no influence at all
        ax.imshow(logg, cmap="viridis", vmin=-6, vmax=0, interpolation="nearest")
        # the computed field, drawn where it lies (not centred on the pixel once depth >= 2)
        x0 = lo[c] - (c - h) - 0.5
        ax.add_patch(
            Rectangle(
                (x0, x0), rf, rf, fill=False, edgecolor="black", linestyle="--", linewidth=1.4
            )
        )
        _square(ax, h, m90, edgecolor="white", linewidth=1.3)
        _square(ax, h, m50, edgecolor="#ff6040", linewidth=1.3)
        ax.plot([h], [h], marker="+", color="#ff6040", markersize=8, mew=1.3)
        ax.set_title(
            f"depth {depth} (bottleneck at 1/{2**depth})\nreceptive field {rf}×{rf} px", fontsize=11
        )
        ax.set_xlabel(
            f"non-zero gradient: {sup[0]}×{sup[1]} px\n"
            f"90% of |grad|: {m90}×{m90} px;  50%: {m50}×{m50} px",
            fontsize=9.5,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        "Which input pixels can change the centre output pixel (+)?  log10 |gradient|, "
        "6 decades; white = no influence.\n"
        "Dashed: receptive field computed from the layers.  White / red squares: where 90% / "
        "50% of the gradient lies.\n"
        f"UNet(1, 1, base_channels=8), random weights (He init), eval mode, {size}×{size} "
        f"random input, mean over {len(seeds)} seeds; central {view}×{view} px shown",
        fontsize=10.5,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata=PNG_META)
    plt.close(fig)
    return rows


# ------------------------------------------------------------------------------------------
# figure 3: what the bottleneck alone keeps
# ------------------------------------------------------------------------------------------


def draw_skip_ablation(path: Path) -> list[dict]:
    image, labels = make_nuclei((128, 128), seed=0)
    img = image.astype(np.float32)
    lo, hi = np.percentile(img, (1, 99.8))
    img = np.clip((img - lo) / (hi - lo), 0, 1)
    x = torch.from_numpy(img)[None, None]
    sizes = np.bincount(labels.ravel())[1:]
    diam = 2 * np.sqrt(sizes / np.pi)  # equivalent diameters, px
    d_lo, d_hi = int(round(np.percentile(diam, 5))), int(round(np.percentile(diam, 95)))
    edges = _outlines(labels)
    red = np.zeros((*labels.shape, 4))
    red[edges] = (1.0, 0.25, 0.2, 0.9)
    depths = (2, 3, 4)
    fig, axes = plt.subplots(1, len(depths) + 1, figsize=(14.0, 4.6))
    axes[0].imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[0].set_title(f"input 128×128: {int(labels.max())} nuclei", fontsize=11)
    axes[0].set_xlabel(f"nucleus diameter {d_lo}-{d_hi} px", fontsize=10)
    rows = []
    for ax, depth in zip(axes[1:], depths, strict=True):
        f = 2**depth
        coarse = F.avg_pool2d(x, f)
        back = F.interpolate(coarse, scale_factor=f, mode="bilinear", align_corners=False)
        ax.imshow(back[0, 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"depth {depth}: {128 // f}×{128 // f} grid (1 px = {f}×{f} px)", fontsize=11)
        ax.set_xlabel(f"a nucleus spans {d_lo / f:.1f}-{d_hi / f:.1f} grid px", fontsize=10)
        rows.append({"depth": depth, "grid": 128 // f, "span": (d_lo / f, d_hi / f)})
    for ax in axes:
        ax.imshow(red, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        "Spatial detail left on the bottleneck grid alone: block mean over 2^depth × 2^depth "
        "pixels, then bilinear interpolation back to 128×128.\nRed: the true object outlines, "
        "including the lines between touching nuclei.",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata=PNG_META)
    plt.close(fig)
    return rows


def _outlines(labels: np.ndarray) -> np.ndarray:
    """Object pixels next to a different label (background or another object)."""
    edge = np.zeros(labels.shape, bool)
    for axis in (0, 1):
        a = [slice(None)] * 2
        b = [slice(None)] * 2
        a[axis], b[axis] = slice(1, None), slice(None, -1)
        diff = labels[tuple(a)] != labels[tuple(b)]
        edge[tuple(a)] |= diff
        edge[tuple(b)] |= diff
    return edge & (labels > 0)


# ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    plt.rcParams.update({"font.family": "DejaVu Sans"})

    draw_architecture(args.out / "unet_architecture.png")
    print("reference UNet(3, 1), 256x256 input, per resolution level (encoder + decoder)")
    print("level     size  width  parameters  GMAC  receptive field of a UNet this deep")
    table = level_table()
    for r in table:
        rf = "-" if r["rf_if_depth"] is None else "{}-{} px".format(*r["rf_if_depth"])
        print(
            f"{r['level']:>5}  {r['size']:>3}x{r['size']:<3}  {r['width']:>5}  "
            f"{r['params']:>10,}  {r['gmacs']:4.1f}  {rf}"
        )
    print(
        f"total              {sum(r['params'] for r in table):>10,}  "
        f"{sum(r['gmacs'] for r in table):4.1f}"
    )
    lo, hi = rf_range(reference())
    print(
        f"receptive field of the reference network: {lo}-{hi} px "
        f"(centre of a 256x256 input: {theoretical_rf(reference())} px)"
    )

    rows = draw_receptive_field(args.out / "receptive_field.png")
    print("\nreceptive field of the centre output pixel (UNet(1, 1, base_channels=8), He init)")
    print("depth  computed  non-zero gradient  50% of |grad|  90% of |grad|")
    for r in rows:
        print(
            f"{r['depth']:>5}  {r['theory']:>8}  {r['support'][0]:>8}x{r['support'][1]:<8}  "
            f"{r['mass50']:>13}  {r['mass90']:>13}"
        )

    widths = [mass_width(gradient_map(d, 256, range(6), he=False), 0.9) for d in (1, 2, 3, 4)]
    print(f"with torch's default init instead, 90% of |grad| within: {widths} px")

    rows = draw_skip_ablation(args.out / "skip_ablation.png")
    print("\nbottleneck grid of a 128x128 nuclei image")
    for r in rows:
        print(
            f"depth {r['depth']}: {r['grid']}x{r['grid']} grid, a nucleus spans "
            "{:.1f}-{:.1f} grid pixels".format(*r["span"])
        )
    print(f"\nwrote {', '.join(sorted(p.name for p in args.out.glob('*.png')))} to {args.out}")


if __name__ == "__main__":
    main()
