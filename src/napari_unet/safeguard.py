"""Fine-tuning that never makes a model worse: object size, replay, and a guard.

A correction round may bring one nucleus. Trained on it alone, a network forgets what it knew
and the next prediction is worse than the one the user corrected. :meth:`Segmenter.finetune`
therefore, when it fine-tunes a model that was trained before:

* resizes the user's image so that its objects have the size the model was trained at
  (:func:`fit_to_model_size`), as prediction does;
* mixes in the model's own predictions on the parts of the user's images that were not
  corrected (:func:`own_predictions`), or generated nuclei like those the starter learned
  from when the whole image was corrected (:func:`replay_samples`);
* pulls the weights toward where the round started and keeps the normalisation statistics
  (``training.train(anchor=..., freeze_norm=True)``), with a learning rate that grows with
  the number of corrected objects (:func:`round_lr`);
* holds out some corrected objects from training (:class:`Guard`), scores the model before
  and after the round on them and on the objects held out in earlier rounds, and keeps the
  old weights when the new ones score lower;
* judges a round of a few objects also by what it changed where nothing was corrected
  (:func:`agreement`), and keeps the old weights when it changed much;
* keeps a quarter of what the round changed: the new weights are averaged with the round's
  starting ones (:func:`blend_weights`), which on unseen real images scored better than either
  (measured in ``docs/benchmarks.md``);
* replays crops of the images the model was trained on (:func:`replay_bank`, shipped with the
  starter), keeps one in four out of a round of under 30 objects and undoes the round when
  the new weights score lower on them (:func:`bank_score`): it was forgetting them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from .postprocess import instances_from_probabilities
from .scale import diameter_of_labels, rescale_factor, resize_image, resize_labels, zoomed_shape
from .targets import IGNORE

__all__ = [
    "fit_to_model_size",
    "replay_samples",
    "own_predictions",
    "corrected_objects",
    "replay_bank",
    "bank_score",
    "size_bias",
    "round_plan",
    "round_lr",
    "blend_weights",
    "blend_share",
    "Guard",
    "ANCHOR",
]

#: strength of the pull toward the round's starting weights (see ``training.train``)
ANCHOR = 100.0
#: the guard keeps the old model when the new one scores this much lower
TOLERANCE = 0.01
#: rounds of fewer corrected objects than this are also judged by what they change elsewhere
FEW_OBJECTS = 10
#: ... and the old model is kept when less than this share of the other objects stays the same
AGREEMENT = 0.95


def fit_to_model_size(x: np.ndarray, y: np.ndarray, m: np.ndarray | None, model_d: float | None):
    """Resize one 2D training plane (image ``(C, Y, X)``, labels, mask) to the model's object
    size when its labelled objects lie outside the trained range; unchanged otherwise."""
    f = rescale_factor(diameter_of_labels(y, m), model_d)
    if f == 1.0:
        return x, y, m
    shape = zoomed_shape(y.shape, f)
    x2 = resize_image(x, shape)
    y2 = resize_labels(y, shape)
    m2 = None if m is None else resize_labels(m, shape)
    return x2, y2, m2


def round_plan(n_objects: int) -> dict:
    """How hard a correction round holds on to the old model, from how much was corrected.

    A few objects say little about the rest of the image: strong pull toward the old weights,
    half the patches from the model's own predictions, normalisation statistics frozen. Many
    objects may say the images differ from what the model knew (another microscope): it
    adapts more freely.
    """
    few = float(np.clip(5.0 / max(n_objects, 1), 0.0, 1.0))  # 1 for <= 5 objects
    return {
        "anchor": ANCHOR * few,
        "replay_share": float(np.clip(0.5 * few, 0.1, 0.5)),
        "freeze_norm": n_objects < 10,
    }


#: learning rate of a correction round of 30 objects or more. Measured on the shared DSB2018
#: images (60 s on the 6 fully annotated training images, the last 7 scored): 1e-3 lowered the
#: held-out corrected objects 0.846 -> 0.822 (the guard kept the old model, +0.000), 3e-4 kept
#: them at 0.846 and raised the scored images 0.890 -> 0.900, 1e-4 0.896
LR_ROUND = 3e-4


def round_lr(n_objects: int, base: float = LR_ROUND) -> float:
    """Learning rate of a correction round: smaller for a few objects (less to go on)."""
    return base * float(np.clip(math.sqrt(max(n_objects, 1) / 30.0), 0.25, 1.0))


#: share of a safe round's change of the weights that is kept (:func:`blend_weights`).
#: Measured on six DSB2018 images the starter never saw (the top half of each corrected, the
#: bottom halves scored, ``benchmarks/real_halves.py``' protocol; pooled F1, untrained 0.888):
#: the round's own weights 0.870-0.896 in 6 runs of 15 s and 60 s, half of the change
#: 0.884-0.918 (one image fell 0.882 -> 0.848 in 4 of 5), a quarter 0.897-0.906 in 5 runs
BLEND = 0.25


def blend_share(
    n_objects: int, full: float = BLEND, few: int = FEW_OBJECTS, least: float = 0.0
) -> float:
    """The share of a round's change it keeps: ``full`` (:data:`BLEND`), less for a round of
    under ``few`` (:data:`FEW_OBJECTS`) corrected objects, in proportion (one object of ten
    keeps a tenth of it), never under ``least``. Volume rounds pass their own numbers
    (``finetune.VOLUME_BLEND``, ``VOLUME_FEW``, ``VOLUME_MIN``).

    Measured on the 6 DSB2018 halves: at a quarter for every round, rounds of 0-2 corrected
    objects (by the benchmark's count) were let through and cost one image 0.034 and another
    one of its 12 nuclei (``docs/benchmarks.md``).
    """
    return max(least, full * min(1.0, max(int(n_objects), 1) / few))


def blend_weights(net, start_state: dict, share: float = BLEND) -> str:
    """Keep ``share`` of what a round changed: every floating-point weight and statistic of
    ``net`` becomes ``start + share * (new - start)``, in place; returns what to add to the
    round's ``reason``.

    Averaging fine-tuned weights with the ones fine-tuning started from keeps what the model
    knew of other images while keeping much of what it learned (weight-space ensembling:
    Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022); see :data:`BLEND`.
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share}")
    if share == 1.0:
        return ""
    with torch.no_grad():
        for key, value in net.state_dict().items():  # the net's own tensors
            if value.is_floating_point():
                old = start_state[key].to(value.device)
                value.copy_(old + share * (value - old))
    return f"; kept {share:.0%} of the change: the new weights averaged with the previous ones"


