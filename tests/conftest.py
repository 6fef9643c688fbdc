import os
import subprocess
import sys
import threading
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


# The kernel families (dtype, activation, thread mode) a broad run compiles (see docs/architecture.md,
# "Tests"), in the order the precompiling child takes them: roughly the opposite of the session's
# first use, so that the two meet in the middle.
FAMILIES = [
    ("fp32", "none", "parallel"), ("fp64", "none", "serial"), ("bf16", "none", "serial"),
    ("fp32", "gelu", "serial"), ("fp32", "silu", "serial"), ("fp32", "relu", "serial"),
]


def _start(cmd: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=dict(os.environ, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class Precompiler(threading.Thread):
    """Runs ``normkit precompile`` for each family in turn, one child at a time (one spare core). Only
    a speed-up: a family the child has not finished is compiled by the session itself."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.lock = threading.Lock()
        self.stopped = False
        self.child: subprocess.Popen | None = None

    def run(self) -> None:
        for dtype, activation, mode in FAMILIES:
            with self.lock:  # no child starts after stop()
                if self.stopped:
                    return
                self.child = _start([sys.executable, "-m", "normkit.cli", "precompile", "--dtypes", dtype,
                                     "--activations", activation, "--modes", mode])
            self.child.communicate()

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            if self.child is not None and self.child.poll() is None:
                self.child.kill()


def pytest_collection_finish(session):
    """Start work beside the session as soon as the selection is known, so that it uses the second
    core while this session mostly waits on numba compiling on one:
    * the Triton interpreter's run of the kernel tests (minutes of single-threaded Python), when its
      test is selected; the test collects the result;
    * for a run of more than a few files, ``normkit precompile`` of the kernel families the run needs,
      which this session then loads from numba's disk cache instead of compiling them itself."""
    here = Path(__file__).parent
    config = session.config
    if any(item.nodeid.endswith(INTERPRETER_TEST) for item in session.items):
        config.interpreter_run = _start(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning",
             str(here / "test_triton_backend.py"), str(here / "test_contract.py"), "-k", "triton"],
            TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1",
        )
    if len({item.path for item in session.items}) > 5:
        config.precompiler = Precompiler()
        config.precompiler.start()


def pytest_sessionfinish(session):
    precompiler = getattr(session.config, "precompiler", None)
    if precompiler is not None:
        precompiler.stop()
    run = getattr(session.config, "interpreter_run", None)
    if run is not None and run.poll() is None:
        run.kill()
        run.communicate()
