"""Helpers shared by the model-file tests (test_save, test_format, test_registry)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def make_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "enc.0.weight": torch.randn(4, 2, 3, 3, generator=g),
        "enc.0.bias": torch.randn(4, generator=g).to(torch.float16),
        "dec.w": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "lut": torch.arange(6, dtype=torch.uint8).reshape(2, 3),
        "f64": torch.linspace(0, 1, 4, dtype=torch.float64),
    }


def make_config() -> dict:
    return {
        "architecture": {"depth": 2, "base_channels": 4, "in_channels": 2},
        "task": "nuclei",
        "normalisation": {"kind": "percentile", "low": 1.0, "high": 99.8},
        "history": [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}],
        "trained_on": ["img1.tif", "img2.tif"],
        "val_score": 0.75,
    }


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k].cpu(), b[k].cpu()), k


def model_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class Boom(RuntimeError):
    pass


def fail_on_call(monkeypatch, func_name: str, n: int) -> None:
    """Make os.<func_name> raise on its n-th call (1-based)."""
    real = getattr(os, func_name)
    calls = {"n": 0}

    def fake(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Boom("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, func_name, fake)