def replay_samples(seg, n: int = 2, size: int = 160, seed: int = 12345):
    """Generated nuclei at the model's object size, normalised as the model sees images.

    Returns a list of :class:`~napari_unet.training.TrainSample` marked ``replay``.
    """
    from .segmenter import _normalizer
    from .synthetic import make_realistic_nuclei, random_style
    from .targets import instance_targets
    from .training import TrainSample

    d = float(seg.config.get("diameter") or 16.0)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        r0 = d / 1.8
        img, lab = make_realistic_nuclei(
            (size, size), radius=(0.85 * r0, 1.15 * r0), seed=seed + i, **random_style(rng)
        )
        canon, _, lo, hi = seg._prepare(img, "YX", None)
        x = _normalizer(lo, hi, channel_axis=2, ndim=5)(canon)[0, 0]
        out.append(
            TrainSample(
                np.ascontiguousarray(x, np.float32), instance_targets(lab), name="", replay=True
            )
        )
    return out


#: rounds of fewer corrected objects than this are undone when they forget the replay bank
#: (score lower by more than TOLERANCE on its crops kept out of the round)
BANK_OBJECTS = 30
#: one bank crop in this many is kept out of training to judge the round
BANK_HOLD_EVERY = 4
#: a small round is undone when it scores lower than this below the bank score of the model
#: before its first small round (``config["bank_reference"]``; see finetune._kept_bank).
#: Kept at 0 with the rounds blended (:data:`BLEND`): at 0.02, blended rounds were let through
#: on unseen images (6 DSB2018 halves: pooled 0.888 -> 0.904 / 0.898 after 15 s / 60 s), but
#: ten annotator rounds on the starter's own training images then drifted the scoring images
#: 0.901 -> 0.873 (rounds of 1-13 objects, each a little; ``docs/benchmarks.md``)
BANK_TOLERANCE = 0.0
#: the shipped replay banks: crops of the data a shipped model learned from
BANKS = ("nuclei",)


