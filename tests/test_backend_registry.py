"""Backend selection: set_backend, the context manager, NORMKIT_BACKEND, auto and fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import normkit
from normkit import info, kernels, selection


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


def test_info_shows_the_error_of_an_unknown_environment_backend(monkeypatch):
    """``NORMKIT_BACKEND`` is read unchecked: ``info`` reports the error every layer call then raises."""
    monkeypatch.setattr(selection, "_default", "bogus")
    with pytest.raises(ValueError, match="unknown normkit backend 'bogus'") as raised:
        normkit.functional.layer_norm(torch.randn(2, 4), (4,))
    assert info.describe()["backend in force"] == f"error: {raised.value}"
    assert str(raised.value).endswith("(set by NORMKIT_BACKEND='bogus')")


def test_an_empty_environment_backend_is_auto():
    env = dict(os.environ, NORMKIT_BACKEND="")
    out = subprocess.run(
        [sys.executable, "-c", "import normkit; print(normkit.get_backend())"], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "auto"


def test_a_bad_output_cache_setting_is_named_and_the_default_kept():
    env = dict(os.environ, NORMKIT_OUTPUT_CACHE_MB="1.5")
    code = "from normkit.kernels import _pages; print(_pages.CACHE_LIMIT > 0)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True" and "NORMKIT_OUTPUT_CACHE_MB='1.5' is not a whole number" in out.stderr


def test_info_says_when_the_backend_in_force_falls_back(monkeypatch):
    def load(name):
        raise ImportError("No module named 'numba'")

    monkeypatch.setattr(selection, "_default", "cpu")
    monkeypatch.setattr(kernels, "load", load)
    in_force = info.describe()["backend in force"]
    assert in_force == "cpu, unavailable (No module named 'numba'): calls use the reference backend"


def test_info_command_prints_everything_with_an_unknown_backend():
    env = dict(os.environ, NORMKIT_BACKEND="bogus")
    out = subprocess.run(
        [sys.executable, "-m", "normkit.cli", "info"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "backend in force: error: unknown normkit backend 'bogus'; choose one of" in out
    assert "output cache:" in out


def test_import_loads_no_kernel_backend():
    code = "import sys, normkit; print(sorted(m for m in sys.modules if m.startswith('normkit.kernels.') and m != 'normkit.kernels.contract'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
