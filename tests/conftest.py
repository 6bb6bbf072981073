"""Test configuration.

The suite runs the real Triton kernels: on a machine without a GPU through Triton's interpreter,
which deco_ops switches on when DECO_OPS_BACKEND=triton is set before it is imported (here, before
any test module imports it). Tests pick the backend per case with ``deco_ops.use_backend``.

With a GPU present the same tests run on CUDA tensors and the compiled kernels (``harness.DEVICE``
is the one switch; ``harness.suite_env`` sets DECO_OPS_AUTOTUNE=0, DECO_OPS_STRATEGY=fused and DECO_OPS_CHECKS=1 there);
the ``auto`` backend cases (the same Triton path on CUDA) and ``interpreter_only`` tests skip with
their reason.
"""

import os

import pytest
import torch

from harness import DEVICE, SeededDrawsFollowDevice, skip_reason, suite_env

os.environ.setdefault("DECO_OPS_BACKEND", "triton")
for name, value in suite_env(DEVICE).items():
    os.environ.setdefault(name, value)

import deco_ops  # noqa: E402  (switches the interpreter on before any kernel is decorated)
import interpreter_speed  # noqa: E402
from deco_ops import _backend  # noqa: E402

if _backend.interpreting():
    interpreter_speed.install()

if DEVICE.type == "cuda":
    # Tensors the tests create without a device (at collection time too) land on the GPU.
    torch.set_default_device(DEVICE)
    SeededDrawsFollowDevice().__enter__()


@pytest.fixture(autouse=True)
def _seeded_default_generator():
    """Draws made without a generator (a few inputs, dropout's default seed) repeat from run to
    run whatever ran before in the process (test order, xdist's distribution)."""
    torch.manual_seed(0)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests and larger fuzz budgets")


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter_only: checks the Triton interpreter path; skipped on CUDA")
    if config.getoption("--runslow"):
        os.environ["DECO_OPS_RUNSLOW"] = "1"


def pytest_collection_modifyitems(config, items):
    runslow = config.getoption("--runslow") or os.environ.get("DECO_OPS_RUNSLOW") == "1"
    for item in items:
        if "slow" in item.keywords and not runslow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --runslow"))
        reason = skip_reason(DEVICE, None, "interpreter_only" in item.keywords)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(params=["triton", "auto"])
def backend(request):
    """Each test runs on the Triton kernels and on the default backend (reference on CPU)."""
    reason = skip_reason(DEVICE, request.param, False)
    if reason:
        pytest.skip(reason)
    with deco_ops.use_backend(request.param):
        yield request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(scope="module")
def cpu_tensors():
    """CPU tensors by default, also where the suite's tensors default to a GPU: for modules whose
    tests compare on a CPU (the HF tiny models: their processors and mask helpers make CPU tensors)."""
    with torch.device("cpu"):
        yield


@pytest.fixture
def auto_backend():
    """The default backend (what a user gets), whatever DECO_OPS_BACKEND the suite set."""
    with deco_ops.use_backend("auto"):
        yield
