"""ps_assemble / ps_assemble_dense (InstanceFCN position-sensitive assembly) against the
plain-indexing reference, a Python-loop version, and the CUDA kernels' element functions."""

import os
import subprocess
import sys

import pytest
import torch

import segkernels
from helpers import (
    DEVICES,
    FLOAT_DTYPES,
    assert_close,
    assert_no_nan,
    gradcheck,
    requires_kernels,
    run_opcheck,
    get_testing_ops,
    to_layout,
)
from segkernels.ops.ps_assemble import dense_windows, reference_ps_assemble, reference_ps_assemble_dense

pytestmark = requires_kernels
ops = torch.ops.segkernels

# (N, G, k, m, H, W): the paper's 5 x 5 grid on 21 x 21 windows, uneven cells, k = 1, k = m,
# and a map smaller than the window.
CONFIGS = [
    (2, 1, 5, 21, 19, 23),
    (3, 2, 3, 7, 9, 11),
    (1, 3, 1, 4, 5, 6),
    (2, 1, 4, 4, 6, 7),
    (2, 2, 2, 9, 3, 4),
]


def _scores(n, g, k, h, w, dtype=torch.float32, device="cpu"):
    return torch.randn(n, g * k * k, h, w, device=device).to(dtype)


def _windows(n, m, h, w, r, device="cpu"):
    """Random windows inside, across and wholly beyond the borders."""
    b = torch.randint(0, max(n, 1), (r,))
    y0 = torch.randint(-m - 2, h + 3, (r,))
    x0 = torch.randint(-m - 2, w + 3, (r,))
    return torch.stack([b, y0, x0], dim=1).to(device)


