"""Shared helpers of the widget tests (the core tests import neither napari nor Qt)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _engine_cache(tmp_path_factory):
    """Exported networks (napari_unet.engines) go to a temporary folder, not the home."""
    import os

    old = os.environ.get("NAPARI_UNET_CACHE")
    os.environ["NAPARI_UNET_CACHE"] = str(tmp_path_factory.mktemp("engine-cache"))
    yield
    if old is None:
        os.environ.pop("NAPARI_UNET_CACHE", None)
    else:
        os.environ["NAPARI_UNET_CACHE"] = old


def capture_notifications(monkeypatch, *modules) -> dict[str, list[str]]:
    """Replace ``show_error/warning/info`` in ``modules`` by lists; returns the lists."""
    got: dict[str, list[str]] = {"error": [], "warning": [], "info": []}
    for module in modules:
        for kind, sink in got.items():
            monkeypatch.setattr(module, f"show_{kind}", sink.append)
    return got


@pytest.fixture
def viewer_session(make_napari_viewer, tmp_path, monkeypatch):
    """A napari viewer whose plugin session saves models in a temporary registry."""
    from napari_unet._widgets._session import session_for
    from napari_unet.store import ModelRegistry

    monkeypatch.setenv("NAPARI_UNET_HOME", str(tmp_path / "models"))
    viewer = make_napari_viewer()
    session = session_for(viewer)
    session.registry = ModelRegistry(tmp_path / "models")
    return viewer, session
