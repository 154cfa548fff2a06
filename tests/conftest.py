"""Shared fixtures: small data sets written to temporary folders, as a user would bring them."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture
def npz_images(tmp_path):
    """A small 3-class image set with natural ids, saved as the bring-your-own .npz format."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = rng.normal(size=(120, 6, 6)).astype(np.float32) + y[:, None, None]
    groups = np.tile(np.arange(6), 20)
    path = tmp_path / "toy.npz"
    np.savez(path, x=x, y=y, groups=groups)
    return path


@pytest.fixture(autouse=True)
def _results_in_tmp(tmp_path, monkeypatch):
    """Runs started by tests write their results under the test's own folder."""
    monkeypatch.chdir(tmp_path)