def _loop_assemble(scores, windows, k, m, pad):
    """The definition, one element at a time (tiny inputs only)."""
    n, c, h, w = scores.shape
    g = c // (k * k)
    out = torch.empty(windows.shape[0], g, m, m, dtype=scores.dtype)
    for r, (b, y0, x0) in enumerate(windows.tolist()):
        for gi in range(g):
            for u in range(m):
                for v in range(m):
                    y, x = y0 + u, x0 + v
                    ch = gi * k * k + (u * k // m) * k + (v * k // m)
                    out[r, gi, u, v] = scores[b, ch, y, x] if 0 <= y < h and 0 <= x < w else pad
    return out


def _grad_reference(scores, windows, k, m, grad, dense_stride=None):
    """Reference gradient computed in float64, cast to the input dtype."""
    s = scores.detach().double().requires_grad_(True)
    if dense_stride is None:
        out = reference_ps_assemble(s, windows, k, m)
    else:
        out = reference_ps_assemble_dense(s, k, m, dense_stride)
    (g,) = torch.autograd.grad(out, s, grad.double())
    return g.to(scores.dtype)


# ----------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_forward_matches_reference(device, dtype, config):
    n, g, k, m, h, w = config
    scores = _scores(n, g, k, h, w, dtype, device)
    windows = _windows(n, m, h, w, 37, device)
    for pad in (0.0, -6.0):
        out = segkernels.ps_assemble(scores, windows, k=k, m=m, pad_value=pad)
        assert out.shape == (37, g, m, m) and out.is_contiguous()
        assert_no_nan(out)
        assert_close(out, reference_ps_assemble(scores, windows, k, m, pad), exact=True)
    dense = segkernels.ps_assemble_dense(scores, k=k, m=m, stride=2, pad_value=1.5)
    assert_no_nan(dense)
    assert_close(dense, reference_ps_assemble_dense(scores, k, m, 2, 1.5), exact=True)


def test_forward_matches_python_loop():
    for n, g, k, m, h, w in [(2, 2, 3, 5, 4, 6), (1, 1, 2, 3, 2, 2), (2, 1, 3, 3, 5, 4)]:
        scores = _scores(n, g, k, h, w, torch.float64)
        windows = _windows(n, m, h, w, 9)
        expected = _loop_assemble(scores, windows, k, m, -2.0)
        assert_close(reference_ps_assemble(scores, windows, k, m, -2.0), expected, exact=True)
        assert_close(segkernels.ps_assemble(scores, windows, k=k, m=m, pad_value=-2.0), expected, exact=True)


def test_paper_cells():
    # m = 21, k = 5: cells of 5, 4, 4, 4, 4 along each axis.
    scores = torch.arange(25, dtype=torch.float32).view(1, 25, 1, 1).expand(1, 25, 21, 21).contiguous()
    out = segkernels.ps_assemble(scores, torch.tensor([[0, 0, 0]]), k=5, m=21)[0, 0]
    rows = out[:, 0].tolist()
    assert rows == [0.0] * 5 + [5.0] * 4 + [10.0] * 4 + [15.0] * 4 + [20.0] * 4
    assert out[0].tolist() == [0.0] * 5 + [1.0] * 4 + [2.0] * 4 + [3.0] * 4 + [4.0] * 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts_read_in_place(device, layout):
    n, g, k, m, h, w = 2, 2, 3, 7, 9, 10
    scores = _scores(n, g, k, h, w, device=device)
    windows = _windows(n, m, h, w, 20, device)
    arranged = to_layout(scores, layout)
    # windows as a non-contiguous view too
    wide = torch.zeros(20, 6, dtype=torch.int64, device=device)
    wide[:, ::2] = windows
    out = segkernels.ps_assemble(arranged, wide[:, ::2], k=k, m=m, pad_value=0.5)
    assert_close(out, reference_ps_assemble(scores, windows, k, m, 0.5), exact=True)
    dense = segkernels.ps_assemble_dense(arranged, k=k, m=m, stride=3)
    assert_close(dense, reference_ps_assemble_dense(scores, k, m, 3), exact=True)
    s = arranged.detach().requires_grad_(True)
    grad = torch.randn(20, g, m, m, device=device)
    (gs,) = torch.autograd.grad(segkernels.ps_assemble(s, windows, k=k, m=m), s, grad)
    assert_close(gs, _grad_reference(scores, windows, k, m, grad))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_windows_and_batch(device):
    scores = _scores(2, 1, 3, 5, 6, device=device).requires_grad_(True)
    none = torch.zeros(0, 3, dtype=torch.int64, device=device)
    out = segkernels.ps_assemble(scores, none, k=3, m=7)
    assert out.shape == (0, 1, 7, 7)
    (g,) = torch.autograd.grad(out.sum(), scores)
    assert torch.equal(g, torch.zeros_like(g))
    empty = _scores(0, 2, 3, 5, 6, device=device).requires_grad_(True)
    assert segkernels.ps_assemble(empty, none, k=3, m=7).shape == (0, 2, 7, 7)
    dense = segkernels.ps_assemble_dense(empty, k=3, m=7, stride=2)
    assert dense.shape == (0, 2, 3, 3, 7, 7)
    # Zero-height and zero-width maps: every cell is padding, in the reference too.
    for h, w in ((0, 6), (5, 0)):
        flat = torch.randn(1, 4, h, w, device=device)
        win = torch.tensor([[0, -1, 0]], device=device)
        expected = torch.full((1, 1, 3, 3), 2.0, device=device)
        assert torch.equal(segkernels.ps_assemble(flat, win, k=2, m=3, pad_value=2.0), expected)
        assert torch.equal(reference_ps_assemble(flat, win, 2, 3, 2.0), expected)
    (g,) = torch.autograd.grad(dense.sum(), empty)
    assert g.shape == empty.shape


# ----------------------------------------------------------------------------------------------
# Backward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_backward_matches_reference(device, dtype, config):
    n, g, k, m, h, w = config
    scores = _scores(n, g, k, h, w, dtype, device).requires_grad_(True)
    windows = _windows(n, m, h, w, 41, device)
    out = segkernels.ps_assemble(scores, windows, k=k, m=m, pad_value=3.0)
    grad = torch.randn_like(out)
    (gs,) = torch.autograd.grad(out, scores, grad)
    assert gs.dtype == dtype and gs.shape == scores.shape
    assert_no_nan(gs)
    assert_close(gs, _grad_reference(scores, windows, k, m, grad))
    for stride in (1, 3):
        dense = segkernels.ps_assemble_dense(scores, k=k, m=m, stride=stride)
        grad = torch.randn_like(dense)
        (gs,) = torch.autograd.grad(dense, scores, grad)
        assert_no_nan(gs)
        assert_close(gs, _grad_reference(scores, None, k, m, grad, dense_stride=stride))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("threads", [1, 2, 7])
def test_cuda_element_functions_on_cpu_match_cpu_kernels_bitwise(dtype, threads):
    # The CUDA kernels' per-element forward and gather backward, run on the CPU, agree bit for
    # bit with the CPU kernels (tiled copies, per-plane accumulation in the same order). The CPU
    # kernels split small inputs into window chunks and row bands by the thread count.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _element_functions_match(dtype)
    finally:
        torch.set_num_threads(before)


def _element_functions_match(dtype):
    for n, g, k, m, h, w in CONFIGS:
        scores = _scores(n, g, k, h, w, dtype)
        windows = _windows(n, m, h, w, 150)
        out = segkernels.ps_assemble(scores, windows, k=k, m=m, pad_value=-1.0)
        assert_close(get_testing_ops().ps_assemble_elementwise(scores, windows, k, m, 1, -1.0, False), out, exact=True)
        grad = torch.randn_like(out)
        size = list(scores.shape)
        expected = ops.ps_assemble_backward(grad, windows, size, k, m)
        assert_close(get_testing_ops().ps_assemble_backward_gather(grad, windows, size, k, m), expected, exact=True)
        for stride in (1, 2, 5):
            dense = segkernels.ps_assemble_dense(scores, k=k, m=m, stride=stride, pad_value=2.0)
            assert_close(get_testing_ops().ps_assemble_elementwise(scores, windows, k, m, stride, 2.0, True), dense, exact=True)
            grad = torch.randn_like(dense)
            expected = ops.ps_assemble_dense_backward(grad, size, k, m, stride)
            got = get_testing_ops().ps_assemble_dense_backward_gather(grad, size, k, m, stride)
            assert_close(got, expected, exact=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_dense_equals_sparse_on_all_windows(device, dtype, stride):
    n, g, k, m, h, w = 2, 2, 3, 7, 10, 9
    scores = _scores(n, g, k, h, w, dtype, device).requires_grad_(True)
    windows = dense_windows(n, h, w, m, stride, device)
    ho, wo = -(-h // stride), -(-w // stride)
    dense = segkernels.ps_assemble_dense(scores, k=k, m=m, stride=stride, pad_value=-0.5)
    sparse = segkernels.ps_assemble(scores, windows, k=k, m=m, pad_value=-0.5)
    as_dense = sparse.view(n, ho, wo, g, m, m).permute(0, 3, 1, 2, 4, 5)
    assert_close(dense, as_dense.contiguous(), exact=True)
    grad = torch.randn_like(dense)
    (gd,) = torch.autograd.grad(dense, scores, grad)
    (gs,) = torch.autograd.grad(sparse, scores, grad.permute(0, 2, 3, 1, 4, 5).reshape(sparse.shape))
    # Both sum in (row, column) window order: the same bits.
    assert_close(gd, gs, exact=True)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_deterministic_with_heavy_overlap(device):
    n, g, k, m, h, w = 2, 2, 5, 21, 24, 24
    scores = _scores(n, g, k, h, w, device=device).requires_grad_(True)
    # 3000 windows crowded on a small map: every score element is copied by many windows.
    windows = torch.stack(
        [torch.randint(0, n, (3000,)), torch.randint(-12, 8, (3000,)), torch.randint(-12, 8, (3000,))], 1
    ).to(device)
    out = segkernels.ps_assemble(scores, windows, k=k, m=m)
    grad = torch.randn_like(out)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = torch.autograd.grad(out, scores, grad, retain_graph=True)[0]
        for _ in range(3):
            assert torch.equal(torch.autograd.grad(out, scores, grad, retain_graph=True)[0], first)
        # a permutation of windows with equal (b, y0) keys aside, the order is fixed by the windows
        dense = segkernels.ps_assemble_dense(scores, k=k, m=m)
        gd = torch.randn_like(dense)
        a = torch.autograd.grad(dense, scores, gd, retain_graph=True)[0]
        assert torch.equal(torch.autograd.grad(dense, scores, gd)[0], a)
    finally:
        torch.use_deterministic_algorithms(previous)
    # sums of up to ~50 float32 terms: compare with a tolerance that allows for their rounding
    torch.testing.assert_close(first, _grad_reference(scores, windows, k, m, grad), rtol=1e-5, atol=2e-5)


def test_gradcheck_and_gradgradcheck():
    # full Jacobians on a small case, fast mode (random projections) on a larger one
    small = _scores(2, 2, 2, 3, 4, torch.float64).requires_grad_(True)  # (2, 8, 3, 4)
    few = _windows(2, 3, 3, 4, 4)
    gradcheck(lambda s: segkernels.ps_assemble(s, few, k=2, m=3, pad_value=0.7), (small,))
    gradcheck(lambda s: segkernels.ps_assemble_dense(s, k=2, m=3, stride=2, pad_value=0.7), (small,))
    assert torch.autograd.gradgradcheck(lambda s: segkernels.ps_assemble(s, few, k=2, m=3), (small,))
    assert torch.autograd.gradgradcheck(lambda s: segkernels.ps_assemble_dense(s, k=2, m=3, stride=2), (small,))
    n, g, k, m, h, w = 2, 1, 3, 7, 6, 8
    scores = _scores(n, g, k, h, w, torch.float64).requires_grad_(True)
    windows = _windows(n, m, h, w, 10)
    gradcheck(lambda s: segkernels.ps_assemble(s, windows, k=k, m=m, pad_value=0.7), (scores,), fast_mode=True)
    gradcheck(lambda s: segkernels.ps_assemble_dense(s, k=k, m=m, pad_value=0.7), (scores,), fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    n, g, k, m, h, w = 2, 2, 2, 5, 6, 7
    scores = _scores(n, g, k, h, w, device=device).requires_grad_(True)
    windows = _windows(n, m, h, w, 8, device)
    run_opcheck(ops.ps_assemble.default, (scores, windows, k, m, -1.0))
    run_opcheck(ops.ps_assemble.default, (scores.contiguous(memory_format=torch.channels_last), windows, k, m, 0.0))
    run_opcheck(ops.ps_assemble_dense.default, (scores, k, m, 2, 0.5))
    grad = torch.randn(8, g, m, m, device=device, requires_grad=True)
    run_opcheck(ops.ps_assemble_backward.default, (grad, windows, [n, g * k * k, h, w], k, m))
    dgrad = torch.randn(n, g, 3, 4, m, m, device=device, requires_grad=True)
    run_opcheck(ops.ps_assemble_dense_backward.default, (dgrad, [n, g * k * k, h, w], k, m, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device):
    torch._dynamo.reset()
    head = torch.nn.Conv2d(3, 2 * 9, 1).to(device)

    def masks(x, windows):
        scores = head(x)
        sparse = segkernels.ps_assemble(scores, windows, k=3, m=7, check_windows=False)
        dense = segkernels.ps_assemble_dense(scores, k=3, m=7, stride=2)
        return sparse.sigmoid().sum() + dense.square().mean()

    x = torch.randn(2, 3, 9, 10, device=device)
    windows = _windows(2, 7, 9, 10, 12, device)
    compiled = torch.compile(masks, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, windows), masks(x, windows))
    compiled(x, windows).backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()
    # the default batch-index check is a host read: it compiles with a graph break
    checked = torch.compile(
        lambda s, wi: segkernels.ps_assemble(s, wi, k=3, m=7), backend="aot_eager"
    )
    s = head(x).detach()
    assert_close(checked(s, windows), reference_ps_assemble(s, windows, 3, 7), exact=True)


# ----------------------------------------------------------------------------------------------
# Errors: one test per error, a clear Python exception naming the argument


def test_error_batch_index_out_of_range():
    scores = _scores(2, 1, 3, 5, 5)
    for bad in (2, -1):
        windows = torch.tensor([[0, 0, 0], [bad, 1, 1]])
        with pytest.raises(IndexError, match=r"windows\[1, 0\]"):
            segkernels.ps_assemble(scores, windows, k=3, m=5)


def test_unchecked_invalid_batch_rows_are_pad_with_zero_gradient():
    scores = _scores(2, 1, 3, 5, 5).requires_grad_(True)
    windows = torch.tensor([[0, 0, 0], [5, 1, 1], [-3, 0, 0], [1, -2, 1]])
    out = segkernels.ps_assemble(scores, windows, k=3, m=5, pad_value=-4.0, check_windows=False)
    assert torch.equal(out[1:3], torch.full_like(out[1:3], -4.0))
    keep = windows[[0, 3]]
    assert_close(out[[0, 3]], reference_ps_assemble(scores, keep, 3, 5, -4.0), exact=True)
    grad = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, scores, grad)
    assert_close(g, _grad_reference(scores, keep, 3, 5, grad[[0, 3]]), exact=True)


def test_error_channels_not_multiple_of_k_squared():
    with pytest.raises(ValueError, match="multiple of k \\* k = 9"):
        segkernels.ps_assemble(torch.randn(1, 10, 5, 5), torch.zeros(1, 3, dtype=torch.int64), k=3, m=5)
    with pytest.raises(ValueError, match="multiple of k \\* k = 4"):
        segkernels.ps_assemble_dense(torch.randn(1, 6, 5, 5), k=2, m=5)


def test_error_scores_dtype():
    with pytest.raises(TypeError, match="scores must be a floating tensor"):
        segkernels.ps_assemble(torch.ones(1, 9, 5, 5, dtype=torch.int32), torch.zeros(1, 3, dtype=torch.int64), k=3, m=5)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor"):
        segkernels.ps_assemble_dense([[1.0]], k=1, m=1)


def test_error_scores_shape():
    with pytest.raises(ValueError, match=r"scores must have shape \(N, G \* k \* k, H, W\)"):
        segkernels.ps_assemble(torch.randn(9, 5, 5), torch.zeros(1, 3, dtype=torch.int64), k=3, m=5)


def test_error_windows_dtype():
    with pytest.raises(TypeError, match="windows must be int64"):
        segkernels.ps_assemble(torch.randn(1, 9, 5, 5), torch.zeros(1, 3, dtype=torch.int32), k=3, m=5)
    with pytest.raises(TypeError, match="windows must be a torch.Tensor"):
        segkernels.ps_assemble(torch.randn(1, 9, 5, 5), [[0, 0, 0]], k=3, m=5)


def test_error_windows_shape():
    for shape in [(4,), (2, 4), (2, 3, 1)]:
        with pytest.raises(ValueError, match=r"windows must have shape \(R, 3\)"):
            segkernels.ps_assemble(torch.randn(1, 9, 5, 5), torch.zeros(shape, dtype=torch.int64), k=3, m=5)


def test_error_windows_device():
    with pytest.raises(ValueError, match="windows must be on the device of scores"):
        segkernels.ps_assemble(torch.randn(1, 9, 5, 5), torch.zeros(1, 3, dtype=torch.int64, device="meta"), k=3, m=5)


def test_error_k_and_m():
    scores = torch.randn(1, 9, 5, 5)
    windows = torch.zeros(1, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="k must be <= m"):
        segkernels.ps_assemble(scores, windows, k=3, m=2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        segkernels.ps_assemble_dense(scores, k=0, m=2)
    with pytest.raises(TypeError, match="m must be an int"):
        segkernels.ps_assemble(scores, windows, k=3, m=5.0)


def test_error_stride_and_pad_value():
    scores = torch.randn(1, 9, 5, 5)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        segkernels.ps_assemble_dense(scores, k=3, m=5, stride=0)
    with pytest.raises(TypeError, match="pad_value must be a real number"):
        segkernels.ps_assemble_dense(scores, k=3, m=5, pad_value="0")


def test_direct_op_calls_are_checked_in_cpp():
    scores = torch.randn(1, 9, 5, 5)
    w = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="multiple of k"):
        ops.ps_assemble(torch.randn(1, 8, 5, 5), w, 3, 5, 0.0)
    with pytest.raises(ValueError, match="1 <= k <= m"):
        ops.ps_assemble(scores, w, 3, 2, 0.0)
    with pytest.raises(TypeError, match="windows must be int64"):
        ops.ps_assemble(scores, w.int(), 3, 5, 0.0)
    with pytest.raises(ValueError, match="windows must have shape"):
        ops.ps_assemble(scores, w.view(3, 2), 3, 5, 0.0)
    with pytest.raises(ValueError, match="grad_output must have shape"):
        ops.ps_assemble_backward(torch.randn(2, 1, 5, 4), w, [1, 9, 5, 5], 3, 5)
    with pytest.raises(ValueError, match="stride must be positive"):
        ops.ps_assemble_dense(scores, 3, 5, 0, 0.0)
    with pytest.raises(ValueError, match="grad_output must have shape"):
        ops.ps_assemble_dense_backward(torch.randn(1, 1, 5, 5, 5, 4), [1, 9, 5, 5], 3, 5, 1)
    # an unchecked invalid batch index never reads out of bounds
    far = torch.tensor([[7, 0, 0], [-9, 0, 0], [0, 2**62, -(2**62)]])
    out = ops.ps_assemble(scores, far, 3, 5, 1.0)
    assert torch.equal(out, torch.ones_like(out))


# ----------------------------------------------------------------------------------------------
# InstanceFCN head


def test_instancefcn_head():
    head = segkernels.nn.InstanceFCNHead(6, k=3, m=7, hidden=8)
    x = torch.randn(2, 6, 11, 12, requires_grad=True)
    scores, objectness = head(x)
    assert scores.shape == (2, 9, 11, 12) and objectness.shape == (2, 1, 11, 12)
    gen = torch.Generator().manual_seed(3)
    windows = head.sample_windows(objectness, n=5, generator=gen)
    assert windows.shape == (10, 3) and windows.dtype == torch.int64
    assert windows[:5, 0].eq(0).all() and windows[5:, 0].eq(1).all()
    assert (windows[:, 1] + 3).ge(0).all() and (windows[:, 1] + 3).lt(11).all()
    again = head.sample_windows(objectness, n=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(windows, again)
    masks = segkernels.ps_assemble(scores, windows, k=3, m=7)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(masks, torch.rand_like(masks))
    loss.backward()
    assert x.grad is not None and head.instance[0].weight.grad is not None
    win, obj, props = head.propose(scores.detach(), objectness.detach(), top_n=4)
    assert win.shape == (8, 3) and obj.shape == (8,) and props.shape == (8, 1, 7, 7)
    best = objectness.detach().flatten(1).max(1).values
    assert torch.equal(obj.view(2, 4)[:, 0], best)
    centre = win[0, 1:] + 3
    assert objectness[0, 0, centre[0], centre[1]] == best[0]
    assert_close(props, reference_ps_assemble(scores.detach(), win, 3, 7), exact=True)
    assert head.propose(scores, objectness, top_n=1000)[0].shape == (2 * 11 * 12, 3)
    with pytest.raises(ValueError, match="k <= m"):
        segkernels.nn.InstanceFCNHead(4, k=5, m=3)
    for make, error, message in (
        (lambda: segkernels.nn.InstanceFCNHead(4, k=2.5), TypeError, "k must be an int"),
        (lambda: segkernels.nn.InstanceFCNHead(0), ValueError, "in_channels must be >= 1"),
        (lambda: head.propose(scores, objectness, top_n=-1), ValueError, "top_n must be >= 0"),
        (lambda: head.sample_windows(objectness, n=2.5), TypeError, "n must be an int"),
    ):
        with pytest.raises(error, match=f"^{message}"):
            make()


def test_import_without_kernels_falls_back_to_reference():
    code = (
        "import torch, segkernels\n"
        "from segkernels.ops.ps_assemble import reference_ps_assemble\n"
        "assert not segkernels.kernels_available()\n"
        "s = torch.randn(2, 9, 6, 7)\n"
        "w = torch.tensor([[0, -2, 1], [1, 3, 4], [4, 0, 0]])\n"
        "out = segkernels.ps_assemble(s, w, k=3, m=5, pad_value=-1.0, check_windows=False)\n"
        "assert torch.equal(out[2], torch.full_like(out[2], -1.0))\n"
        "assert torch.equal(out[:2], reference_ps_assemble(s, w[:2], 3, 5, -1.0))\n"
        "assert segkernels.ps_assemble_dense(s, k=3, m=5, stride=2).shape == (2, 1, 3, 4, 5, 5)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, SEGKERNELS_DISABLE_KERNELS="1")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# ----------------------------------------------------------------------------------------------
# CUDA against CPU: same element functions and summation order, so the same bits


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cuda_matches_cpu_bitwise(dtype):
    for n, g, k, m, h, w in CONFIGS + [(4, 2, 5, 21, 64, 64)]:
        scores = _scores(n, g, k, h, w, dtype).requires_grad_(True)
        windows = _windows(n, m, h, w, 500)
        sc = scores.detach().cuda().requires_grad_(True)
        out = segkernels.ps_assemble(scores, windows, k=k, m=m, pad_value=-1.0)
        outc = segkernels.ps_assemble(sc, windows.cuda(), k=k, m=m, pad_value=-1.0)
        assert_close(outc.cpu(), out, exact=True)
        grad = torch.randn_like(out)
        (g_cpu,) = torch.autograd.grad(out, scores, grad)
        (g_cuda,) = torch.autograd.grad(outc, sc, grad.cuda())
        assert_close(g_cuda.cpu(), g_cpu, exact=True)
        for stride in (1, 2):
            d = segkernels.ps_assemble_dense(scores, k=k, m=m, stride=stride)
            dc = segkernels.ps_assemble_dense(sc, k=k, m=m, stride=stride)
            assert_close(dc.cpu(), d, exact=True)
            grad = torch.randn_like(d)
            (g_cpu,) = torch.autograd.grad(d, scores, grad)
            (g_cuda,) = torch.autograd.grad(dc, sc, grad.cuda())
            assert_close(g_cuda.cpu(), g_cpu, exact=True)
