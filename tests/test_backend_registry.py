"""Backend selection: set_backend, the context manager, NORMKIT_BACKEND, auto and fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import normkit
from normkit import selection
from normkit import kernels


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown normkit backend 'nope'"):
        normkit.set_backend("nope")
    with pytest.raises(ValueError, match="unknown normkit backend"):
        with normkit.backend("nope"):
            pass


def test_context_manager_nests_and_restores():
    before = normkit.get_backend()
    with normkit.backend("reference"):
        assert normkit.get_backend() == "reference"
        with normkit.backend("auto"):
            assert normkit.get_backend() == "auto"
        assert normkit.get_backend() == "reference"
    assert normkit.get_backend() == before


def test_set_backend_is_process_wide():
    before = normkit.get_backend()
    try:
        normkit.set_backend("reference")
        assert normkit.get_backend() == "reference"
        x5 = torch.randn(1, 1, 4, 3, 1)
        assert selection.resolve(x5, None).name == "reference"
    finally:
        normkit.set_backend(before)


class _Declining:
    name = "declining"

    def supports(self, x5, weight):
        return False


def test_unsupported_case_falls_back_to_reference(monkeypatch):
    monkeypatch.setitem(kernels._REGISTRY, "declining", ("tests", "unused"))
    monkeypatch.setattr(kernels, "try_load", lambda name: _Declining() if name == "declining" else kernels.load(name))
    monkeypatch.setattr(kernels, "load", lambda name, _load=kernels.load: _Declining() if name == "declining" else _load(name))
    with normkit.backend("declining"):
        x = torch.randn(3, 4, 5)
        y = normkit.functional.group_norm(x, 2)
    with normkit.backend("reference"):
        torch.testing.assert_close(y, normkit.functional.group_norm(x, 2))


def test_environment_variable_sets_the_default():
    env = dict(os.environ, NORMKIT_BACKEND="reference")
    out = subprocess.run(
        [sys.executable, "-c", "import normkit; print(normkit.get_backend())"], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "reference"


def test_import_loads_no_kernel_backend():
    code = "import sys, normkit; print(sorted(m for m in sys.modules if m.startswith('normkit.kernels.') and m != 'normkit.kernels.contract'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
