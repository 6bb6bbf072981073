"""Where the suite runs (harness.DEVICE) and what that switches: checked on a CPU by asking the
same functions conftest.py uses what they do for a CUDA device."""

import torch

from harness import DEVICE, SeededDrawsFollowDevice, randint, randn, skip_reason, suite_env

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_cuda_run_uses_fixed_configs_and_value_checks():
    assert suite_env(CUDA) == {"DECO_OPS_AUTOTUNE": "0", "DECO_OPS_STRATEGY": "fused", "DECO_OPS_CHECKS": "1"}
    assert suite_env(CPU) == {}


def test_cuda_run_skips_only_duplicates_and_interpreter_tests():
    assert skip_reason(CUDA, "triton", False) is None
    assert skip_reason(CUDA, None, False) is None
    assert "covered by [triton]" in skip_reason(CUDA, "auto", False)
    assert "interpreter" in skip_reason(CUDA, "triton", True)
    assert all(skip_reason(CPU, b, i) is None for b in ("triton", "auto", None) for i in (True, False))


def test_seeded_draws_land_on_the_suite_device_with_the_cpu_generator_values():
    x = randn(3, 4, dtype=torch.float16, generator=torch.Generator().manual_seed(3))
    n = randint(0, 10, (5,), torch.Generator().manual_seed(3), dtype=torch.int32)
    assert x.device.type == n.device.type == DEVICE.type and x.dtype == torch.float16 and n.dtype == torch.int32
    want = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator(device="cpu").manual_seed(3), device="cpu")
    assert torch.equal(x.cpu(), want.half())
    assert torch.equal(n.cpu(), torch.randint(0, 10, (5,), generator=torch.Generator().manual_seed(3), device="cpu").int())
    assert torch.empty(1).device.type == DEVICE.type  # conftest made DEVICE the default device


def test_direct_seeded_draws_follow_the_default_device():
    """What conftest installs on CUDA, with the meta device standing in for the GPU: a CPU generator
    given to a factory draws on the CPU and lands on the default device; other calls are untouched."""
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    with torch.device("meta"), SeededDrawsFollowDevice():
        x = torch.randn(2, 3, generator=g)
        assert not torch.equal(g.get_state(), before)  # drawn on the CPU (a meta draw uses no generator)
        n = torch.randint(0, 5, (4,), generator=g, dtype=torch.int32)
        z = torch.zeros(2)
        c = torch.randn(2, generator=g, device="cpu")
    assert (x.device.type, n.device.type, z.device.type, c.device.type) == ("meta", "meta", "meta", "cpu")
    assert x.shape == (2, 3) and n.dtype == torch.int32
