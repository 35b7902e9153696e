"""Inference engines: who runs the network's forward pass during prediction.

``Segmenter.predict(engine=...)`` takes one of :data:`ENGINES`:

* ``"torch"``: torch eager, on any device. On the CPU and on CUDA the network is first copied
  with each BatchNorm folded into the convolution before it (an exact identity in eval mode:
  one pass over each feature map fewer), in channels-last memory format.
* ``"openvino"`` / ``"onnxruntime"``: the network (with its softmax) is exported to ONNX once
  per set of weights and run by that engine on the CPU. Both are several times faster than
  torch eager on a CPU (Winograd convolutions, fused kernels; see ``docs/benchmarks.md``). Their
  probabilities equal torch's within 1e-4.
* ``"auto"`` (default): on the CPU the fastest installed engine (OpenVINO, then ONNX Runtime,
  both in the ``[all]`` extra), else torch; torch on CUDA and MPS.

Exports are cached by a digest of the weights (and the architecture), in memory and on disk
(``$NAPARI_UNET_CACHE`` or ``~/.cache/napari-unet/engines``), so fine-tuning, which changes the
weights, invalidates them by itself. With ``auto``, a small image whose weights have no export
yet is predicted with torch, and the export is made in a background thread once that prediction
is done (an export takes about as long as one 512x512 tile): a preview after a training round
never waits for it, nor shares the CPU with it.
When an export or an engine fails, the prediction falls back to torch and says so in
``Prediction.notes``. Training always uses torch.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import importlib.util
import io
import logging
import os
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "ENGINES",
    "available_engines",
    "cache_dir",
    "check_engine",
    "export_in_background",
    "fused_copy",
    "is_exported",
    "predictor",
    "weights_digest",
]

logger = logging.getLogger("napari_unet")

ENGINES = ("auto", "torch", "openvino", "onnxruntime")
_CPU_ENGINES = ("openvino", "onnxruntime")  # order of preference for "auto" (measured)
_MODULES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}
#: With "auto", images of at least this many pixels wait for a missing export (it pays for
#: itself within the image); smaller ones run on torch while it is made in the background.
EXPORT_NOW_PIXELS = 1024 * 1024

PredictFn = Callable[[np.ndarray], np.ndarray]


def check_engine(engine: str) -> str:
    """``engine`` if it is one of :data:`ENGINES`, else a ValueError naming the choices."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(map(repr, ENGINES))}, not {engine!r}")
    return engine


def available_engines() -> list[str]:
    """The CPU engines installed here, in the order ``auto`` prefers them."""
    return [e for e in _CPU_ENGINES if importlib.util.find_spec(_MODULES[e]) is not None]


