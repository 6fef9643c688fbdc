import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import normkit

INTERPRETER_TEST = "test_triton_backend.py::test_kernels_under_the_interpreter"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _process_settings_kept():
    """A test that leaves the thread count or the backend changed would make every later test run
    under it (single-threaded kernels instead of the parallel ones): fail the test that does."""
    before = torch.get_num_threads(), normkit.get_backend()
    yield
    assert (torch.get_num_threads(), normkit.get_backend()) == before, "test changed the process-wide settings"


def pytest_collection_finish(session):
    """Start the Triton interpreter's run of the kernel tests as soon as it is selected: it is several
    minutes of single-threaded Python, and the session before it mostly waits on numba compiling on
    one core, so the two overlap on a two-core machine. The test collects the result."""
    if any(item.nodeid.endswith(INTERPRETER_TEST) for item in session.items):
        here = Path(__file__).parent
        env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning",
               str(here / "test_triton_backend.py"), str(here / "test_contract.py"), "-k", "triton"]
        session.config.interpreter_run = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def pytest_sessionfinish(session):
    run = getattr(session.config, "interpreter_run", None)
    if run is not None and run.poll() is None:
        run.kill()
        run.communicate()
