"""napari_unet.store is the old home of the model file and registry helpers: its imports keep
working and give the same objects (the tests are in test_format, test_save and test_registry)."""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_unet import fileio, format, registry, save, store


def test_old_store_imports_are_the_new_objects():
    for name in ("ModelFileError", "load_model", "read_config", "FORMAT", "FORMAT_VERSION"):
        assert getattr(store, name) is getattr(format, name)
    for name in ("ModelRegistry", "ModelInfo", "default_root", "validate_name"):
        assert getattr(store, name) is getattr(registry, name)
    assert store.save_model is save.save_model
    for name in store.__all__:
        assert hasattr(store, name)


@pytest.mark.parametrize("module", [store, fileio, format, registry, save])
def test_module_never_unpickles(module):
    src = Path(module.__file__).read_text()
    assert "torch.load(" not in src.replace("torch.load(..., weights_only=True)", "")
    assert "import pickle" not in src and "allow_pickle" not in src
