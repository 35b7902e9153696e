"""Batch prediction on a LocalCluster of 2 worker processes equals the local run."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import tifffile

import napari_unet as nu
from napari_unet import batch
from napari_unet.synthetic import make_nuclei

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    with cluster, distributed.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def seg():
    net_seg = nu.Segmenter.pretrained("nuclei")
    return net_seg


def _images(folder, n, size=96):
    folder.mkdir()
    paths = []
    for k in range(n):
        img, _ = make_nuclei((size, size), seed=10 + k)
        p = folder / f"img{k}.tif"
        tifffile.imwrite(p, img)
        paths.append(p)
    return paths


def _read_all(paths):
    return {p.name: tifffile.imread(p) for p in paths}


def test_files_on_two_workers_equal_local_run(client, seg, tmp_path):
    paths = _images(tmp_path / "in", 5)
    local = batch.predict_files(seg, paths, tmp_path / "local")
    seen = []
    dist = batch.predict_files(
        seg, paths, tmp_path / "dist", client=client, progress=lambda *a: seen.append(a)
    )
    assert not dist.failed and len(dist.written) == 5 and dist.workers == 2
    assert [s[0] for s in seen] == [1, 2, 3, 4, 5]
    a, b = _read_all(local.written), _read_all(dist.written)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    # the model was built at most once per worker, and torch was limited to 1 thread there
    builds = client.run(lambda: batch.BUILDS["count"])
    assert all(v <= 1 for v in builds.values()) and sum(builds.values()) >= 1
    threads = client.run(lambda: __import__("torch").get_num_threads())
    assert set(threads.values()) == {1}
    # existing results are skipped, never clobbered, unless overwrite
    mtimes = {p: p.stat().st_mtime_ns for p in dist.written}
    again = batch.predict_files(seg, paths, tmp_path / "dist", client=client)
    assert len(again.skipped) == 5 and not again.written
    assert {p: p.stat().st_mtime_ns for p in dist.written} == mtimes
    forced = batch.predict_files(seg, paths[:1], tmp_path / "dist", client=client, overwrite=True)
    assert len(forced.written) == 1


def test_a_bad_file_is_reported_and_skipped(client, seg, tmp_path):
    paths = _images(tmp_path / "in", 2)
    bad = tmp_path / "in" / "broken.tif"
    bad.write_bytes(b"this is not a tiff")
    res = batch.predict_files(seg, [paths[0], bad, paths[1]], tmp_path / "out", client=client)
    assert list(res.failed) == [str(bad)] and "not a valid TIFF" in res.failed[str(bad)]
    assert len(res.written) == 2


def test_worker_killed_mid_run(client, seg, tmp_path):
    paths = _images(tmp_path / "in", 6, size=160)
    local = batch.predict_files(seg, paths, tmp_path / "local")
    pids = client.run(os.getpid)
    killed = []

    def kill_one(done, total, name):
        if not killed:  # after the first file: SIGKILL one worker process
            pid = next(iter(pids.values()))
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    res = batch.predict_files(seg, paths, tmp_path / "dist", client=client, progress=kill_one)
    assert killed and not res.failed and len(res.written) == 6
    a, b = _read_all(local.written), _read_all(res.written)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker


def test_lazy_array_on_two_workers_equals_local(client, seg):
    da = pytest.importorskip("dask.array")
    frames = np.stack([make_nuclei((80, 80), seed=k)[0] for k in range(4)])
    lazy = da.from_array(frames, chunks=(1, 80, 80))
    local = batch.predict_array(seg, frames, "TYX")
    dist = batch.predict_array(seg, lazy, "TYX", client=client)
    np.testing.assert_array_equal(local, dist)
    # ids are unique over the frames and each frame is what predict() gives for it
    first = seg.predict(frames[1], "YX", device="cpu").labels
    np.testing.assert_array_equal(dist[1] > 0, first > 0)
    assert len(np.intersect1d(np.unique(dist[0])[1:], np.unique(dist[1])[1:])) == 0


def test_scheduler_that_does_not_answer_is_a_clear_error():
    t0 = time.perf_counter()
    with pytest.raises(batch.BatchError, match="no dask scheduler answered"):
        with batch.connect("tcp://127.0.0.1:9", timeout=2):
            pass
    assert time.perf_counter() - t0 < 20


def test_cli_scheduler_that_does_not_answer(tmp_path, capsys):
    from napari_unet import cli

    img = _images(tmp_path / "in", 1, size=32)[0]
    argv = ["predict", "new", str(img), "-o", str(tmp_path / "o"), "--scheduler"]
    code = cli.main([*argv, "tcp://127.0.0.1:9", "--scheduler-timeout", "2"])
    assert code == 2 and "no dask scheduler answered" in capsys.readouterr().err