def replay_bank(seg) -> list:
    """Crops of the real and generated images the model learned from, ready to train on.

    A shipped model comes with a bank of crops of its training data
    (``models/<name>/replay.npz``, built by ``scripts/make_replay_bank.py``). A model uses a
    bank when it learned from the bank's data (the bank's sources are in its ``trained_on``:
    the starter and every model fine-tuned from it) and normalises images as the bank was
    normalised. Mixed into a correction round, they keep it from forgetting the other kinds of
    images it knew while it learns the user's corrections (measured in ``docs/benchmarks.md``).
    Returns a list of :class:`~napari_unet.training.TrainSample` marked ``replay``, or ``[]``.
    """
    from importlib import resources

    from .targets import instance_targets
    from .training import TrainSample

    cfg = seg.config
    arch = seg.model_config.architecture
    if seg.ndim != 2 or cfg.get("task") != "instance" or arch.in_channels != 1:
        return []
    seen = set(cfg.get("trained_on") or [])
    norm = cfg.get("normalization") or {}
    for name in BANKS:
        path = resources.files("napari_unet") / "models" / name / "replay.npz"
        if not path.is_file():
            continue
        with path.open("rb") as f, np.load(f, allow_pickle=False) as bank:
            sources = [str(x) for x in bank["sources"]]
            method, low, high = (str(x) for x in bank["normalization"])
            same_norm = norm.get("method") == method and (
                math.isclose(float(norm.get("low", -1)), float(low))
                and math.isclose(float(norm.get("high", -1)), float(high))
            )
            if not same_norm or not any(src in seen for src in sources):
                continue
            out = []
            for x, lab in zip(bank["images"], bank["labels"], strict=True):
                lab = lab.astype(np.int32)
                s = TrainSample(
                    np.ascontiguousarray(x[None], np.float32),
                    instance_targets(lab),
                    name="",
                    replay=True,
                )
                s.truth = lab  # for bank_score
                out.append(s)
            return out
    return []


def bank_score(net, held: list, postprocess: dict) -> float | None:
    """Pooled F1 at IoU 0.5 of ``net`` on replay-bank crops kept out of a round's training
    (:func:`replay_bank` samples): what the model still knows of the images it learned from."""
    if not held:
        return None
    return _pooled_f1(net, [(s.image, s.truth, None) for s in held], postprocess)


def size_bias(seg, bank: list | None = None) -> float | None:
    """How much larger than their labels the model measures objects: the median, over the
    crops of its replay bank, of the size :func:`~napari_unet.scale.diameter_of_foreground`
    finds in its foreground over the labels' diameter. None without a bank.

    The object size predict estimates follows the model's foreground: measured on the
    starter's bank, 1.14 on the real crops and 1.27 on the generated ones (1.18 in all), and a
    round on a few big nuclei made the foreground fatter still, so later predictions were
    zoomed less and lost F1 (see ``docs/benchmarks.md``). Dividing the estimate by this
    factor, re-measured after every round, keeps the zoom where the truth would put it.
    """
    from .scale import diameter_of_foreground, diameter_of_labels

    bank = replay_bank(seg) if bank is None else bank
    if not bank:
        return None
    predict = seg._predictor(torch.device("cpu"))
    ratios = []
    for i in range(0, len(bank), 8):  # batches of 8 crops: 13 % faster than one by one
        chunk = bank[i : i + 8]
        probs = predict(np.ascontiguousarray(np.stack([s.image for s in chunk]), np.float32))
        for s, prob in zip(chunk, probs, strict=True):
            est, true = diameter_of_foreground(prob[0] < 0.5), diameter_of_labels(s.truth)
            if est and true:
                ratios.append(est / true)
    return float(np.clip(np.median(ratios), 0.5, 2.0)) if ratios else None


def _pooled_f1(net, items, postprocess: dict) -> float | None:
    """F1 at IoU 0.5, objects pooled, of ``net``'s instances on ``(image, reference, keep)``
    items (``keep``: the pixels compared, or None for all); None when there is no object."""
    from .metrics import match_instances

    tp = fp = fn = 0
    probs = _probabilities(net, [image for image, _, _ in items])
    for (_, ref, keep), prob in zip(items, probs, strict=True):
        got = _instances(prob, postprocess)
        if keep is not None:
            got, ref = np.where(keep, got, 0), np.where(keep, ref, 0)
        m = match_instances(got, ref, iou_threshold=0.5)
        tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
    return 2 * tp / max(2 * tp + fp + fn, 1) if tp + fp + fn else None


#: pixels (voxels) of one batch of :func:`_probabilities`
BATCH_PIXELS = 1 << 18


