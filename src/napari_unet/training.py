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

    Yields
    ------
    TrainProgress
        After every step; the last one has ``done=True`` and ``reason`` set.
    """
    if time_limit_s is None and steps is None:
        raise ValueError("give a time limit (time_limit_s) or a number of steps, or both")
    if (time_limit_s is not None and time_limit_s <= 0) or (steps is not None and steps <= 0):
        raise ValueError("time_limit_s and steps must be positive")
    if not samples:
        raise ValueError("no training images given")
    device = torch.device(device)
    rng = np.random.default_rng(seed)
    if seed is not None:
        torch.manual_seed(seed)
    sampler = _PatchSampler(samples, tuple(patch_shape), rng, replay_share)
    n_classes = getattr(net, "out_channels", None) or int(max(s.target.max() for s in samples)) + 1
    weight = _class_weights(samples, n_classes).to(device)
    ndim = len(patch_shape)
    mem_fmt = (
        torch.channels_last
        if channels_last and ndim == 2
        else (torch.channels_last_3d if channels_last else torch.contiguous_format)
    )
    has_val = validate is not None and any(s.val_labels is not None for s in samples)
    patches_per_epoch = max(1, sampler.total // int(np.prod(patch_shape)))

    with thread_limit(num_threads if device.type == "cpu" else None):
        net.to(device)
        net.to(memory_format=mem_fmt)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        good = {k: v.detach().clone() for k, v in net.state_dict().items()}
        start = [p.detach().clone() for p in net.parameters()] if anchor > 0 else None
        best_f1, best_state = -1.0, None
        history: list[dict] = []
        t0 = time.perf_counter()
        last_eval = t0
        step, loss_ema, val_f1 = 0, None, None
        reason = ""
        try:
            while True:
                elapsed = time.perf_counter() - t0
                frac = max(
                    step / steps if steps else 0.0,
                    elapsed / time_limit_s if time_limit_s else 0.0,
                )
                warm = min(1.0, (step + 1) / 20)
                cur_lr = lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
                for g in opt.param_groups:
                    g["lr"] = cur_lr

                imgs, tgts = [], []
                for _ in range(batch_size):
                    img, tgt = sampler.sample()
                    if augment:
                        img, tgt = _augment(img, tgt, rng)
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
                y = y.to(device, non_blocking=True)

                net.train()
                if freeze_norm:
                    for m in net.modules():
                        if isinstance(m, nn.modules.batchnorm._BatchNorm):
                            m.eval()
                logits = net(x)
                loss = _loss(logits, y, weight)
                opt.zero_grad(set_to_none=True)
                if not torch.isfinite(loss):
                    net.load_state_dict(good)
                    reason = "diverged (loss not finite); weights restored to the last good step"
                    break
                loss.backward()
                opt.step()
                if start is not None:
                    with torch.no_grad():
                        keep = 1.0 - min(1.0, cur_lr * anchor)
                        for p, p0 in zip(net.parameters(), start, strict=True):
                            p.mul_(keep).add_(p0, alpha=1.0 - keep)
                step += 1
                lv = float(loss.detach())
                loss_ema = lv if loss_ema is None else 0.9 * loss_ema + 0.1 * lv
                now = time.perf_counter()
                elapsed = now - t0

                if has_val and (now - last_eval >= eval_every_s):
                    val_f1 = _run_validation(net, samples, validate)
                    last_eval = time.perf_counter()
                    if val_f1 > best_f1:
                        best_f1 = val_f1
                        best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                if step % 10 == 0:
                    good = {k: v.detach().clone() for k, v in net.state_dict().items()}
                history.append({"step": step, "seconds": round(elapsed, 3), "loss": lv})
                if val_f1 is not None:
                    history[-1]["val_f1"] = val_f1
                if steps and step >= steps:
                    reason = "step limit reached"
                elif time_limit_s and elapsed >= time_limit_s:
                    reason = "time limit reached"
                if reason:
                    break
                yield TrainProgress(
                    step=step,
                    epoch=step * batch_size / patches_per_epoch,
                    loss=loss_ema,
                    seconds=elapsed,
                    lr=cur_lr,
                    patches_per_s=step * batch_size / max(elapsed, 1e-9),
                    val_f1=val_f1,
                    best_val_f1=best_f1 if best_f1 >= 0 else None,
                    total_steps=steps,
                    time_limit_s=time_limit_s,
                    history=history,
                )
        finally:
            net.eval()
        # normal end (a close() raises GeneratorExit at the yield and skips this)
        if has_val:
            val_f1 = _run_validation(net, samples, validate)
            if best_state is not None and best_f1 > val_f1:
                net.load_state_dict(best_state)
                reason += f"; kept the weights with the best validation F1 ({best_f1:.3f})"
                val_f1 = best_f1
        elapsed = time.perf_counter() - t0
        yield TrainProgress(
            step=step,
            epoch=step * batch_size / patches_per_epoch,
            loss=loss_ema if loss_ema is not None else float("nan"),
            seconds=elapsed,
            lr=0.0,
            patches_per_s=step * batch_size / max(elapsed, 1e-9),
            val_f1=val_f1,
            best_val_f1=max(best_f1, val_f1) if val_f1 is not None else None,
            total_steps=steps,
            time_limit_s=time_limit_s,
            done=True,
            reason=reason,
            history=history,
        )


def _run_validation(net, samples, validate) -> float:
    scores = [validate(net, s) for s in samples if s.val_labels is not None]
    net.train()
    return float(np.mean(scores))
