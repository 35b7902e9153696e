"""``Segmenter``: a U-Net plus everything needed to use it on real images.

The network only sees normalised float tiles. The Segmenter owns the rest: which task
(instances or semantic classes), how many channels, intensity normalisation, tile defaults,
axes handling (YX, ZYX, TYX, YXC, CYX ...), devices, post-processing, fine-tuning and files.
"""

from __future__ import annotations

import copy
import datetime as _dt
import math
import time
from collections.abc import Generator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import data, store
from .metrics import instance_f1
from .model import UNet
from .postprocess import classes_from_probabilities, instances_from_probabilities
from .targets import IGNORE, instance_targets, semantic_targets
from .tiling import plan_tiles, tiled_inference
from .training import TrainProgress, TrainSample, thread_limit, train

__all__ = ["Segmenter", "Prediction", "resolve_device"]

TASKS = ("instance", "semantic")
_CANON = "TZCYX"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA, then MPS, then CPU. An unavailable device is a clear error."""
    if isinstance(device, torch.device):
        device = str(device)
    name = str(device).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' was asked for but torch sees no CUDA GPU here "
            f"(torch {torch.__version__}); use device='auto' or 'cpu', or install a CUDA build"
        )
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError("device 'mps' was asked for but is not available on this machine")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'mps'")
    return torch.device(name)


@dataclass
class Prediction:
    """Result of :meth:`Segmenter.predict`.

    Attributes
    ----------
    probabilities
        float32 ``(K, *spatial)``: per-class probabilities (instance: background, interior,
        boundary), ``None`` when not requested.
    labels
        int32 ``(*spatial)``: instance ids (0 = background) or class ids.
    axes
        The spatial axes of ``labels``, in the input's order (e.g. ``"YX"``, ``"ZYX"``, ``"TYX"``).
    seconds
        Wall time of the prediction, post-processing included.
    postprocess_seconds
        Wall time of the post-processing alone.
    device
        The device that ran the network.
    """

    probabilities: np.ndarray | None
    labels: np.ndarray
    axes: str
    seconds: float
    postprocess_seconds: float
    device: str


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _as_list(x: Any) -> list:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


def _round_up(n: int, d: int) -> int:
    return int(math.ceil(n / d) * d)


class Segmenter:
    """A U-Net with its configuration; predicts, fine-tunes, saves and loads.

    Build one with :meth:`new`, :meth:`pretrained` or :meth:`load`.
    """

    def __init__(self, net: UNet, config: dict):
        task = config.get("task")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {task!r}")
        self.net = net.eval()
        self.config = config

    # ------------------------------------------------------------------ construction
    @classmethod
    def new(
        cls,
        task: str = "instance",
        in_channels: int = 1,
        *,
        num_classes: int = 2,
        ndim: int = 2,
        base_channels: int = 16,
        depth: int = 3,
        up_mode: str = "transpose",
        dropout: float = 0.0,
        seed: int | None = 0,
        name: str = "untitled",
    ) -> Segmenter:
        """An untrained model.

        Parameters
        ----------
        task
            ``"instance"`` (objects with ids; the network predicts background / interior /
            boundary) or ``"semantic"`` (``num_classes`` classes, 0 = background).
        in_channels
            Image channels the model takes (1 for a grey image, 3 for RGB ...).
        ndim
            2 for a 2D network (volumes are predicted slice by slice), 3 for a 3D network.
        base_channels, depth, up_mode, dropout
            Network size; the defaults are a small U-Net that trains fast on a CPU.
        """
        if task not in TASKS:
            raise ValueError(f"task must be 'instance' or 'semantic', not {task!r}")
        if task == "semantic" and num_classes < 2:
            raise ValueError("a semantic model needs at least 2 classes (background + one)")
        out = 3 if task == "instance" else num_classes
        if seed is not None:
            torch.manual_seed(seed)
        net = UNet(in_channels, out, base_channels, depth, ndim, up_mode, dropout)
        classes = (
            ["background", "interior", "boundary"]
            if task == "instance"
            else ["background"] + [f"class {k}" for k in range(1, num_classes)]
        )
        config = {
            "name": name,
            "task": task,
            "architecture": net.config(),
            "classes": classes,
            "normalization": {"method": "percentile", "low": 1.0, "high": 99.8},
            "tile_shape": [512, 512] if ndim == 2 else [32, 128, 128],
            "overlap": 32 if ndim == 2 else 16,
            "postprocess": {"seed_threshold": 0.5, "foreground_threshold": 0.5, "min_size": None},
            "created": _now(),
            "trained_on": [],
            "val_score": None,
            "history": [],
        }
        return cls(net, config)

    @classmethod
    def load(cls, path: str | Path) -> Segmenter:
        """Load a model saved with :meth:`save` (a folder or a single ``.safetensors`` file)."""
        state, config = store.load_model(path)
        arch = config.get("architecture")
        if not isinstance(arch, dict) or config.get("task") not in TASKS:
            raise store.ModelFileError(
                f"{path}: the config has no usable 'architecture'/'task'; it was not written by "
                "Segmenter.save"
            )
        try:
            net = UNet(**arch)
            net.load_state_dict(state, strict=True)
        except (TypeError, RuntimeError, ValueError) as e:
            raise store.ModelFileError(
                f"{path}: the weights do not fit the architecture in its config ({e})"
            ) from None
        return cls(net, config)

    @classmethod
    def pretrained(cls, name: str = "nuclei") -> Segmenter:
        """A starter model shipped inside the package (no download)."""
        root = resources.files("napari_unet") / "models"
        available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        if name not in available:
            raise store.ModelFileError(
                f"no starter model named {name!r} ships with this napari-unet; "
                f"available: {available or 'none'}"
            )
        with resources.as_file(root / name) as p:
            return cls.load(p)

    def save(self, path: str | Path) -> Path:
        """Save weights (safetensors) and config (JSON) atomically; returns the path."""
        return store.save_model(path, self.net.state_dict(), self.config)

    def copy(self) -> Segmenter:
        """An independent copy (weights and config)."""
        return Segmenter(copy.deepcopy(self.net), copy.deepcopy(self.config))

    # ------------------------------------------------------------------ properties
    @property
    def task(self) -> str:
        return self.config["task"]

    @property
    def in_channels(self) -> int:
        return self.net.in_channels

    @property
    def ndim(self) -> int:
        return self.net.ndim

    def __repr__(self) -> str:
        a = self.config["architecture"]
        return (
            f"Segmenter(name={self.config.get('name')!r}, task={self.task!r}, "
            f"in_channels={a['in_channels']}, classes={a['out_channels']}, ndim={a['ndim']}, "
            f"base_channels={a['base_channels']}, depth={a['depth']})"
        )

    # ------------------------------------------------------------------ input handling
    def _prepare(self, image: Any, axes: str | None, channel: int | None, name: str = "image"):
        """Validate and put an image into canonical TZCYX order; returns (canon, axes, lo, hi)."""
        if not hasattr(image, "shape") or not hasattr(image, "dtype"):
            image = np.asarray(image)
        if isinstance(image, np.ndarray):
            if image.dtype == bool:
                image = image.astype(np.float32)
            if not (np.issubdtype(image.dtype, np.number)) or np.iscomplexobj(image):
                raise ValueError(f"{name} has dtype {image.dtype}; expected a real-valued image")
            data.check_finite(image, name)
        if axes is None:
            axes = data.guess_axes(image.shape)
        axes = data.validate_axes(axes, image.ndim)
        if self.ndim == 3 and "Z" not in axes:
            raise ValueError(
                f"this is a 3D model but the {name} has no Z axis (axes {axes!r}); "
                "use a 2D model or pass axes with Z, e.g. 'ZYX'"
            )
        canon = data.to_canonical(image, axes, _CANON)
        n_ch = canon.shape[2]
        if channel is not None:
            if not 0 <= channel < n_ch:
                raise ValueError(f"channel={channel} but the {name} has {n_ch} channel(s)")
            canon = canon[:, :, channel : channel + 1]
            n_ch = 1
        if n_ch != self.in_channels:
            hint = " (pick one with channel=...)" if self.in_channels == 1 else ""
            raise ValueError(
                f"the model takes {self.in_channels} channel(s) but the {name} has {n_ch} "
                f"(shape {tuple(image.shape)}, axes {axes!r}){hint}"
            )
        small = [s for a, s in zip(_CANON, canon.shape, strict=True) if a in "YX" and s < 1]
        if small:
            raise ValueError(f"the {name} is empty (shape {tuple(image.shape)})")
        norm = self.config.get("normalization", {})
        lo, hi = [], []
        for c in range(n_ch):
            lo_c, hi_c = data.percentile_range(
                canon[:, :, c], norm.get("low", 1.0), norm.get("high", 99.8)
            )
            lo.append(lo_c)
            hi.append(hi_c)
        return canon, axes, np.asarray(lo, np.float32), np.asarray(hi, np.float32)

    # ------------------------------------------------------------------ prediction
    def _predictor(self, device: torch.device):
        net = self.net.eval().to(device)
        cuda = device.type == "cuda"
        fmt = torch.channels_last if self.ndim == 2 else torch.channels_last_3d
        if device.type in ("cpu", "cuda"):
            net = net.to(memory_format=fmt)
        else:
            fmt = torch.contiguous_format
        if cuda:
            dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            amp = torch.autocast("cuda", dtype=dt)
        else:
            amp = nullcontext()  # never bf16 on CPU: no native support, ~100x slower

        def predict_fn(batch: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(batch)
            if cuda:
                x = x.pin_memory().to(device, non_blocking=True)
            else:
                x = x.to(device)
            with torch.inference_mode(), amp:
                prob = net(x.contiguous(memory_format=fmt)).float().softmax(1)
            return prob.cpu().numpy()

        return predict_fn

    def predict(self, image: Any, axes: str | None = None, **kwargs: Any) -> Prediction:
        """Segment an image.

        Parameters
        ----------
        image
            numpy array or lazy array (dask, zarr) of any real dtype.
        axes
            Its axes, e.g. ``"YX"``, ``"ZYX"``, ``"TYX"``, ``"YXC"``, ``"CYX"``, ``"TZYX"``;
            guessed for 2D/3D arrays when omitted (3D with 3 or 4 last = RGB, else ZYX).
        device
            ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"mps"``.
        tile_shape, overlap, batch_size
            Tiling; defaults from the model's config.
        channel
            Use only this channel of a multichannel image (for a 1-channel model).
        return_probabilities
            Keep the probability maps (default True).

        Returns
        -------
        Prediction
        """
        gen = self.predict_iter(image, axes, **kwargs)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value

    def predict_iter(
        self,
        image: Any,
        axes: str | None = None,
        *,
        device: str | torch.device = "auto",
        tile_shape: Sequence[int] | None = None,
        overlap: int | None = None,
        batch_size: int | None = None,
        channel: int | None = None,
        return_probabilities: bool = True,
        num_threads: int | None = None,
    ) -> Generator[tuple[int, int], None, Prediction]:
        """Like :meth:`predict`, as a generator that yields ``(done, total)`` tile counts.

        Closing the generator stops the prediction promptly (used by the napari Stop button).
        The :class:`Prediction` is the generator's return value.
        """
        t0 = time.perf_counter()
        canon, axes, lo, hi = self._prepare(image, axes, channel)
        dev = resolve_device(device)
        T, Z, _, Y, X = canon.shape
        k = self.net.out_channels
        nd = self.ndim
        tile = list(tile_shape) if tile_shape is not None else list(self.config["tile_shape"])
        if len(tile) != nd:
            raise ValueError(f"tile_shape {tuple(tile)} must have {nd} values for a {nd}D model")
        ov = self.config["overlap"] if overlap is None else overlap
        div = self.net.divisor
        if batch_size is None:
            batch_size = 8 if dev.type == "cuda" else 2
        spatial = (Y, X) if nd == 2 else (Z, Y, X)
        tile_eff = [min(t, _round_up(s, div)) for t, s in zip(tile, spatial, strict=True)]
        # one tile along an axis needs no overlap; otherwise keep step >= divisor
        ov_eff = tuple(
            0 if t >= s else max(0, min(ov, t - div))
            for t, s in zip(tile_eff, spatial, strict=True)
        )
        planes = T * Z if nd == 2 else T
        per_plane = len(plan_tiles(spatial, tile_eff, ov_eff, div))
        total = planes * per_plane + 1  # +1: post-processing

        transform = _normalizer(lo, hi, channel_axis=0, ndim=nd + 1)
        probs = np.zeros((k, T, Z, Y, X), np.float32)
        fn = self._predictor(dev)
        done = 0
        with thread_limit(num_threads if dev.type == "cpu" else None):
            for t in range(T):
                for z in range(Z if nd == 2 else 1):
                    if nd == 2:
                        src, out = canon[t, z], probs[:, t, z]
                    else:
                        src, out = canon[t].transpose(1, 0, 2, 3), probs[:, t]
                    gen = tiled_inference(
                        fn,
                        src,
                        out_channels=k,
                        tile_shape=tile_eff,
                        overlap=ov_eff,
                        batch_size=batch_size,
                        divisor=div,
                        transform=transform,
                        out=out,
                    )
                    try:
                        for d, _ in gen:
                            yield done + d, total
                    finally:
                        gen.close()
                    done += per_plane
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        t1 = time.perf_counter()
        labels = self._postprocess(probs)
        yield total, total
        t2 = time.perf_counter()
        keep = [a for a in axes if a != "C"]
        labels = _from_tz(labels, keep)
        probs_out = _from_tz(probs, keep, leading=1) if return_probabilities else None
        return Prediction(probs_out, labels, "".join(keep), t2 - t0, t2 - t1, str(dev))

    def _postprocess(self, probs: np.ndarray) -> np.ndarray:
        """(K, T, Z, Y, X) probabilities -> (T, Z, Y, X) int32 labels, ids unique over T."""
        _, T, Z, Y, X = probs.shape
        labels = np.zeros((T, Z, Y, X), np.int32)
        pp = dict(self.config.get("postprocess", {}))
        offset = 0
        for t in range(T):
            if self.task == "semantic":
                labels[t] = classes_from_probabilities(probs[:, t])
                continue
            p = probs[:, t] if Z > 1 else probs[:, t, 0]
            out = labels[t] if Z > 1 else labels[t, 0]
            instances_from_probabilities(
                p,
                seed_threshold=pp.get("seed_threshold", 0.5),
                foreground_threshold=pp.get("foreground_threshold", 0.5),
                min_size=pp.get("min_size"),
                out=out,
            )
            if offset:
                lt = labels[t]
                lt[lt > 0] += offset
            offset = max(offset, int(labels[t].max()))
        return labels

    # ------------------------------------------------------------------ fine-tuning
    def finetune(
        self,
        images: Any,
        labels: Any,
        masks: Any = None,
        *,
        axes: str | None = None,
        time_limit_s: float | None = 60.0,
        steps: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        patch_shape: Sequence[int] | None = None,
        val_fraction: float = 0.0,
        augment: bool = True,
        device: str | torch.device = "auto",
        seed: int | None = 0,
        num_threads: int | None = None,
        channel: int | None = None,
        names: Sequence[str] | None = None,
    ) -> Generator[TrainProgress, None, None]:
        """Fine-tune on (image, labels) pairs; a generator of progress events.

        Parameters
        ----------
        images, labels
            One image and its labels, or lists of them. Labels are what the user paints:
            0 = background, 1..N = objects (instance) or class ids (semantic), with the image's
            spatial shape.
        masks
            Optional bool arrays (same shape as labels): True where the labels can be trusted.
            Pixels outside are ignored by the loss (partial corrections).
        time_limit_s, steps
            Budget; training stops at whichever comes first. ``close()`` the generator to stop
            earlier: the model keeps the weights of the last completed step.
        val_fraction
            Hold out this fraction (a band at the bottom of each fully annotated image) to report
            a validation F1 (instance task) and keep the best weights.
        num_threads
            CPU threads for torch during training (e.g. leave one core to the GUI).

        Yields
        ------
        TrainProgress
            step, epoch, loss, seconds, val_f1 ...; the last event has ``done=True``.
        """
        imgs, labs = _as_list(images), _as_list(labels)
        msks = _as_list(masks) if masks is not None else [None] * len(imgs)
        if not imgs:
            raise ValueError("no training images given")
        if len(imgs) != len(labs) or len(msks) != len(imgs):
            raise ValueError(
                f"got {len(imgs)} image(s), {len(labs)} label image(s) and {len(msks)} mask(s); "
                "give one labels (and mask) per image"
            )
        names = list(names) if names is not None else [f"image {i}" for i in range(len(imgs))]
        nd = self.ndim
        div = self.net.divisor
        samples: list[TrainSample] = []
        n_objects = 0
        for i, (img, lab, msk) in enumerate(zip(imgs, labs, msks, strict=True)):
            canon, ax, lo, hi = self._prepare(np.asarray(img), axes, channel, name=f"image {i}")
            lab = np.asarray(lab)
            spatial = tuple(s for a, s in zip(ax, np.shape(img), strict=True) if a != "C")
            if lab.shape != spatial:
                raise ValueError(
                    f"image {i} has spatial shape {spatial} (axes {ax!r}) but its labels have "
                    f"shape {lab.shape}; they must match pixel for pixel"
                )
            keep = "".join(a for a in ax if a != "C")
            lab_c = data.to_canonical(lab, keep, "TZYX")
            msk_c = None
            if msk is not None:
                msk = np.asarray(msk)
                if msk.shape != spatial:
                    raise ValueError(
                        f"mask {i} has shape {msk.shape} but image {i} has spatial shape {spatial}"
                    )
                msk_c = data.to_canonical(msk.astype(bool), keep, "TZYX")
                if not msk_c.any():
                    raise ValueError(f"mask {i} selects no pixel: nothing to learn from")
            img_n = _normalizer(lo, hi, channel_axis=2, ndim=5)(canon)
            T, Z = lab_c.shape[:2]
            planes = (
                [(t, z) for t in range(T) for z in range(Z)]
                if nd == 2
                else [(t, None) for t in range(T)]
            )
            for t, z in planes:
                if nd == 2:
                    x, y = img_n[t, z], lab_c[t, z]
                    m = msk_c[t, z] if msk_c is not None else None
                else:
                    x, y = img_n[t].transpose(1, 0, 2, 3), lab_c[t]
                    m = msk_c[t] if msk_c is not None else None
                if m is not None and not m.any():
                    continue
                yy = y if m is None else np.where(m, y, 0)
                n_objects += len(np.unique(yy)) - (1 if (yy == 0).any() else 0)
                if self.task == "instance":
                    tgt = instance_targets(y, m)
                else:
                    tgt = semantic_targets(y, self.net.out_channels, m)
                s = TrainSample(np.ascontiguousarray(x, np.float32), tgt, name=names[i])
                if val_fraction > 0 and self.task == "instance":
                    _hold_out(s, y, m, val_fraction, div)
                samples.append(s)
        if n_objects == 0 and all(m is None for m in msks):
            raise ValueError(
                "the labels are empty: paint at least one object (or give a mask marking a "
                "region that really has no objects) before training"
            )
        if not samples:
            raise ValueError("no annotated pixel in the training data: nothing to learn from")

        max_sp = np.max([s.target.shape for s in samples], axis=0)
        if patch_shape is None:
            # measured (docs/benchmarks.md): 64x64 patches reach F1 0.9 from scratch 3x sooner
            patch_shape = (64, 64) if nd == 2 else (16, 64, 64)
        patch = tuple(
            int(min(p, _round_up(int(m), div))) for p, m in zip(patch_shape, max_sp, strict=True)
        )
        if batch_size is None:
            batch_size = 8 if nd == 2 else 2
        if lr is None:
            lr = 1e-3 if self.config.get("history") else 3e-3
        dev = resolve_device(device)

        started = _now()
        last: TrainProgress | None = None
        gen = train(
            self.net,
            samples,
            patch_shape=patch,
            batch_size=batch_size,
            lr=lr,
            time_limit_s=time_limit_s,
            steps=steps,
            augment=augment,
            seed=seed,
            device=dev,
            num_threads=num_threads,
            validate=self._validate if val_fraction > 0 else None,
        )
        try:
            for last in gen:
                yield last
        finally:
            gen.close()
            self.net.eval().to("cpu")
            if last is not None:
                self._record(last, started, names, n_objects, lr, patch)

    def _validate(self, net: UNet, sample: TrainSample) -> float:
        net.eval()
        with torch.inference_mode():
            x = torch.from_numpy(sample.val_image[None]).to(next(net.parameters()).device)
            prob = net(x).float().softmax(1)[0].cpu().numpy()
        pp = self.config.get("postprocess", {})
        pred = instances_from_probabilities(
            prob,
            seed_threshold=pp.get("seed_threshold", 0.5),
            foreground_threshold=pp.get("foreground_threshold", 0.5),
            min_size=pp.get("min_size"),
        )
        return instance_f1(pred, sample.val_labels, iou_threshold=0.5)

    def _record(self, p: TrainProgress, started: str, names, n_objects, lr, patch) -> None:
        entry = {
            "started": started,
            "finished": _now(),
            "steps": p.step,
            "seconds": round(p.seconds, 2),
            "final_loss": None if p.loss is None or not math.isfinite(p.loss) else round(p.loss, 5),
            "val_f1": p.val_f1,
            "stopped": p.reason or "stopped by the user",
            "trained_on": list(names),
            "objects": int(n_objects),
            "lr": lr,
            "patch_shape": list(patch),
        }
        self.config.setdefault("history", []).append(entry)
        seen = self.config.setdefault("trained_on", [])
        for n in names:
            if n not in seen:
                seen.append(n)
        if p.val_f1 is not None:
            self.config["val_score"] = p.val_f1


def _normalizer(lo: np.ndarray, hi: np.ndarray, channel_axis: int, ndim: int):
    """Per-channel ``(x - lo) / (hi - lo)`` as float32 (a constant channel becomes 0)."""
    shape = [1] * ndim
    shape[channel_axis] = -1
    scale = np.where(hi - lo > 1e-6, 1.0 / np.maximum(hi - lo, 1e-6), 0.0).astype(np.float32)
    lo_b, scale_b = lo.reshape(shape), scale.reshape(shape)

    def transform(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x).astype(np.float32, copy=True)
        x -= lo_b
        x *= scale_b
        return x

    return transform


def _hold_out(s: TrainSample, labels, mask, fraction: float, div: int) -> None:
    """Move a band at the bottom (last Y rows) of a fully annotated sample to validation."""
    ny = s.target.shape[-2]
    band = _round_up(max(1, int(round(ny * fraction))), div)
    if band < 2 * div or ny - band < 2 * div:
        return
    if mask is not None and not np.all(mask[..., ny - band :, :]):
        return
    s.val_image = np.ascontiguousarray(s.image[..., ny - band :, :])
    s.val_labels = np.ascontiguousarray(labels[..., ny - band :, :])
    s.target = s.target.copy()
    s.target[..., ny - band :, :] = IGNORE


def _from_tz(arr: np.ndarray, keep: list[str], leading: int = 0) -> np.ndarray:
    """(lead..., T, Z, Y, X) -> the user's spatial axes ``keep`` (subset of TZYX, any order)."""
    src = "TZYX"
    idx: list[Any] = [slice(None)] * leading
    present = []
    for a in src:
        if a in keep:
            idx.append(slice(None))
            present.append(a)
        else:
            idx.append(0)
    out = arr[tuple(idx)]
    order = list(range(leading)) + [leading + present.index(a) for a in keep]
    out = np.transpose(out, order)
    return np.ascontiguousarray(out)
