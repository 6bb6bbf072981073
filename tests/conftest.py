"""Test configuration.

The suite runs the real Triton kernels: on a machine without a GPU through Triton's interpreter,
which deco_ops switches on when DECO_OPS_BACKEND=triton is set before it is imported (here, before
any test module imports it). Tests pick the backend per case with ``deco_ops.use_backend``.
"""

import os

os.environ.setdefault("DECO_OPS_BACKEND", "triton")

import pytest  # noqa: E402
import torch  # noqa: E402

import deco_ops  # noqa: E402,F401  (switches the interpreter on before any kernel is decorated)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests and larger fuzz budgets")


def pytest_configure(config):
    if config.getoption("--runslow"):
        os.environ["DECO_OPS_RUNSLOW"] = "1"


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("DECO_OPS_RUNSLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["triton", "auto"])
def backend(request):
    """Each test runs on the Triton kernels and on the default backend (reference on CPU)."""
    with deco_ops.use_backend(request.param):
        yield request.param


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
