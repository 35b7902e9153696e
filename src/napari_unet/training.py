"""Fine-tuning loop: random patches, augmentation, weighted cross-entropy + Dice, AdamW.

``train`` is a generator: it yields a :class:`TrainProgress` after every optimisation step, so a
caller (a napari thread worker, a notebook, the CLI) can draw progress and stop it at once with
``close()``. It stops by itself on a time limit or a step count and always leaves the network in
its last good state: a step whose loss is not finite is undone, and with a validation hold-out the
weights with the best validation F1 are kept.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from .targets import IGNORE

__all__ = ["TrainProgress", "TrainSample", "train", "thread_limit"]


@dataclass
class TrainSample:
    """One training image: normalised ``image (C, *S)`` float32 and ``target (*S)`` int64.

    ``val_image``/``val_labels`` (optional) are a held-out region and its instance labels.
    ``name`` says where it came from (kept in the model's history). ``replay`` marks data the
    model learned from before (generated nuclei), mixed into fine-tuning so that it does not
    forget: replay samples together get a fixed share of the patches (:data:`REPLAY_SHARE`).
    """

    image: np.ndarray
    target: np.ndarray
    val_image: np.ndarray | None = None
    val_labels: np.ndarray | None = None
    name: str = ""
    replay: bool = False


@dataclass
class TrainProgress:
    """A progress event of the fine-tuning loop."""

    step: int
    epoch: float
    loss: float
    seconds: float
    lr: float
    patches_per_s: float
    val_f1: float | None = None
    best_val_f1: float | None = None
    total_steps: int | None = None
    time_limit_s: float | None = None
    done: bool = False
    reason: str = ""
    history: list[dict] = field(default_factory=list, repr=False)

    @property
    def fraction(self) -> float:
        """Fraction of the budget (steps or time) used, 0..1."""
        parts = []
        if self.total_steps:
            parts.append(self.step / self.total_steps)
        if self.time_limit_s:
            parts.append(self.seconds / self.time_limit_s)
        return min(1.0, max(parts)) if parts else 0.0


@contextlib.contextmanager
def thread_limit(num_threads: int | None):
    """Temporarily set torch's intra-op thread count (None leaves it alone)."""
    if not num_threads:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(num_threads)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


#: Fraction of the patches drawn from replay samples, when there are any.
REPLAY_SHARE = 0.5


class _PatchSampler:
    """Random patches centred on annotated pixels, half of them on foreground."""

    def __init__(
        self, samples: Sequence[TrainSample], patch: tuple[int, ...], rng, share=REPLAY_SHARE
    ):
        self.samples, self.patch, self.rng = samples, patch, rng
        self.annotated = [np.flatnonzero(s.target.reshape(-1) != IGNORE) for s in samples]
        self.foreground = [np.flatnonzero(s.target.reshape(-1) > 0) for s in samples]
        counts = np.array([a.size for a in self.annotated], float)
        if counts.sum() == 0:
            raise ValueError("nothing to learn from: no annotated pixel in any training image")
        replay = np.array([s.replay for s in samples], bool)
        if replay.any() and counts[~replay].sum() > 0:
            counts[replay] *= share / counts[replay].sum()
            counts[~replay] *= (1.0 - share) / counts[~replay].sum()
        self.p = counts / counts.sum()
        own = [a.size for a, r in zip(self.annotated, replay, strict=True) if not r]
        self.total = int(sum(own) or 1)

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        i = int(self.rng.choice(len(self.samples), p=self.p))
        s = self.samples[i]
        pool = self.foreground[i] if self.foreground[i].size and self.rng.random() < 0.5 else None
        pool = self.annotated[i] if pool is None else pool
        centre = np.unravel_index(pool[self.rng.integers(pool.size)], s.target.shape)
        spatial = s.target.shape
        sl, pads = [], []
        for c, n, p in zip(centre, spatial, self.patch, strict=True):
            if n >= p:
                start = int(np.clip(c - p // 2 + self.rng.integers(-p // 4, p // 4 + 1), 0, n - p))
                sl.append(slice(start, start + p))
                pads.append((0, 0))
            else:
                sl.append(slice(0, n))
                pads.append(((p - n) // 2, p - n - (p - n) // 2))
        img = s.image[(slice(None), *sl)]
        tgt = s.target[tuple(sl)]
        if any(a or b for a, b in pads):
            mode = (
                "reflect"
                if all(n > max(pd) for n, pd in zip(tgt.shape, pads, strict=True))
                else "edge"
            )
            img = np.pad(img, [(0, 0), *pads], mode=mode)
            tgt = np.pad(tgt, pads, mode="constant", constant_values=IGNORE)
        return img, tgt


def _augment(img: np.ndarray, tgt: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    nd = tgt.ndim
    for ax in range(nd):
        if rng.random() < 0.5:
            img, tgt = np.flip(img, ax + 1), np.flip(tgt, ax)
    if tgt.shape[-1] == tgt.shape[-2]:
        k = int(rng.integers(4))
        img, tgt = np.rot90(img, k, axes=(-2, -1)), np.rot90(tgt, k, axes=(-2, -1))
    return img, tgt


def _microscope(img: np.ndarray, rng) -> np.ndarray:
    """Imaging differences between labs, each with probability 0.3, on a normalised patch
    ``(C, *S)`` (about 0..1): out-of-focus blur (Gaussian, sigma 0.3-1.5 px, within planes),
    another contrast curve (gamma 0.67-1.5 over the patch's range) and camera noise (Gaussian,
    1-8 % of the range)."""
    img = np.asarray(img, np.float32)
    if rng.random() < 0.3:
        sigma = float(rng.uniform(0.3, 1.5))
        img = ndimage.gaussian_filter(img, sigma=(0,) + (sigma,) * (img.ndim - 1))
    if rng.random() < 0.3:
        lo, hi = float(img.min()), float(img.max())
        if hi > lo:
            g = float(np.exp(rng.uniform(-0.4, 0.4)))
            img = ((img - lo) / (hi - lo)) ** g * (hi - lo) + lo
    if rng.random() < 0.3:
        img = img + rng.normal(0.0, rng.uniform(0.01, 0.08), img.shape).astype(np.float32)
    return img


def _class_weights(samples: Sequence[TrainSample], n_classes: int) -> torch.Tensor:
    counts = np.zeros(n_classes)
    for s in samples:
        t = s.target.reshape(-1)
        counts += np.bincount(t[t >= 0], minlength=n_classes)[:n_classes]
    freq = (counts + 1) / (counts.sum() + n_classes)
    w = freq**-0.5
    return torch.as_tensor(w / w.mean(), dtype=torch.float32)


def _loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted cross-entropy + soft Dice over the non-background classes; IGNORE is masked."""
    ce = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE)
    valid = (target != IGNORE).unsqueeze(1)
    prob = logits.float().softmax(1) * valid
    onehot = F.one_hot(target.clamp(min=0), logits.shape[1]).movedim(-1, 1) * valid
    dims = (0, *range(2, logits.ndim))
    inter = (prob * onehot).sum(dims)[1:]
    denom = (prob + onehot).sum(dims)[1:]
    dice = 1 - ((2 * inter + 1) / (denom + 1)).mean()
    return ce + dice


def train(
    net: nn.Module,
    samples: Sequence[TrainSample],
    *,
    patch_shape: tuple[int, ...],
    batch_size: int = 8,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    time_limit_s: float | None = 60.0,
    steps: int | None = None,
    augment: bool = True,
    strong_augment: bool = False,
    seed: int | None = 0,
    device: torch.device | str = "cpu",
    num_threads: int | None = None,
    channels_last: bool = True,
    validate: Callable[[nn.Module, TrainSample], float] | None = None,
    eval_every_s: float = 5.0,
    anchor: float = 0.0,
    freeze_norm: bool = False,
    replay_share: float = REPLAY_SHARE,
) -> Generator[TrainProgress, None, None]:
    """Fine-tune ``net`` in place on random patches of ``samples``; yields progress each step.

    Parameters
    ----------
    net
        The network; its output channels are the classes.
    samples
        Training images and targets (see :class:`TrainSample`); targets use ``IGNORE`` (-1)
        for pixels the loss must skip.
    patch_shape
        Spatial patch size; multiples of the network's divisor train fastest.
    time_limit_s, steps
        Stop after this many seconds and/or optimisation steps (whichever comes first). At least
        one must be given.
    validate
        ``validate(net, sample) -> F1`` for samples with a hold-out; called every
        ``eval_every_s`` seconds and at the end. The best-scoring weights are kept.
    num_threads
        torch CPU threads during training (leave one core to a GUI); None keeps the current.
    anchor
        Pull toward the weights training started from (decoupled, like AdamW's weight decay
        but toward the start instead of zero): after each step every weight moves back by
        ``lr * anchor`` of its distance from where it started. A fine-tuned model then keeps
        what it knew where the new data says nothing.
    freeze_norm
        Keep the normalisation layers' running statistics as they are (the few patches of a
        correction round would otherwise overwrite statistics learned from many images).
    replay_share
        Fraction of the patches drawn from samples marked ``replay`` (when there are any).
    strong_augment
        With ``augment``, also blur, change the contrast curve and add noise to patches
        (:func:`_microscope`): for a starter that must meet other labs' images.

    Yields
    ------
    TrainProgress
        After every step; the last one has ``done=True`` and ``reason`` set.
    """
    _check_budget(samples, time_limit_s, steps)
    device = torch.device(device)
    rng = np.random.default_rng(seed)
    if seed is not None:
        torch.manual_seed(seed)
    sampler = _PatchSampler(samples, tuple(patch_shape), rng, replay_share)
    n_classes = getattr(net, "out_channels", None) or int(max(s.target.max() for s in samples)) + 1
    weight = _class_weights(samples, n_classes).to(device)
    ndim = len(patch_shape)
    mem_fmt = _memory_format(channels_last, ndim)
    has_val = validate is not None and any(s.val_labels is not None for s in samples)
    run = _Run(
        batch_size=batch_size,
        patches_per_epoch=max(1, sampler.total // int(np.prod(patch_shape))),
        steps=steps,
        time_limit_s=time_limit_s,
    )

    with thread_limit(num_threads if device.type == "cpu" else None):
        net.to(device)
        net.to(memory_format=mem_fmt)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        run.start(net, anchor)
        try:
            while True:
                cur_lr = _set_lr(opt, lr, run.step, run.used())
                x, y = _batch(
                    sampler, rng, batch_size, augment, ndim, device, mem_fmt, strong_augment
                )
                loss = _step(net, opt, x, y, weight, freeze_norm, cur_lr * anchor, run.anchor)
                if loss is None:
                    run.diverged(net)
                    break
                now = run.record(float(loss.detach()))
                if has_val and (now - run.last_eval >= eval_every_s):
                    run.validated(net, _run_validation(net, samples, validate))
                run.keep_good(net)
                if run.stop_reason():
                    break
                yield run.progress(cur_lr)
        finally:
            net.eval()
        # normal end (a close() raises GeneratorExit at the yield and skips this)
        if has_val:
            run.finish_validation(net, _run_validation(net, samples, validate))
        yield run.progress(0.0, done=True)


def _check_budget(
    samples: Sequence[TrainSample], time_limit_s: float | None, steps: int | None
) -> None:
    if time_limit_s is None and steps is None:
        raise ValueError("give a time limit (time_limit_s) or a number of steps, or both")
    if (time_limit_s is not None and time_limit_s <= 0) or (steps is not None and steps <= 0):
        raise ValueError("time_limit_s and steps must be positive")
    if not samples:
        raise ValueError("no training images given")


def _memory_format(channels_last: bool, ndim: int) -> torch.memory_format:
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last if ndim == 2 else torch.channels_last_3d


def _set_lr(opt: torch.optim.Optimizer, lr: float, step: int, used: float) -> float:
    """Warm up over 20 steps, then a cosine down to 5 % over the budget; returns the lr set."""
    warm = min(1.0, (step + 1) / 20)
    cur_lr = lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(used, 1.0))))
    for g in opt.param_groups:
        g["lr"] = cur_lr
    return cur_lr


def _batch(
    sampler: _PatchSampler,
    rng: np.random.Generator,
    batch_size: int,
    augment: bool,
    ndim: int,
    device: torch.device,
    mem_fmt: torch.memory_format,
    strong: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of patches on ``device``: ``x (B, C, *P)`` float32, ``y (B, *P)`` int64.

    With ``augment``: random flips and right-angle turns, and a random gain and offset of the
    intensities per patch and channel.
    """
    imgs, tgts = [], []
    for _ in range(batch_size):
        img, tgt = sampler.sample()
        if augment:
            img, tgt = _augment(img, tgt, rng)
            if strong:
                img = _microscope(img, rng)
        imgs.append(img)
        tgts.append(tgt)
    x = torch.from_numpy(np.ascontiguousarray(np.stack(imgs)))
    y = torch.from_numpy(np.ascontiguousarray(np.stack(tgts)))
    if augment:
        shape = (x.shape[0], x.shape[1]) + (1,) * ndim
        gain = torch.empty(shape).uniform_(0.75, 1.33)
        shift = torch.empty(shape).uniform_(-0.1, 0.1)
        x = x * gain + shift
    x = x.to(device, non_blocking=True).contiguous(memory_format=mem_fmt)
    return x, y.to(device, non_blocking=True)


def _step(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    freeze_norm: bool,
    pull: float,
    start: list[torch.Tensor] | None,
) -> torch.Tensor | None:
    """One optimisation step; returns the loss, or None (nothing changed) if it is not finite.

    ``start`` (the weights training began from) and ``pull`` (``lr * anchor``): after the step
    every weight moves back by ``pull`` of its distance from where it started.
    """
    net.train()
    if freeze_norm:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    logits = net(x)
    loss = _loss(logits, y, weight)
    opt.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return None
    loss.backward()
    opt.step()
    if start is not None:
        with torch.no_grad():
            keep = 1.0 - min(1.0, pull)
            for p, p0 in zip(net.parameters(), start, strict=True):
                p.mul_(keep).add_(p0, alpha=1.0 - keep)
    return loss


def _snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@dataclass
class _Run:
    """The state of one fine-tuning run between steps: counts, clock, losses, kept weights."""

    batch_size: int
    patches_per_epoch: int
    steps: int | None
    time_limit_s: float | None
    step: int = 0
    loss_ema: float | None = None
    val_f1: float | None = None
    best_f1: float = -1.0
    best_state: dict | None = None
    good: dict = field(default_factory=dict)  # the last weights known to be finite
    anchor: list[torch.Tensor] | None = None  # the starting weights, when anchored
    history: list[dict] = field(default_factory=list)
    reason: str = ""
    t0: float = 0.0
    last_eval: float = 0.0
    elapsed: float = 0.0
    last_loss: float = math.nan

    def start(self, net: nn.Module, anchor: float) -> None:
        self.good = _snapshot(net)
        self.anchor = [p.detach().clone() for p in net.parameters()] if anchor > 0 else None
        self.t0 = self.last_eval = time.perf_counter()

    def used(self) -> float:
        """Fraction of the budget (steps or time) used so far; may exceed 1."""
        elapsed = time.perf_counter() - self.t0
        return max(
            self.step / self.steps if self.steps else 0.0,
            elapsed / self.time_limit_s if self.time_limit_s else 0.0,
        )

    def record(self, loss: float) -> float:
        """Count a step with ``loss``; returns the time."""
        self.step += 1
        self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss
        now = time.perf_counter()
        self.elapsed = now - self.t0
        self.last_loss = loss
        return now

    def diverged(self, net: nn.Module) -> None:
        """A step's loss was not finite: back to the last good weights, and stop."""
        net.load_state_dict(self.good)
        self.reason = "diverged (loss not finite); weights restored to the last good step"

    def validated(self, net: nn.Module, f1: float) -> None:
        self.val_f1 = f1
        self.last_eval = time.perf_counter()
        if f1 > self.best_f1:
            self.best_f1 = f1
            self.best_state = _snapshot(net)

    def keep_good(self, net: nn.Module) -> None:
        """Every 10 steps keep the weights (to undo a divergence); log the step."""
        if self.step % 10 == 0:
            self.good = _snapshot(net)
        self.history.append(
            {"step": self.step, "seconds": round(self.elapsed, 3), "loss": self.last_loss}
        )
        if self.val_f1 is not None:
            self.history[-1]["val_f1"] = self.val_f1

    def stop_reason(self) -> str:
        if self.steps and self.step >= self.steps:
            self.reason = "step limit reached"
        elif self.time_limit_s and self.elapsed >= self.time_limit_s:
            self.reason = "time limit reached"
        return self.reason

    def finish_validation(self, net: nn.Module, f1: float) -> None:
        """The final score; the best weights seen come back if they scored higher."""
        self.val_f1 = f1
        if self.best_state is not None and self.best_f1 > f1:
            net.load_state_dict(self.best_state)
            self.reason += f"; kept the weights with the best validation F1 ({self.best_f1:.3f})"
            self.val_f1 = self.best_f1

    def progress(self, lr: float, done: bool = False) -> TrainProgress:
        if done:
            self.elapsed = time.perf_counter() - self.t0
            best = max(self.best_f1, self.val_f1) if self.val_f1 is not None else None
        else:
            best = self.best_f1 if self.best_f1 >= 0 else None
        loss = self.loss_ema
        return TrainProgress(
            step=self.step,
            epoch=self.step * self.batch_size / self.patches_per_epoch,
            loss=float("nan") if loss is None else loss,
            seconds=self.elapsed,
            lr=lr,
            patches_per_s=self.step * self.batch_size / max(self.elapsed, 1e-9),
            val_f1=self.val_f1,
            best_val_f1=best,
            total_steps=self.steps,
            time_limit_s=self.time_limit_s,
            done=done,
            reason=self.reason if done else "",
            history=self.history,
        )


def _run_validation(net, samples, validate) -> float:
    scores = [validate(net, s) for s in samples if s.val_labels is not None]
    net.train()
    return float(np.mean(scores))
