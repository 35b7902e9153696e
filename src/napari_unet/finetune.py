"""Fine-tuning a :class:`~napari_unet.segmenter.Segmenter` on the user's corrections.

:func:`finetune` is what :meth:`Segmenter.finetune` runs. It turns the images and the labels
the user painted into :class:`~napari_unet.training.TrainSample` s (:class:`_Samples`), picks
the round's settings (patch, batch, learning rate, the safe round of
:mod:`napari_unet.safeguard`), runs :func:`napari_unet.training.train` and, at the end, records
the round in the model's history (:func:`_record`). To run a training with a stop button, a
save and a summary, use :class:`napari_unet.runs.TrainRun`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Generator
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import data
from .config import ModelConfig, TrainOptions
from .metrics import instance_f1
from .model import UNet
from .safeguard import (
    AGREEMENT,
    BANK_HOLD_EVERY,
    BANK_OBJECTS,
    BANK_TOLERANCE,
    FEW_OBJECTS,
    TOLERANCE,
    Guard,
    _instances,
    agreement,
    bank_score,
    blend_share,
    blend_weights,
    corrected_objects,
    fit_to_model_size,
    own_predictions,
    replay_bank,
    replay_samples,
    round_lr,
    round_plan,
    size_bias,
)
from .scale import resize_image, resize_labels, zoomed_shape
from .segmenter import _as_list, _normalizer, _now, _round_up, resolve_device
from .targets import IGNORE, compact_labels, instance_targets, semantic_targets
from .training import TrainProgress, TrainSample, train

if TYPE_CHECKING:
    from .segmenter import Segmenter

__all__ = ["finetune"]

#: measured (docs/benchmarks.md): 64x64 patches reach F1 0.9 from scratch 3x sooner
PATCH_2D, PATCH_3D = (64, 64), (16, 64, 64)
BATCH_2D, BATCH_3D = 8, 2
#: the share of its change a volume round of a trained model keeps (volumes are not guarded):
#: 12 generated volumes and the two shared ones, 30 s on the top half, bottom half scored, the
#: same trained weights blended (two runs): mean F1 0.743 / 0.760 keeping all of it, 0.769 /
#: 0.766 keeping 0.75; volumes more than 0.01 below the starter 5 / 4 against 3 / 2, the worst
#: -0.20 (the embryo, a nucleus of its 5 lost in both runs) against -0.05 (docs/benchmarks.md)
VOLUME_BLEND = 0.75
#: ... less for a round of few corrected object sections (summed over the planes), in
#: proportion below VOLUME_FEW, never under VOLUME_MIN (``safeguard.blend_share``): 15 s rounds
#: on the top half of 1 Z slice (2-12 objects) of the same 14 volumes, the same trained weights
#: blended, mean F1 0.746 / 0.779 / 0.782 / 0.735 keeping 0.1 / 0.25 / 0.5 / 0.75, the worst
#: -0.09 / -0.04 / -0.10 / -0.23 (the ovule, 0.676 -> 0.449 at 0.75); of 2 slices (3-23
#: objects) 0.734 / 0.763 / 0.797 / 0.757, 7 volumes lower at 0.75, 1 at 0.5
#: (docs/benchmarks.md)
VOLUME_FEW, VOLUME_MIN = 30, 0.25


def _volume_share(n_objects: int) -> float:
    return blend_share(n_objects, VOLUME_BLEND, VOLUME_FEW, VOLUME_MIN)

#: learning rates when none is given: a model trained before / a new one
LR_FINETUNE, LR_NEW = 1e-3, 3e-3


def finetune(
    seg, images, labels, masks, *, axes, time_limit_s, steps, lr, batch_size, patch_shape,
    val_fraction, augment, strong_augment, device, seed, num_threads, channel, names, safe,
) -> Generator[TrainProgress, None, None]:  # fmt: skip
    """The body of :meth:`Segmenter.finetune` (the parameters, their types and defaults are
    documented there); a generator of :class:`~napari_unet.training.TrainProgress`."""
    TrainOptions.checked(
        seg.ndim,
        inputs=(images, labels, masks),
        axes=axes,
        time_limit_s=time_limit_s,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        patch_shape=patch_shape,
        val_fraction=val_fraction,
        augment=augment,
        strong_augment=strong_augment,
        seed=seed,
        num_threads=num_threads,
        channel=channel,
    )
    cfg = seg.model_config
    built = _Samples(seg, cfg, safe, val_fraction, seed)
    built.add_all(images, labels, masks, axes, channel, names)
    samples, safe, guard = built.samples, built.safe, built.guard
    patch = _patch(samples, patch_shape, seg.ndim, seg.net.divisor)
    batch_size = batch_size or (BATCH_2D if seg.ndim == 2 else BATCH_3D)
    lr_given, n_corr = lr, built.n_objects
    if lr is None:
        lr = round_lr(n_corr) if safe else LR_FINETUNE if cfg.history else LR_NEW
    own: list = []
    if safe:
        own, n_corr = _replay(seg, built)
        if n_corr is None:
            yield _nothing_to_learn(steps, time_limit_s)
            return
        if lr_given is None:
            lr = round_lr(n_corr)
    plan = round_plan(n_corr) if safe else {}
    pp = cfg.postprocess.to_dict()
    before = guard.score(seg.net, pp) if guard is not None else None
    # a small round is also judged by how much it changes the uncorrected parts
    judge = own if safe and n_corr < FEW_OBJECTS else []
    held = built.bank_held if safe else []
    bank_before = bank_score(seg.net, held, pp)
    if bank_before is not None and seg.config.get("bank_reference") is None:
        seg.config["bank_reference"] = bank_before  # what every later small round must keep
    # a volume round of a trained model (not guarded) keeps a share of its change
    vblend = built.volume_round and not safe and bool(cfg.history)
    keep_old = safe or before is not None or bool(judge) or bank_before is not None or vblend
    start_state = copy.deepcopy(seg.net.state_dict()) if keep_old else None

    started = _now()
    last: TrainProgress | None = None
    gen = train(
        seg.net,
        samples,
        patch_shape=patch,
        batch_size=batch_size,
        lr=lr,
        time_limit_s=time_limit_s,
        steps=steps,
        augment=augment,
        strong_augment=strong_augment,
        seed=seed,
        device=resolve_device(device),
        num_threads=num_threads,
        validate=(lambda net, s: _validate(net, s, pp)) if val_fraction > 0 else None,
        anchor=plan.get("anchor", 0.0),
        freeze_norm=plan.get("freeze_norm", False),
        replay_share=plan.get("replay_share", 0.3),
    )

    def judged() -> str:
        """The round's checks (:func:`_blend`, :func:`_keep_better`, :func:`_kept_bank`);
        what they add to its ``reason``."""
        seg._guard_bank = guard.items
        if start_state is None:
            return ""
        # a share of the change (a quarter, less for a few objects), then judged
        blended, after = (
            _blend(seg.net, start_state, n_corr, guard, pp) if last.step else ("", None)
        )
        said = _keep_better(seg.net, guard, before, start_state, pp, judge, after)
        if "kept the previous" not in said:
            said += _kept_bank(seg.net, held, seg.config.get("bank_reference"), start_state, pp)
        return said if "kept the previous" in said else blended + said

    try:
        for last in gen:
            if last.done:
                # the training's thread limit (1 thread in the Train widget) ends with it: the
                # checks below use the cores the process has, as after a Stop
                gen.close()
            if last.done and guard is not None:
                last.reason += judged()
            elif last.done and vblend and last.step:
                last.reason += blend_weights(seg.net, start_state, _volume_share(n_corr))
            yield last
    finally:
        gen.close()
        if last is not None and not last.done and last.step > 0 and vblend:
            last.reason = "stopped by the user" + blend_weights(
                seg.net, start_state, _volume_share(n_corr)
            )
        if last is not None and not last.done and last.step > 0 and guard is not None:
            # stopped by the user (the generator closed at a yield): judged all the same, so
            # a Stop never keeps weights the checks would have refused
            try:
                last.reason = "stopped by the user" + judged()
            except Exception as e:  # noqa: BLE001 - a close must not raise: the old model back
                kept = "kept the previous model" if start_state is not None else "not checked"
                if start_state is not None:
                    seg.net.load_state_dict(start_state)
                last.reason = f"stopped by the user; {kept}: its checks failed ({e})"
        seg.net.eval().to("cpu")
        if last is not None:
            _record(seg.config, last, started, built.names, built.n_objects, lr, patch)
            # the size the model measures moved with its weights (unchanged when undone)
            # (an unguarded round too, on the model's bank: measured on an unseen DSB2018
            # image, 60 s on its top half, 0.680 at the drifted zoom, 0.800 re-measured)
            changed = last.step > 0 and "kept the previous" not in last.reason
            if changed and (built.bank or seg.config.get("size_bias") is not None):
                bias = size_bias(seg, built.bank or None)
                if bias is not None:
                    seg.config["size_bias"] = bias
                if built.bank and not held:  # a big round may adapt away from the bank
                    seg.config["bank_reference"] = None
            if built.volume_zooms:  # volumes are predicted at the zoom this round trained at
                seg.config["volume_zoom"] = float(np.median(built.volume_zooms))


def _replay(seg: Segmenter, built: _Samples) -> tuple[list, int | None]:
    """A safe round's replay, added to ``built.samples``: the model's own predictions on the
    uncorrected parts (else generated nuclei); returns them and the corrected objects
    (None: the corrected regions hold what the model predicts, nothing to learn)."""
    samples, guard, n_corr = built.samples, built.guard, built.n_objects
    # measured: generated replay lowered F1 after small rounds (0.981 -> 0.970), the
    # model's own predictions on the user's image do not; generated only without them
    own = own_predictions(seg, samples)
    if all(getattr(s, "trusted", None) is not None for s in samples):
        # corrections (masks): what the user changed, not what the regions hold, counted on
        # every image, also on one corrected all over (see corrected_objects)
        n_corr = corrected_objects(seg, samples)
        if n_corr == 0:
            return own, None
    # measured on real images: replaying only the user's images (their uncorrected parts)
    # lets a round of a few objects forget the other kinds of images the model knew; the
    # crops of its own training data (when it ships with them) keep those
    bank = replay_bank(seg)
    held = bank[::BANK_HOLD_EVERY]
    if n_corr is None or n_corr >= BANK_OBJECTS:
        held = []  # many corrections may mean other images: it may adapt away from the bank
    built.bank_held, built.bank = held, bank
    if held:
        bank = [b for i, b in enumerate(bank) if i % BANK_HOLD_EVERY]
    samples += own + bank if own or bank else replay_samples(seg)
    guard.items = getattr(seg, "_guard_bank", []) + guard.items
    return own, n_corr


def _nothing_to_learn(steps: int | None, time_limit_s: float | None) -> TrainProgress:
    """The one event of a safe round whose corrected regions equal the prediction: training
    on them can only move the model elsewhere (measured: -0.012 F1 on other images)."""
    return TrainProgress(
        step=0,
        epoch=0.0,
        loss=float("nan"),
        seconds=0.0,
        lr=0.0,
        patches_per_s=0.0,
        done=True,
        total_steps=steps,
        time_limit_s=time_limit_s,
        reason="kept the previous model: nothing in the corrected regions "
        "differs from its prediction, so there is nothing to learn",
    )


def _patch(samples, patch_shape, nd: int, div: int) -> tuple[int, ...]:
    """The patch: the given (or default) shape, no larger than the largest sample needs."""
    max_sp = np.max([s.target.shape for s in samples], axis=0)
    if patch_shape is None:
        patch_shape = PATCH_2D if nd == 2 else PATCH_3D
    return tuple(
        int(min(p, _round_up(int(m), div))) for p, m in zip(patch_shape, max_sp, strict=True)
    )


class _Samples:
    """The training samples of a round, built image by image (normalised, as targets).

    ``safe`` says whether the round is a safe one (see :mod:`napari_unet.safeguard`); ``guard``
    holds the corrected objects kept out of training to judge it.
    """

    def __init__(self, seg: Segmenter, cfg: ModelConfig, safe, val_fraction: float, seed):
        self.seg, self.cfg, self.val_fraction = seg, cfg, val_fraction
        self.auto_safe = safe is None
        if safe is None:
            safe = bool(cfg.history) and seg.ndim == 2 and seg.task == "instance"
        self.safe = bool(safe)
        self.guard = Guard() if safe else None
        self.rng = np.random.default_rng(seed)
        self.samples: list[TrainSample] = []
        self.n_objects = 0
        self.names: list[str] = []
        self.zoom: float | None = None  # one zoom for all planes of the current volume
        self.volume_zooms: list[float] = []
        self.volume_round = False  # a 2D model's round on volumes, safe left to its default
        self.bank_held: list = []  # replay-bank crops kept out of the round to judge it
        self.bank: list = []  # all of the model's replay-bank crops

    def add_all(self, images, labels, masks, axes, channel, names) -> None:
        imgs, labs = _as_list(images), _as_list(labels)
        msks = _as_list(masks) if masks is not None else [None] * len(imgs)
        if not imgs:
            raise ValueError("no training images given")
        if len(imgs) != len(labs) or len(msks) != len(imgs):
            raise ValueError(
                f"got {len(imgs)} image(s), {len(labs)} label image(s) and {len(msks)} mask(s); "
                "give one labels (and mask) per image"
            )
        self.names = list(names) if names is not None else [f"image {i}" for i in range(len(imgs))]
        for i, (img, lab, msk) in enumerate(zip(imgs, labs, msks, strict=True)):
            self.add(i, img, lab, msk, axes, channel)
        if self.n_objects == 0 and all(m is None for m in msks):
            raise ValueError(
                "the labels are empty: paint at least one object (or give a mask marking a "
                "region that really has no objects) before training"
            )
        if not self.samples:
            raise ValueError("no annotated pixel in the training data: nothing to learn from")

    def add(self, i: int, img, lab, msk, axes, channel) -> None:
        """Image ``i``: checked against its labels and mask, one sample per plane (2D) or
        frame (3D)."""
        seg = self.seg
        canon, ax, lo, hi = seg._prepare(np.asarray(img), axes, channel, name=f"image {i}")
        lab = np.asarray(lab)
        spatial = tuple(s for a, s in zip(ax, np.shape(img), strict=True) if a != "C")
        if lab.shape != spatial:
            raise ValueError(
                f"image {i} has spatial shape {spatial} (axes {ax!r}) but its labels have "
                f"shape {lab.shape}; they must match pixel for pixel"
            )
        if seg.task == "instance":  # huge ids (2**40 ...) numbered 1..N; class ids stay
            lab = compact_labels(lab)
        keep = "".join(a for a in ax if a != "C")
        lab_c = data.to_canonical(lab, keep, "TZYX")
        msk_c = None if msk is None else _canonical_mask(i, np.asarray(msk), spatial, keep)
        img_n = _normalizer(lo, hi, channel_axis=2, ndim=5)(canon)
        T, Z = lab_c.shape[:2]
        self.zoom = None
        if Z > 1 and seg.ndim == 2 and seg.task == "instance" and self.cfg.diameter:
            # one zoom for every plane of a volume, the one predict picks for it (its decision on
            # the middle plane), remembered for predict: fitted plane by plane, the caps of nuclei
            # were enlarged as if small and the model learnt a size predict never showed it
            # (a later round keeps the first one's zoom: the model's own estimate moves with it)
            self.zoom = self.cfg.volume_zoom
            if self.zoom is None:
                self.zoom, _ = seg._zoom_for(np.asarray(canon[0, Z // 2]), "CYX", volume=True)
            self.volume_zooms.append(self.zoom)
        elif Z == 1 and seg.ndim == 2 and seg.task == "instance" and self.cfg.diameter:
            # a 2D image trains at the zoom predict picks for it, from the model's own estimate
            # of the object size: fitted by the labels' size instead, blurred nuclei (measured
            # larger by the model) were trained at one size and predicted at another, and the
            # round did not help (F1 0.666 -> 0.655 on held-out images; see test_real_2d)
            self.zoom = self._predict_zoom(canon[T // 2, 0])
        if Z > 1 and self.auto_safe:
            # volumes are assembled in 3D: a per-slice guard misjudges them (measured: it
            # kept the old model, 0.44 3D F1, where the round reached 0.72)
            self.safe, self.guard = False, None
            self.volume_round = seg.ndim == 2  # blended instead (_volume_share)
        for x, y, m in _planes(img_n, lab_c, msk_c, seg.ndim):
            if m is None or m.any():
                self._sample(x, y, m, self.names[i])

    def _predict_zoom(self, plane: np.ndarray) -> float | None:
        """The zoom predict picks for a 2D plane ``(C, Y, X)``; None when the model finds no
        object there to measure (the labels' size decides then)."""
        zoom, diameter = self.seg._zoom_for(np.asarray(plane), "CYX")
        return zoom if diameter else None

    def _sample(self, x, y, m, name: str) -> None:
        seg = self.seg
        if self.zoom is not None:
            if self.zoom != 1.0:
                shape = zoomed_shape(y.shape, self.zoom)
                x, y = resize_image(x, shape), resize_labels(y, shape)
                m = None if m is None else resize_labels(m, shape)
        elif seg.ndim == 2 and seg.task == "instance":
            x, y, m = fit_to_model_size(x, y, m, self.cfg.diameter)
        yy = y if m is None else np.where(m, y, 0)
        self.n_objects += len(np.unique(yy)) - (1 if (yy == 0).any() else 0)
        if seg.task == "instance":
            tgt = instance_targets(y, m)
        else:
            tgt = semantic_targets(y, seg.net.out_channels, m)
        s = TrainSample(np.ascontiguousarray(x, np.float32), tgt, name=name)
        if self.safe and m is not None:
            s.labels, s.trusted = y, m  # to count what the user changed
        if self.val_fraction > 0 and seg.task == "instance":
            _hold_out(s, y, m, self.val_fraction, seg.net.divisor)
        if self.guard is not None:
            self.guard.hold_out(s, y, m, self.rng)
        self.samples.append(s)


def _canonical_mask(i: int, msk: np.ndarray, spatial: tuple, keep: str) -> np.ndarray:
    if msk.shape != spatial:
        raise ValueError(
            f"mask {i} has shape {msk.shape} but image {i} has spatial shape {spatial}"
        )
    if msk.dtype.kind not in "biuf":
        raise ValueError(f"mask {i} has dtype {msk.dtype}; a mask is bool (True = corrected)")
    if msk.dtype.kind == "f" and not np.isfinite(msk).all():
        raise ValueError(
            f"mask {i} holds NaN or infinite values; a mask is bool (True = corrected)"
        )
    out = data.to_canonical(msk.astype(bool), keep, "TZYX")
    if not out.any():
        raise ValueError(f"mask {i} selects no pixel: nothing to learn from")
    return out


def _planes(img_n: np.ndarray, lab_c: np.ndarray, msk_c, nd: int):
    """``(image (C, *S), labels (*S), mask or None)`` per 2D plane or 3D frame of canonical
    ``img_n (T, Z, C, Y, X)`` and ``lab_c (T, Z, Y, X)``."""
    T, Z = lab_c.shape[:2]
    if nd == 2:
        for t in range(T):
            for z in range(Z):
                yield img_n[t, z], lab_c[t, z], msk_c[t, z] if msk_c is not None else None
    else:
        for t in range(T):
            m = msk_c[t] if msk_c is not None else None
            yield img_n[t].transpose(1, 0, 2, 3), lab_c[t], m


#: a round keeps all of its change when that scores this much better (mean IoU) on its held-out
#: corrected objects than the blend: measured, 0.062 better on a blurry domain the starter did
#: not know (22 objects), 0.020-0.025 on an unseen DSB2018 half where the whole change then cost
#: its other half 0.03-0.06 (``docs/benchmarks.md``)
WHOLE_MARGIN = 0.03


def _blend(
    net: UNet, start_state: dict, n_corr: int, guard: Guard, pp: dict
) -> tuple[str, float | None]:
    """A safe round keeps a share of its change (:func:`~napari_unet.safeguard.blend_share`),
    or all of it when that scores clearly better (by more than :data:`WHOLE_MARGIN`) on the
    corrected objects it did not train on. Returns what to add to the round's ``reason`` and
    the guard's score of the weights it leaves (None when it did not score them), so that
    :func:`_keep_better` does not predict the held-out objects a third time (a Stop in the
    Train widget took 1.8-2.8 s, mostly these predictions).

    Measured: 3 unseen DSB2018 images fully annotated, 4 others scored (pooled F1 0.856
    untrained): 15 s / 60 s rounds 0.784 / 0.778 with all of the change, 0.862 / 0.867 with a
    quarter, and their 56 held-out objects said so (0.786 / 0.803 against 0.810 / 0.809). On
    blurrier, denser generated nuclei than the starter knew, a quarter of a 30-step round kept
    0.794 -> 0.803 of a gain to 0.900 (``tests/test_starter.py``).
    """
    share = blend_share(n_corr)
    if share >= 1.0:
        return "", None
    own = copy.deepcopy(net.state_dict()) if len(guard) else None
    said = blend_weights(net, start_state, share)
    if own is None:
        return said, None
    mixed = guard.score(net, pp)
    blended = copy.deepcopy(net.state_dict())
    net.load_state_dict(own)
    whole = guard.score(net, pp)
    if whole is not None and mixed is not None and whole > mixed + WHOLE_MARGIN:
        return (
            f"; kept all of the change: on {len(guard)} corrected object(s) it did not train "
            f"on it scored {whole:.3f}, {share:.0%} of it {mixed:.3f}"
        ), whole
    net.load_state_dict(blended)
    return said, mixed


def _keep_better(
    net: UNet, guard: Guard, before, start_state: dict, pp: dict, judge, after=None
) -> str:
    """After a safe round: the old weights back if the new ones score lower on the
    held-out corrected objects (``after``: their score when :func:`_blend` measured it), or
    if a small round changed much of the prediction where nothing was corrected. Returns
    what to add to the round's ``reason``."""
    said = ""
    if before is not None:
        what = f"{len(guard)} corrected object(s) it did not train on"
        score = after if after is not None else guard.score(net, pp)
        said = _judged(net, what, before, score, start_state)
        if "kept the previous" in said:
            return said
    same = agreement(net, judge, pp) if judge else None
    if same is not None and same < AGREEMENT:
        net.load_state_dict(start_state)
        return (
            f"; kept the previous model: a round of few corrected objects changed "
            f"{1 - same:.0%} of the objects where nothing was corrected"
        )
    if same is not None:
        said += f"; {same:.0%} of the objects where nothing was corrected unchanged"
    return said


def _kept_bank(net: UNet, held: list, reference, start_state: dict, pp: dict) -> str:
    """After a small safe round: the old weights back if the new ones forgot the images the
    model learned from: scored lower on the replay-bank crops kept out of the round than the
    model did before its first small round (``reference``, ``config["bank_reference"]``).

    Against that first score, within :data:`~napari_unet.safeguard.BANK_TOLERANCE` (the round
    blended first), and not against the previous round's: measured on DSB2018
    (``docs/benchmarks.md``), with a tolerance of 0.01 against the previous round, rounds that
    each lost a little on the bank (0.921 -> 0.914 -> 0.908 ...) were all let through and the
    scoring images fell 0.020 after one of them and 0.039 after four.
    """
    if reference is None:
        return ""
    what = f"{len(held)} crops of the images it was trained on"
    return _judged(
        net, what, reference, bank_score(net, held, pp), start_state, " (forgetting them)",
        tolerance=BANK_TOLERANCE, earlier="the model before its small rounds",
    )  # fmt: skip


def _judged(
    net: UNet, what: str, before: float, after, start_state: dict, why: str = "", *,
    tolerance: float = TOLERANCE, earlier: str = "the previous one",
) -> str:  # fmt: skip
    """The old weights back when ``after`` is below ``before`` (the score of ``earlier``) by
    more than ``tolerance``; returns what to add to the round's ``reason``."""
    if after is not None and after < before - tolerance:
        net.load_state_dict(start_state)
        return (
            f"; kept the previous model: on {what} the new one scored {after:.3f}, "
            f"{earlier} {before:.3f}{why}"
        )
    return f"; on {what} it scores {after:.3f} (was {before:.3f})" if after is not None else ""


def _validate(net: UNet, sample: TrainSample, pp: dict) -> float:
    """Instance F1 at IoU 0.5 of ``net`` on the sample's held-out band."""
    net.eval()
    with torch.inference_mode():
        x = torch.from_numpy(sample.val_image[None]).to(next(net.parameters()).device)
        prob = net(x).float().softmax(1)[0].cpu().numpy()
    return instance_f1(_instances(prob, pp), sample.val_labels, iou_threshold=0.5)


def _record(config: dict, p: TrainProgress, started: str, names, n_objects, lr, patch) -> None:
    """Append the round to the model's history (the stored config, a plain dict)."""
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
    config.setdefault("history", []).append(entry)
    seen = config.setdefault("trained_on", [])
    for n in names:
        if n not in seen:
            seen.append(n)
    # the scores describe this model, not the one it was fine-tuned from
    config["val_score"] = p.val_f1
    config.pop("model_card", None)


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