def _probabilities(net, images: list) -> list[np.ndarray]:
    """``net``'s softmax probabilities on each ``(C, *spatial)`` image, in eval mode, as
    ``net(image)`` gives them one by one. Each image is padded as the network pads it
    (``UNet._pad``) and those of the same padded shape go through it together, at most
    :data:`BATCH_PIXELS` per batch: the 104 objects held out of a fully corrected 512x512
    image fall into 13 shapes, and one judgement took 0.40-0.47 s one by one, 0.26-0.31 s
    batched (the probabilities within 3e-6)."""
    was_training = net.training
    net.eval()
    dev = next(net.parameters()).device
    pad = getattr(net, "_pad", None)
    out: list = [None] * len(images)
    groups: dict[tuple, list] = {}
    try:
        with torch.inference_mode():
            for i, image in enumerate(images):
                x = torch.from_numpy(np.ascontiguousarray(image, np.float32)[None])
                x, spatial = pad(x) if pad is not None else (x, tuple(x.shape[2:]))
                groups.setdefault(tuple(x.shape), []).append((i, x, spatial))
            for shape, members in groups.items():
                per = max(1, BATCH_PIXELS // max(1, math.prod(shape[2:])))
                for j in range(0, len(members), per):
                    chunk = members[j : j + per]
                    x = torch.cat([m[1] for m in chunk]).to(dev)
                    prob = net(x).float().softmax(1).cpu().numpy()
                    for (i, _, spatial), p in zip(chunk, prob, strict=True):
                        cut = tuple(
                            slice((n - s) // 2, (n - s) // 2 + s)
                            for n, s in zip(p.shape[1:], spatial, strict=True)
                        )
                        out[i] = np.ascontiguousarray(p[(slice(None), *cut)])
    finally:
        net.train(was_training)
    return out


def own_predictions(seg, samples, confidence: float = 0.0, max_pixels: int = 1024 * 1024):
    """What the model predicts now on the parts of the user's images that were not corrected.

    For each partly corrected sample (some pixels ``IGNORE``), a replay sample whose target is
    the model's own class (argmax; with ``confidence``, only where its probability is above
    it: measured, a threshold of 0.9 drops boundaries and costs more F1) outside the corrected
    pixels: the round then keeps what the model already did right on the user's own images
    ("learning without forgetting"), and changes what the corrections ask for.
    """
    from .training import TrainSample

    out = []
    predict = seg._predictor(torch.device("cpu"))
    # the model's own post-processing: agreement() compares the objects after the round, made
    # with it, to these (with the defaults instead, the unchanged starter agreed 0.93-0.97 with
    # itself on corrected regions of the DSB2018 training images, not 1.0: below AGREEMENT)
    pp = _pp(seg)
    for s in samples:
        ignored = s.target == IGNORE
        if not ignored.any() or s.target.size > max_pixels or s.image.ndim != 3:
            continue
        prob = predict(np.ascontiguousarray(s.image[None], np.float32))[0]
        # what corrected_objects compares the corrections with (also when nothing is replayed)
        s.before = _instances(prob, pp)
        target = np.argmax(prob, axis=0).astype(np.int64)
        target[(prob.max(axis=0) < confidence) | ~ignored] = IGNORE
        held = getattr(s, "held", None)
        if held is not None:
            target[held] = IGNORE
        # objects cut by the corrected region's border: their pseudo-labels are unreliable there
        target[ndimage.binary_dilation(~ignored, iterations=4)] = IGNORE
        if (target != IGNORE).any():
            r = TrainSample(s.image, target, name="", replay=True)
            r.before = s.before  # what the model predicted there before the round
            r.untouched = ignored if held is None else ignored & ~held
            out.append(r)
    return out


def corrected_objects(seg, samples, max_pixels: int = 1024 * 1024) -> int:
    """Objects the user changed in the corrected (trusted) pixels of the samples of a round:
    the model's objects there they erased or redrew, plus the ones they added.

    Counted on every sample with corrected pixels, also on an image corrected all over (it has
    no uncorrected part for :func:`own_predictions` to replay): before, the objects of such an
    image all counted as corrected, so the simulated annotator's round 9 on DSB2018 (two
    training images corrected all over, 7 objects changed) counted 43, was judged as a big
    round without the replay-bank guard, and lowered F1 on the scoring images by 0.020
    (``docs/benchmarks.md``). A sample too big to predict here counts all its objects.
    """
    predict = None
    n = 0
    for s in samples:
        labels, trusted = getattr(s, "labels", None), getattr(s, "trusted", None)
        if labels is None or trusted is None:
            continue
        before = getattr(s, "before", None)
        if before is None and (s.target.size > max_pixels or s.image.ndim != 3):
            ids = np.unique(labels[trusted])
            n += int((ids > 0).sum())
            continue
        if before is None:
            predict = predict or seg._predictor(torch.device("cpu"))
            prob = predict(np.ascontiguousarray(s.image[None], np.float32))[0]
            before = s.before = _instances(prob, _pp(seg))
        n += _changed(before, s)
    return n


def _changed(before: np.ndarray, sample) -> int:
    """Objects the user changed in the trusted pixels of ``sample``: the model's objects there
    they erased or redrew, plus the objects they added (matched at IoU 0.5)."""
    from .metrics import match_instances

    labels, trusted = getattr(sample, "labels", None), getattr(sample, "trusted", None)
    if labels is None or trusted is None:
        return 0
    m = match_instances(np.where(trusted, before, 0), np.where(trusted, labels, 0))
    return int(m.fp + m.fn)


def _pp(seg) -> dict:
    return seg.model_config.postprocess.to_dict()


def _instances(prob: np.ndarray, postprocess: dict) -> np.ndarray:
    return instances_from_probabilities(
        prob,
        seed_threshold=postprocess.get("seed_threshold", 0.5),
        foreground_threshold=postprocess.get("foreground_threshold", 0.5),
        min_size=postprocess.get("min_size"),
    )


def agreement(net, replays, postprocess: dict) -> float | None:
    """How much of the model's prediction on the uncorrected parts of the user's images a round
    left as it was: F1 at IoU 0.5 between the objects before and after, there (1 = unchanged).

    A round of a few corrected objects has no held-out objects to judge it by; it may still
    change the prediction everywhere else, which nothing the user did asked for.
    """
    items = [r for r in replays if getattr(r, "before", None) is not None]
    if not items:
        return None
    return _pooled_f1(net, [(r.image, r.before, r.untouched) for r in items], postprocess)


@dataclass
class _Item:
    image: np.ndarray  # (C, h, w) normalised crop
    truth: np.ndarray  # (h, w) labels of the held-out objects (0 elsewhere)


@dataclass
class Guard:
    """Corrected objects held out from training, and the score of a model on them.

    ``hold_out`` takes about one object in five (at least 4 corrected objects are needed) out
    of a training sample: their pixels and a ring around them are ignored by the loss, and a
    crop around each is kept. ``score`` is the mean, over the held-out objects, of the best
    intersection-over-union of a predicted object (0 = missed, 1 = perfect).
    """

    items: list[_Item] = field(default_factory=list)
    fraction: float = 0.2
    min_objects: int = 4
    margin: int = 12

    def hold_out(self, sample, labels: np.ndarray, mask: np.ndarray | None, rng) -> None:
        lab = np.asarray(labels)
        trusted = lab if mask is None else np.where(mask, lab, 0)
        ids = np.unique(trusted)
        ids = ids[ids > 0]
        if mask is not None:  # only objects that lie wholly inside the mask
            outside = np.unique(lab[~mask])
            ids = ids[~np.isin(ids, outside)]
        if ids.size < self.min_objects:
            return
        k = max(1, int(round(self.fraction * ids.size)))
        chosen = rng.choice(ids, size=k, replace=False)
        held = np.isin(lab, chosen)
        ring = ndimage.binary_dilation(held, iterations=2)
        sample.target = sample.target.copy()
        sample.target[ring] = IGNORE
        sample.held = ring  # never replayed either (see own_predictions)
        objs = ndimage.find_objects(np.where(held, lab, 0).astype(np.int64))
        for i in chosen:
            sl = objs[int(i) - 1] if int(i) - 1 < len(objs) else None
            if sl is None:
                continue
            box = tuple(
                slice(max(0, s.start - self.margin), min(n, s.stop + self.margin))
                for s, n in zip(sl, lab.shape, strict=True)
            )
            truth = np.where(lab[box] == i, 1, 0).astype(np.int32)
            self.items.append(_Item(np.ascontiguousarray(sample.image[(slice(None), *box)]), truth))

    def __len__(self) -> int:
        return len(self.items)

    def score(self, net, postprocess: dict) -> float | None:
        """Mean best IoU of the held-out objects under ``net`` (None without items)."""
        if not self.items:
            return None
        ious = []
        probs = _probabilities(net, [it.image for it in self.items])
        for it, prob in zip(self.items, probs, strict=True):
            pred = _instances(prob, postprocess)
            t = it.truth > 0
            hit = pred[t]
            best = 0.0
            for j in np.unique(hit[hit > 0]):
                p = pred == j
                best = max(best, float((p & t).sum() / (p | t).sum()))
            ious.append(best)
        return float(np.mean(ious))
