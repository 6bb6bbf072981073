"""The harness's bounds themselves: what ``assert_close`` lets through and what it catches."""

import pytest
import torch

from harness import DEVICE, TOL, assert_close, rel_err


def test_one_wrong_element_fails_where_the_norm_bound_alone_passes():
    """2,700 bf16-rounded values with one element off by 40% of the tensor's rms: the relative norm
    error (~8e-3) is well inside bf16's 2e-2, the per-element bound is not; rounding alone passes."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2700, generator=g, dtype=torch.float64).to(DEVICE)
    rounded = ref.to(torch.bfloat16)
    assert_close(rounded, ref, torch.bfloat16)
    assert_close(rounded, ref, torch.bfloat16, eager=rounded)
    wrong = rounded.clone()
    wrong[1234] += 0.4 * ref.norm().item() / ref.numel() ** 0.5
    assert rel_err(wrong, ref) < TOL[torch.bfloat16] / 2
    with pytest.raises(AssertionError, match="element 1234 "):
        assert_close(wrong, ref, torch.bfloat16)
