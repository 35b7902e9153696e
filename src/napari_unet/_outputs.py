"""Output checks of the command line: never write over an input, know early that an output
can be written, and never lose a trained model without saying where it is.

Used by :mod:`napari_unet.cli`; every function raises ``ValueError`` (the CLI's error type)
with a message that names the option (``-o``, ``--csv``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

__all__ = [
    "check_writable",
    "check_writable_target",
    "predict_outputs",
    "refuse_inputs",
    "same_path",
    "save_or_rescue",
]


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same file: resolved paths, then ``os.path.samefile``
    (hard links, symlinks, case-insensitive file systems)."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    with contextlib.suppress(OSError, RuntimeError):
        if pa.resolve() == pb.resolve():
            return True
    try:
        return os.path.samefile(pa, pb)
    except OSError:
        return False


def refuse_inputs(
    outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike], flag: str
) -> None:
    """Refuse any output that is one of the inputs, whatever the naming."""
    ins = [Path(i) for i in inputs]
    for out in outputs:
        for i in ins:
            if same_path(out, i):
                raise ValueError(
                    f"{flag}: the output {out} is the input {i}; writing it would destroy the "
                    "input. Choose another output name or folder."
                )


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


def check_writable(folder: str | os.PathLike, flag: str) -> None:
    """Check that files can be created in ``folder`` (or where it would be created).

    A temporary file is created and removed (``os.access`` is not trusted: ACLs, read-only
    mounts, root). Raises ``ValueError`` naming ``flag``.
    """
    target = Path(folder).expanduser()
    where = _nearest_existing(target)
    if not where.is_dir():
        raise ValueError(f"{flag} {target}: {where} is a file, so no folder can be made there")
    try:
        fd, name = tempfile.mkstemp(dir=where, prefix=".napari-unet-write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise ValueError(
            f"{flag} {target}: cannot write in {where} ({e.strerror or e}); choose a folder "
            "you can write to"
        ) from None


def check_writable_target(target: str, flag: str, registry_root: Path | None = None) -> None:
    """Check that a model can be saved at ``target`` (a path, or a registry under
    ``registry_root``) before training starts."""
    if registry_root is not None:
        check_writable(registry_root, flag)
        return
    p = Path(target).expanduser()
    try:
        check_writable(p.parent, flag)  # a folder save writes next to the folder, then swaps
    except ValueError:
        if not p.is_dir():
            raise
        check_writable(p, flag)  # an existing folder can still be updated in place


def rescue_folders() -> list[Path]:
    """Where a model that could not be saved at ``-o`` goes: the working folder, the
    temporary folder, the home folder (in that order)."""
    out = []
    for get in (Path.cwd, lambda: Path(tempfile.gettempdir()), Path.home):
        with contextlib.suppress(OSError, RuntimeError):
            out.append(get())
    return out


def save_or_rescue(
    save: Callable[[], str], rescue: Callable[[Path], object], flag: str, target: str
) -> str:
    """``save()``; if it fails, ``rescue(path)`` in each of :func:`rescue_folders` in turn.

    Returns ``save()``'s description. Raises ``ValueError`` naming ``flag`` and saying where
    the model went, or, if no place would take it, every place tried and why.
    """
    try:
        return save()
    except (OSError, ValueError) as e:
        first = _reason(e)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tried: list[str] = []
    for folder in rescue_folders():
        path = folder / f"napari-unet-rescued-{stamp}"
        try:
            rescue(path)
        except (OSError, ValueError) as e:
            tried.append(f"{path} ({_reason(e)})")
            continue
        raise ValueError(
            f"could not save the model to {flag} {target} ({first}); it was saved to {path} instead"
        )
    raise ValueError(
        f"could not save the model to {flag} {target} ({first}), nor to "
        + "; ".join(tried)
        + ": the trained model is lost. Free disk space or fix the permissions and train again."
    )


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e).strip() or type(e).__name__


def predict_outputs(out: Path, stems: Sequence[str], probabilities: bool) -> list[Path]:
    """Every file ``predict`` writes into ``out``."""
    names = [f"{s}_labels.tif" for s in stems]
    if probabilities:
        names += [f"{s}_probabilities.tif" for s in stems]
    return [out / n for n in names]