def cache_dir() -> Path:
    """Where exported networks are kept between sessions."""
    env = os.environ.get("NAPARI_UNET_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "napari-unet"
    return base / "engines"


def weights_digest(net: nn.Module) -> str:
    """A digest of the network's architecture and of every parameter and buffer."""
    h = hashlib.sha256(repr(getattr(net, "config", lambda: type(net).__name__)()).encode())
    for name, t in net.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def array_digest(a: np.ndarray) -> str:
    """A digest of a numpy array's shape, dtype and values (blake2b; ~0.2 s for 8192x8192
    uint16): whether a layer still holds what the plugin wrote, or a round's image is the one
    predicted (``Segmenter._zoom_for``)."""
    h = hashlib.blake2b(f"{a.shape}{a.dtype.str}".encode(), digest_size=16)
    h.update(np.ascontiguousarray(a).view(np.uint8).reshape(-1))
    return h.hexdigest()


# ------------------------------------------------------------------------------ torch
def _fold(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``conv`` with the eval-mode BatchNorm ``bn`` that follows it folded in."""
    fused = copy.deepcopy(conv)
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    fused.weight = nn.Parameter(conv.weight.detach() * scale.reshape(shape))
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias.detach())
    return fused


def fused_copy(net: nn.Module) -> nn.Module:
    """An eval-mode copy of ``net`` for inference, every (conv, BatchNorm) pair folded into one
    convolution. ``net`` itself is untouched (it may be training in another thread)."""
    out = copy.deepcopy(net).eval()
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    for seq in out.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, convs) and isinstance(bn, norms) and bn.track_running_stats:
                seq._modules[a] = _fold(conv, bn)
                seq._modules[b] = nn.Identity()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def _torch_predictor(net: nn.Module, device: torch.device, ndim: int) -> PredictFn:
    cuda = device.type == "cuda"
    fmt = torch.channels_last if ndim == 2 else torch.channels_last_3d
    if device.type in ("cpu", "cuda"):
        net = fused_copy(net).to(device=device, memory_format=fmt)
    else:  # MPS and others: the network as it is
        net = net.eval().to(device)
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


# ------------------------------------------------------------------------------ export
class _WithSoftmax(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).softmax(1)


def _export_bytes(net: nn.Module) -> bytes:
    """ONNX of ``net`` + softmax, dynamic batch and spatial sizes (multiples of the divisor)."""
    ndim = int(getattr(net, "ndim", 2))
    div = int(getattr(net, "divisor", 16))
    model = _WithSoftmax(fused_copy(net).cpu())
    x = torch.zeros((1, int(net.in_channels)) + (max(64, 4 * div),) * ndim)
    axes = {0: "batch", **{2 + i: f"s{i}" for i in range(ndim)}}
    buf = io.BytesIO()
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            model,
            (x,),
            buf,
            dynamo=False,
            input_names=["image"],
            output_names=["probabilities"],
            dynamic_axes={"image": axes, "probabilities": axes},
            opset_version=17,
        )
    return buf.getvalue()


# the TorchScript-based exporter is deprecated in favour of torch.export, which needs the
# onnxscript package; it is the one that works here with torch alone (warnings.catch_warnings
# is not used: it is not thread-safe, and exports run in a background thread)
for _msg in (r"You are using the legacy TorchScript", r"The feature will be removed"):
    warnings.filterwarnings("ignore", message=_msg, category=DeprecationWarning)

_lock = threading.Lock()
_onnx: OrderedDict[str, Path] = OrderedDict()  # digest -> exported file
_sessions: OrderedDict[tuple, PredictFn] = OrderedDict()  # (engine, digest, threads) -> fn
_pending: dict[str, threading.Thread] = {}  # digest -> background export
_failed: dict[str, str] = {}  # digest -> why the export failed (not retried)
_KEEP = 2


def _remember(cache: OrderedDict, key, value) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _KEEP:
        cache.popitem(last=False)


def _onnx_path(net: nn.Module, digest: str) -> Path:
    """The exported file for these weights: from memory, from disk, or exported now."""
    with _lock:
        if digest in _onnx and _onnx[digest].is_file():
            return _onnx[digest]
        if digest in _failed:
            raise RuntimeError(_failed[digest])
    path = cache_dir() / f"{digest}.onnx"
    if not path.is_file():
        try:
            data = _export_bytes(net)
        except Exception as e:  # noqa: BLE001 - reported, and torch takes over
            with _lock:
                _failed[digest] = f"export to ONNX failed: {type(e).__name__}: {e}"
            raise RuntimeError(_failed[digest]) from e
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # a concurrent reader sees the whole file or none
        finally:
            if os.path.exists(tmp):  # a failed write (disk full) leaves no .part behind
                os.unlink(tmp)
    with _lock:
        _remember(_onnx, digest, path)
    return path


def is_exported(digest: str) -> bool:
    """Whether the export for these weights is ready (in memory or on disk)."""
    return digest in _onnx or (cache_dir() / f"{digest}.onnx").is_file()


def export_in_background(net: nn.Module, digest: str) -> threading.Thread:
    """Start (or return the running) export of ``net``'s weights in a daemon thread."""
    with _lock:
        th = _pending.get(digest)
        if th is not None and th.is_alive():
            return th
        busy = [t for t in _pending.values() if t.is_alive()]
        if busy:  # one export at a time: weights that changed meanwhile are not worth it
            return busy[0]
        snapshot = copy.deepcopy(net).cpu()  # the caller may go on training ``net``

        def work():
            try:
                _onnx_path(snapshot, digest)
            except Exception as e:  # noqa: BLE001 - noted; predictions use torch
                logger.info("napari-unet: background export failed (%s)", e)
            finally:
                with _lock:
                    _pending.pop(digest, None)

        th = threading.Thread(target=work, name="napari-unet-export", daemon=True)
        _pending[digest] = th
        th.start()
        return th


#: How long the interpreter's exit waits for a background export (one takes 0.3-2 s here).
EXIT_WAIT_S = 30.0


def wait_for_exports(timeout: float = EXIT_WAIT_S) -> None:
    """Let the running background exports finish. Registered for the interpreter's exit: a
    daemon thread stopped in the middle of torch's ONNX export aborted the process ("terminate
    called without an active exception", exit status 134: 4 of 12 runs of ``napari-unet
    predict`` with a model not exported yet, 0 of 12 with this wait)."""
    deadline = time.monotonic() + timeout
    with _lock:
        running = list(_pending.values())
    for th in running:
        th.join(max(0.0, deadline - time.monotonic()))


atexit.register(wait_for_exports)


def _openvino_fn(path: Path, threads: int) -> PredictFn:
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    # one compilation for every tile shape: measured as fast as a static shape here (2 cores:
    # 1.04-1.47 s vs 1.10-1.30 s per batch of two 536x536 tiles), and no recompiling when
    # the tile changes with the image
    model = core.read_model(str(path))
    compiled = core.compile_model(model, "CPU", config)
    output = compiled.outputs[0]

    def one(batch: np.ndarray) -> np.ndarray:
        return np.asarray(compiled(batch)[output], np.float32)

    compiled_models = [compiled]

    def release() -> None:
        # the activations of the last tiles (about 180 MB for two streams of 536x536 tiles)
        # are freed; the next inference allocates them again (0.04 s)
        for c in compiled_models:
            c.release_memory()

    if threads < 2:
        single = lambda batch: one(np.ascontiguousarray(batch, np.float32))  # noqa: E731
        single.release = release  # type: ignore[attr-defined]
        return single
    # a batch of several tiles goes to two streams at once, each with half the threads: the
    # whole predict of a 2048x2048 image took 0.871x the bare torch forward instead of 0.919x
    # (best of 3, 2 cores, docs/benchmarks.md); a single tile keeps every thread
    # (compiled at the first such batch: a prediction of one tile never pays for it)
    requests: list = []

    def predict_fn(batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, np.float32)
        if len(batch) < 2:
            return one(batch)
        if not requests:
            hint = {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": 2}
            streams = core.compile_model(model, "CPU", config | hint)
            compiled_models.append(streams)
            requests.extend(streams.create_infer_request() for _ in range(2))
        parts = np.array_split(batch, 2)
        for req, part in zip(requests, parts, strict=True):
            req.start_async({0: part})
        outs = []
        for req in requests:
            req.wait()
            outs.append(np.array(req.get_output_tensor(0).data, np.float32))
        return np.concatenate(outs)

    predict_fn.release = release  # type: ignore[attr-defined]
    return predict_fn


def _onnxruntime_fn(path: Path, threads: int) -> PredictFn:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle = no CPU
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def predict_fn(batch: np.ndarray) -> np.ndarray:
        return sess.run(None, {"image": np.ascontiguousarray(batch, np.float32)})[0]

    return predict_fn


_MAKERS = {"openvino": _openvino_fn, "onnxruntime": _onnxruntime_fn}


def _serialised(fn: PredictFn) -> PredictFn:
    """``fn`` one call at a time: a cached session may be shared by two predictions (a preview
    and a Predict click), and an engine's inference request is not re-entrant."""
    busy = threading.Lock()

    def call(batch: np.ndarray) -> np.ndarray:
        with busy:
            return fn(batch)

    if hasattr(fn, "release"):

        def release() -> None:
            with busy:
                fn.release()

        call.release = release  # type: ignore[attr-defined]
    return call


def _engine_fn(engine: str, net: nn.Module, digest: str) -> PredictFn:
    threads = max(1, torch.get_num_threads())
    key = (engine, digest, threads)
    with _lock:
        fn = _sessions.get(key)
    if fn is None:
        path = _onnx_path(net, digest)
        try:
            fn = _serialised(_MAKERS[engine](path, threads))
        except Exception:
            # a damaged cached file (disk full, edited by hand): gone, so the next call exports
            # the network again instead of failing the same way
            with _lock:
                _onnx.pop(digest, None)
            path.unlink(missing_ok=True)
            raise
        with _lock:
            _remember(_sessions, key, fn)
    return fn


def predictor(
    net: nn.Module,
    device: torch.device,
    engine: str = "auto",
    *,
    pixels: int | None = None,
    notes: list[str] | None = None,
) -> PredictFn:
    """A function ``(B, C, *tile) float32 -> (B, K, *tile)`` probabilities; its ``engine``
    attribute names the engine that runs it (``"torch"`` once a failing engine handed over).
    ``pixels`` (of the whole prediction) lets ``auto`` decide whether a missing export is worth
    waiting for; fallbacks are appended to ``notes``."""
    check_engine(engine)
    ndim = int(getattr(net, "ndim", 2))

    def torch_fn(note: str | None = None) -> PredictFn:
        if note is not None and notes is not None:
            notes.append(note)
        fn = _torch_predictor(net, device, ndim)
        fn.engine = "torch"  # type: ignore[attr-defined]
        return fn

    wanted = engine
    if engine == "auto":
        installed = available_engines() if device.type == "cpu" else []
        wanted = installed[0] if installed else "torch"
    elif engine != "torch" and device.type != "cpu":
        return torch_fn(f"engine {engine!r} runs on the CPU only: used torch on {device}")
    if wanted == "torch":
        return torch_fn()
    if importlib.util.find_spec(_MODULES[wanted]) is None:
        return torch_fn(
            f"engine {wanted!r} is not installed (pip install {_MODULES[wanted]}): used torch"
        )
    digest = weights_digest(net)
    if engine == "auto" and not is_exported(digest) and (pixels or 0) < EXPORT_NOW_PIXELS:
        fn = torch_fn()
        if digest not in _failed and digest not in _pending:  # not copied again meanwhile
            # started once this prediction is done (start_deferred_export): run alongside it,
            # the export took the CPU from it (512x512 after a round: 1.23 s instead of 0.31)
            snapshot = copy.deepcopy(net).cpu()  # these weights, whatever happens to ``net``
            fn.export_later = lambda: export_in_background(snapshot, digest)  # type: ignore[attr-defined]
        return fn

    def fall_back(e: BaseException) -> PredictFn:
        msg = f"the {wanted} engine failed ({e}): predicted with torch"
        logger.warning("napari-unet: %s", msg)
        return torch_fn(msg)

    try:
        fn = _engine_fn(wanted, net, digest)
    except Exception as e:  # noqa: BLE001 - any engine failure: torch takes over, and says so
        return fall_back(e)

    def guarded(batch: np.ndarray) -> np.ndarray:
        if guarded.engine == "torch":
            return guarded.torch(batch)
        try:
            return fn(batch)
        except Exception as e:  # noqa: BLE001 - e.g. a shape the engine cannot compile
            guarded.torch, guarded.engine = fall_back(e), "torch"
            return guarded.torch(batch)

    guarded.engine = wanted  # type: ignore[attr-defined]
    if hasattr(fn, "release"):
        guarded.release = fn.release  # type: ignore[attr-defined]
    return guarded


def start_deferred_export(fn: PredictFn | None) -> None:
    """Start the background export a predictor of ``auto`` left for after its prediction
    (:func:`predictor`, small images whose weights have no export yet); nothing otherwise."""
    later = getattr(fn, "export_later", None)
    if later is not None:
        fn.export_later = None  # type: ignore[union-attr]
        later()


def release_memory(fn: PredictFn) -> None:
    """Free what an engine's predictor holds between two calls (OpenVINO's activations);
    nothing for the others. Called after the tiles of a big prediction, before its
    post-processing (see :data:`napari_unet.segmenter.RELEASE_PIXELS`)."""
    release = getattr(fn, "release", None)
    if release is not None:
        try:
            release()
        except Exception as e:  # noqa: BLE001 - memory is a nicety, never a failed prediction
            logger.warning("napari-unet: could not release the engine's memory (%s)", e)
