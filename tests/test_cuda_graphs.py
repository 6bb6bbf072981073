"""Every op can be captured in a CUDA graph and replayed (docs/cuda-graphs.md): after one warm-up
call outside the capture (strategy decision, autotuning, compilation, cached geometry tables), a
call does no host sync and allocates only from the capture's pool. A replay on new inputs, copied
into the captured ones, gives what an eager call on those inputs gives.

CUDA only (skipped on a CPU: the interpreter has no streams to capture). Value checks stay at
CUDA's default (off): a check that reads a tensor's values on the host is a sync, which a capture
refuses.
"""

import pytest
import torch

import deco_ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

DTYPE = torch.bfloat16


@pytest.fixture(autouse=True)
def no_value_checks(monkeypatch):
    monkeypatch.setenv("DECO_OPS_CHECKS", "0")


def _randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=DTYPE)


def _linear(out_features, in_features):
    return _randn(out_features, in_features) * in_features**-0.5, _randn(out_features)


def _replay_matches_eager(fn, *inputs):
    """Warm up, capture ``fn(*inputs)``, replay on fresh floating inputs, compare with eager."""
    static = [t.clone() for t in inputs]
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*static)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fn(*static)
        fresh = [torch.randn_like(t) if t.is_floating_point() else t for t in inputs]
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        expected = fn(*fresh)
    torch.cuda.synchronize()
    captured = captured[0] if isinstance(captured, tuple) else captured
    expected = expected[0] if isinstance(expected, tuple) else expected
    torch.testing.assert_close(captured, expected, atol=0, rtol=0)  # the same kernels on the same values


def test_pooling_ops_capture():
    x = _randn(2, 24 * 24, 64)
    _replay_matches_eager(lambda x: deco_ops.adaptive_avg_pool_tokens(x, (24, 24), (12, 12)), x)
    _replay_matches_eager(lambda x: deco_ops.bilinear_pool_tokens(x, (24, 24), (8, 8)), x)


def test_projector_ops_capture():
    x = _randn(1, 24 * 24, 128)
    (w1, b1), (w2, b2) = _linear(256, 128), _linear(192, 256)
    kw = dict(grid=(24, 24), out_grid=(12, 12))
    _replay_matches_eager(lambda x: deco_ops.pool_linear(x, w1, b1, **kw), x)
    _replay_matches_eager(lambda x: deco_ops.pool_mlp(x, w1, b1, w2, b2, **kw), x)
    _replay_matches_eager(lambda x: deco_ops.mlp_pool(x, w1, b1, w2, b2, **kw), x)


def test_merge_ops_capture():
    x = _randn(16 * 16, 64)
    nw, nb = _randn(64), _randn(64)
    (w1, b1), (w2, b2) = _linear(256, 256), _linear(128, 256)
    _replay_matches_eager(lambda x: deco_ops.merge_mlp(x, nw, nb, w1, b1, w2, b2), x)


def test_packed_ops_refuse_capture_clearly():
    """A packed call copies its geometry table to the GPU: refused inside a capture, with a clear
    error, rather than captured from a host buffer that is reused later."""
    grids = torch.tensor([[24, 24], [12, 20]])
    packed = _randn(24 * 24 + 12 * 20, 64)
    deco_ops.adaptive_avg_pool_tokens_packed(packed, grids, stride=2)  # warm-up
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match="CUDA graph cannot capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            deco_ops.adaptive_avg_pool_tokens_packed(packed, grids, stride=2)


@pytest.mark.parametrize("keys", ["dense", "kv_lens", "shared_queries"])
def test_cross_attention_captures(keys):
    B, M, N, H, D = 4, 32, 257, 12, 64
    q = _randn(1 if keys == "shared_queries" else B, M, H, D)
    k, v = _randn(B, N, H, D), _randn(B, N, H, D)
    lens = torch.tensor([257, 100, 1, 200], device="cuda", dtype=torch.int32) if keys == "kv_lens" else None
    _replay_matches_eager(lambda q, k, v: deco_ops.cross_attention(q, k, v, kv_lens=lens), q, k, v)


def test_modules_capture():
    torch.manual_seed(0)
    proj = deco_ops.DeCoProjector(128, 192, grid=(24, 24), out_grid=(12, 12)).cuda().to(DTYPE)
    _replay_matches_eager(proj, _randn(1, 24 * 24, 128))
    attn = deco_ops.CrossAttention(256, 4, batch_first=True).cuda().to(DTYPE).eval()
    kv = _randn(2, 65, 256)
    _replay_matches_eager(lambda q, kv: attn(q, kv, kv, need_weights=False)[0], _randn(2, 8, 256), kv)
    resampler = deco_ops.QueryResampler(16, 256, 128, 4).cuda().to(DTYPE).eval()
    _replay_matches_eager(resampler, _randn(2, 65, 128))
    merger = deco_ops.PatchMergerProjector(64, 128).cuda().to(DTYPE)
    _replay_matches_eager(merger, _randn(16 * 16, 64))


def test_training_step_captures():
    """Forward and backward (every backward op) through ``torch.cuda.make_graphed_callables``."""
    torch.manual_seed(0)
    proj = deco_ops.DeCoProjector(128, 192, grid=(24, 24), out_grid=(12, 12)).cuda()
    x = torch.randn(2, 24 * 24, 128, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(proj, (x,))
    fresh = torch.randn_like(x).requires_grad_(True)
    dy = torch.randn(2, 144, 192, device="cuda")
    (graphed(fresh) * dy).sum().backward()
    captured = [fresh.grad] + [p.grad.clone() for p in proj.parameters()]
    proj.zero_grad()
    eager_x = fresh.detach().clone().requires_grad_(True)
    (proj(eager_x) * dy).sum().backward()
    for got, want in zip(captured, [eager_x.grad] + [p.grad for p in proj.parameters()]):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_reduce_overhead_compile_matches_eager():
    """``torch.compile(mode="reduce-overhead")``: Inductor launches the kernels (triton_op) inside
    its CUDA graph."""
    torch.manual_seed(0)
    proj = deco_ops.DeCoProjector(128, 192, grid=(24, 24), out_grid=(12, 12)).cuda().to(DTYPE)
    compiled = torch.compile(proj, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(3):  # warm-up runs, then the recorded graph replays
            x = _randn(1, 24 * 24, 128)
            torch.testing.assert_close(compiled(x), proj(x), atol=2e-2, rtol=2e-2)
