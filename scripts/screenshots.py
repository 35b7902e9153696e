"""User-guide screenshots: napari with the napari-unet widgets, one step of the workflow each.

Usage (needs a display; on a server use a virtual one)::

    xvfb-run -a -s "-screen 0 1366x768x24" python scripts/screenshots.py
    python scripts/screenshots.py --out /tmp/shots     # somewhere else than docs/images

Writes ``guide_1_open.png`` ... ``guide_7_uncertainty.png``, from the window that
``python -m napari_unet`` opens (``_launch.prepare``: the real DSB2018 sample, the widgets as
tabs, the window fitted to the screen; on a 1366x768 screen, as a laptop has):

1. the ``nuclei_real`` sample (a real fluorescence image, CC0) and the widgets (Predict in front);
2. after **Predict** with the starter model: the ``dsb2018 [unet]`` labels over the image;
3. a correction, done as a user would: inside one square the wrong objects are repainted (here
   with the sample's ground truth) in the prediction layer, in paint mode, and a rectangle in a
   Shapes layer ``corrected regions`` marks the square;
4. the Train widget while it fine-tunes on that region: progress, status, loss curve, preview;
5. after the training and **Refresh prediction**;
6. the Models widget listing the saved model and its versions;
7. "Where to correct next": the uncertainty layer and the ranked regions, the first one clicked;
8. with ``--volume TIFF --voxel Z,Y,X`` (the shared mouse-embryo volume, say): that Z stack
   opened with its voxel size as the layer's scale and predicted with the starter for Z
   stacks, ``nuclei-volumes`` (loaded in the Models widget: the session keeps the model trained
   above), seen in 3D.

Models are saved in a temporary registry (``NAPARI_UNET_HOME``), never in the user's own.
Everything is driven through the widgets' buttons and methods, like ``benchmarks/bench_gui.py``;
the layer choices are *not* set by the script: it checks that the widgets followed the layers
(the new ``[unet]`` layer, the Shapes layer) as they must for a user.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout, not another editable install

REGION = 96  # side of a corrected square, pixels
REGIONS = 2  # squares corrected (one was too little: the core kept the previous model)
SOURCE = "dsb2018"  # the image layer of the launcher's sample


# ----------------------------------------------------------------------------- Qt helpers
def wait_until(cond, timeout: float, poll_ms: int = 20) -> bool:
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    t_end = time.perf_counter() + timeout
    ok = [bool(cond())]

    def check() -> None:
        if cond():
            ok[0] = True
            loop.quit()
        elif time.perf_counter() > t_end:
            loop.quit()

    if not ok[0]:
        timer = QTimer()
        timer.setInterval(poll_ms)
        timer.timeout.connect(check)
        timer.start()
        loop.exec()
        timer.stop()
    return ok[0]


def pump(seconds: float) -> None:
    t_end = time.perf_counter() + seconds
    wait_until(lambda: time.perf_counter() >= t_end, seconds + 1)


def clear_notifications(viewer) -> None:
    """Close napari's toast notifications so they do not cover the canvas."""
    try:
        from napari._qt.dialogs.qt_notification import NapariQtNotification

        for w in viewer.window._qt_window.findChildren(NapariQtNotification):
            w.close()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    pump(0.3)


def camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def shot(viewer, path: Path, keep_toasts: bool = False) -> None:
    if not keep_toasts:
        clear_notifications(viewer)
    pump(0.5)
    img = viewer.window._qt_window.grab()
    img.save(str(path))
    print(f"wrote {path} ({img.width()}x{img.height()})", flush=True)


# ----------------------------------------------------------------------------- corrections
def worst_region(
    pred: np.ndarray, truth: np.ndarray, size: int, margin: int = 48
) -> tuple[slice, slice, int]:
    """The ``size`` square (step 16, ``margin`` from the borders) with the most wrong pixels.

    A truth object is wrong when no predicted object overlaps it with IoU >= 0.5 (missed,
    merged or split); the count is weighted by how much of the object lies in the square.
    """
    t = truth.astype(np.int64).ravel()
    p = pred.astype(np.int64).ravel()
    nt, np_ = int(t.max()) + 1, int(p.max()) + 1
    inter = np.bincount(t * np_ + p, minlength=nt * np_).reshape(nt, np_)
    area_t, area_p = inter.sum(1), inter.sum(0)
    union = area_t[:, None] + area_p[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    best = iou[:, 1:].max(axis=1) if np_ > 1 else np.zeros(nt)
    wrong = np.zeros(nt, bool)
    wrong[1:] = best[1:] < 0.5
    # false objects: predicted objects matching no truth object
    fp = np.zeros(np_, bool)
    fp[1:] = iou[1:, 1:].max(axis=0) < 0.5 if nt > 1 else True
    bad = wrong[truth] | fp[pred]
    integral = np.pad(bad.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    best_score, best_yx = -1, (0, 0)
    ny, nx = bad.shape
    for y in range(margin, ny - size - margin + 1, 16):
        for x in range(margin, nx - size - margin + 1, 16):
            s = (
                integral[y + size, x + size]
                - integral[y, x + size]
                - integral[y + size, x]
                + integral[y, x]
            )
            if s > best_score:
                best_score, best_yx = int(s), (y, x)
    y, x = best_yx
    return slice(y, y + size), slice(x, x + size), int(wrong[1:].sum() + fp[1:].sum())


def correct_region(labels_layer, truth: np.ndarray, region: tuple[slice, slice]) -> int:
    """Repaint ``region`` of the labels layer with the truth, as brush and eraser strokes would
    (through ``data_setitem``, so napari's undo works); returns the pixels changed."""
    data = np.asarray(labels_layer.data)
    sub_pred, sub_true = data[region], truth[region]
    offset = int(data.max()) + 1
    want = np.where(sub_true > 0, sub_true.astype(np.int64) + offset, 0).astype(data.dtype)
    # objects that were already right keep their id: only pixels that differ are repainted
    changed = (sub_pred > 0) != (sub_true > 0)
    for tid in np.unique(sub_true[sub_true > 0]):
        obj = sub_true == tid
        ids, counts = np.unique(sub_pred[obj], return_counts=True)
        k = int(ids[np.argmax(counts)])
        same = k != 0 and np.array_equal(sub_pred == k, obj)
        if same:
            want[obj] = k
        else:
            changed |= obj | ((sub_pred == k) & (k != 0))
    changed |= (sub_pred > 0) & (sub_true == 0)
    yy, xx = np.nonzero(changed)
    y0, x0 = region[0].start, region[1].start
    labels_layer.data_setitem((yy + y0, xx + x0), want[yy, xx])
    return int(changed.sum())


def volume_step(viewer, pw, mw, docks, path: Path, voxel: str, out: Path) -> None:
    """8. A Z stack with its voxel size, predicted by the starter for volumes. The session's
    model is the one trained above, kept for every layer, so the starter is loaded from the
    Models widget, as a user would (a fresh session picks it by itself)."""
    import tifffile

    from napari_unet._widgets import _layers

    viewer.layers.clear()  # a new image, as a user would start it (the view fits it alone)
    scale = tuple(float(v) for v in voxel.split(","))
    name = path.stem
    vol = viewer.add_image(tifffile.imread(path), name=name, scale=scale, colormap="gray")
    assert mw.select("starter: nuclei-volumes") and mw.load()
    docks[0].raise_()
    pump(0.5)
    assert pw.image_combo.value() is vol, "Predict must follow the new image layer"
    pw.scope_combo.setCurrentText("whole layer")
    pw.predict_button.click()
    if not wait_until(lambda: not pw.running, 300):
        raise SystemExit("the volume's prediction did not finish")
    pred = _layers.find_own_layer(viewer, name)
    print(f"volume: {pw.model_label.text()!r}; {pw.status_label.text()}")
    viewer.dims.ndisplay = 3
    vol.visible = False
    pred.visible = True
    viewer.reset_view()
    camera = getattr(getattr(viewer, "scene", None), "camera", None) or viewer.camera
    camera.angles = (0, -30, 55)
    pump(1.0)
    shot(viewer, out / "guide_8_volume.png", keep_toasts=True)
    viewer.dims.ndisplay = 2


# ----------------------------------------------------------------------------- the tour
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "images"), help="output folder")
    p.add_argument("--train-seconds", type=int, default=20, help="training budget, s")
    p.add_argument("--volume", default=None, help="a ZYX TIFF for step 8")
    p.add_argument("--voxel", default="1,1,1", help="its voxel size Z,Y,X")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["NAPARI_UNET_HOME"] = tempfile.mkdtemp(prefix="napari-unet-shots-")

    import napari

    from napari_unet._widgets import _launch, _layers
    from napari_unet._widgets._workers import State
    from napari_unet.metrics import instance_f1

    viewer = napari.Viewer(show=True, title="napari-unet")
    win = viewer.window._qt_window
    win.resize(1366, 768)
    docks = _launch.prepare(viewer)  # what python -m napari_unet does
    pw, tw, mw = (viewer.window.dock_widgets[f"{n} (napari-unet)"] for n in _launch.WIDGETS)
    image = viewer.layers[SOURCE]
    truth = np.asarray(viewer.layers[f"{SOURCE} truth"].data)
    assert viewer.layers.selection.active is image, "the launcher must leave the image active"
    pump(1.0)
    print(f"window {win.width()}x{win.height()} (minimum {win.minimumSizeHint().height()} px)")
    viewer.reset_view()  # fit the image to the canvas narrowed by the docks
    pump(0.5)

    # 1. the sample and the widgets
    shot(viewer, out / "guide_1_open.png")

    # 2. Predict with the starter model
    assert pw.image_combo.value() is image
    pw.scope_combo.setCurrentText("whole layer")
    pw.predict_button.click()
    if not wait_until(lambda: not pw.running, 300):
        raise SystemExit("the prediction did not finish")
    pred_layer = _layers.find_own_layer(viewer, SOURCE)
    assert pred_layer is not None
    before = np.array(pred_layer.data)
    print(f"Predict says: {pw.status_label.text()}")
    assert tw.labels_combo.value() is pred_layer, "Train must follow the new [unet] layer"
    pump(1.0)
    shot(viewer, out / "guide_2_predict.png", keep_toasts=True)
    # Train right away, nothing corrected: refused, with a message
    docks[1].raise_()
    assert tw.train() is None, "training on an uncorrected prediction must be refused"
    pump(0.3)
    docks[0].raise_()

    # 3. correct one square, mark it with a rectangle
    rects, fixed = [], np.zeros(truth.shape, bool)
    for _ in range(REGIONS):  # the worst square, then the worst one among the rest
        pred_now = np.where(fixed, truth, np.asarray(pred_layer.data))
        region_y, region_x, n_wrong = worst_region(pred_now, truth, REGION)
        print(f"{n_wrong} wrong objects left; correcting y {region_y}, x {region_x}")
        changed = correct_region(pred_layer, truth, (region_y, region_x))
        fixed |= np.isin(truth, truth[region_y, region_x])
        print(f"repainted {changed} pixels")
        y0, y1, x0, x1 = region_y.start, region_y.stop, region_x.start, region_x.stop
        rects.append(np.array([[y0 - 0.5, x0 - 0.5], [y1 - 0.5, x1 - 0.5]]))
    shapes = viewer.add_shapes(
        rects,
        shape_type="rectangle",
        name="corrected regions",
        edge_color="yellow",
        face_color="transparent",
        edge_width=2,
    )
    assert tw.shapes_combo.value() is shapes, "Train must pick up the new Shapes layer"
    viewer.layers.selection.active = pred_layer
    pred_layer.mode = "paint"
    pred_layer.brush_size = 6
    pred_layer.selected_label = int(np.asarray(pred_layer.data).max()) + 1
    zoom_on = ((y0 + y1) / 2, (x0 + x1) / 2)
    camera(viewer).center = zoom_on
    camera(viewer).zoom = 3.0
    assert tw.labels_combo.value() is pred_layer and tw.image_combo.value() is image
    docks[1].raise_()
    pump(1.0)
    shot(viewer, out / "guide_3_correct.png")

    # 4. training, caught in the middle
    pred_layer.mode = "pan_zoom"
    tw.seconds_spin.setValue(args.train_seconds)
    tw.steps_spin.setValue(0)
    tw.preview_spin.setValue(5)
    viewer.reset_view()
    tw.train_button.click()
    if tw.state.value != State.TRAINING:
        raise SystemExit(f"training refused: {tw.status_label.text()}")
    wait_until(
        lambda: (
            any((ly.metadata or {}).get("kind") == "preview" for ly in viewer.layers)
            and tw.last_progress is not None
            and tw.last_progress.seconds > 0.55 * args.train_seconds
        ),
        args.train_seconds + 120,
    )
    pred_layer.visible = False
    shapes.visible = True
    pump(0.6)
    shot(viewer, out / "guide_4_training.png")
    if not wait_until(lambda: tw.state.value in (State.DONE, State.FAILED), 600):
        raise SystemExit("the training did not finish")
    if tw.state.value == State.FAILED:
        raise SystemExit(f"training failed: {tw.status_label.text()}")
    pump(1.0)

    # 5. Refresh prediction: a new "nuclei [unet]" layer (the corrected one is kept)
    tw.refresh_button.click()
    if not wait_until(lambda: not tw.refreshing, 300):
        raise SystemExit("the refresh did not finish")
    for ly in viewer.layers:
        if (ly.metadata or {}).get("kind") == "preview":
            ly.visible = False
    pred_layer.visible = False
    shapes.visible = True
    after = np.asarray(_layers.find_own_layer(viewer, SOURCE).data)
    sq = (region_y, region_x)  # the last corrected square
    print(
        f"F1@0.5 whole image: starter {instance_f1(before, truth):.3f}, "
        f"fine-tuned {instance_f1(after, truth):.3f}; in the square: starter "
        f"{instance_f1(before[sq], truth[sq]):.3f}, "
        f"fine-tuned {instance_f1(after[sq], truth[sq]):.3f}"
    )
    print(f"Train says: {tw.status_label.text()}")
    viewer.layers.selection.active = _layers.find_own_layer(viewer, SOURCE)
    camera(viewer).center = zoom_on  # the corrected square again, now predicted by the new model
    camera(viewer).zoom = 3.0
    pump(1.0)
    shot(viewer, out / "guide_5_refresh.png", keep_toasts=True)

    # 6. Models: save under a lab name, train 5 s more (a second version), list the versions
    mw.save_as("nuclei-mylab")
    # Train followed the refreshed prediction; the corrections are in "[corrected]": a user
    # selects that layer in the layer list and Train follows
    corrected = viewer.layers[f"{SOURCE} [corrected]"]
    viewer.layers.selection.active = corrected
    assert tw.labels_combo.value() is corrected
    tw.seconds_spin.setValue(5)
    tw.preview_spin.setValue(0)
    tw.train_button.click()
    if not wait_until(lambda: tw.state.value in (State.DONE, State.FAILED), 300):
        raise SystemExit("the second training did not finish")
    mw.refresh()
    mw.select("nuclei-mylab", 1)  # an older version selected: 'Roll back' is enabled
    docks[2].raise_()
    pump(1.0)
    shot(viewer, out / "guide_6_models.png")

    # 7. Where to correct next: the uncertainty layer, the ranked regions, a click on the first
    for ly in viewer.layers:
        ly.visible = ly is image
    docks[0].raise_()
    pw.image_combo.set_value(image)
    pw.scope_combo.setCurrentText("whole layer")
    pw.suggest.run_button.click()
    if not wait_until(lambda: not pw.suggest.running, 600):
        raise SystemExit("the uncertainty map did not finish")
    pw.suggest.region_list.setCurrentRow(0)
    pw.suggest.go_to(0)
    pump(1.0)
    shot(viewer, out / "guide_7_uncertainty.png", keep_toasts=True)
    if args.volume:
        volume_step(viewer, pw, mw, docks, Path(args.volume), args.voxel, out)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
