"""cross_entropy over upsampled logits against the float64 reference (F.interpolate then
F.cross_entropy, itself checked against F.cross_entropy at matching sizes): values and
gradients for every reduction, class weights, label smoothing, label dtype, layout and dtype.
The Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (pytest -m triton)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import segkernels
from helpers import (
    DEVICES,
    FLOAT_DTYPES,
    assert_no_nan,
    compile_launches_for_sm90,
    gradcheck,
    record_triton_launches,
    requires_kernels,
    run_opcheck,
    to_layout,
)
from segkernels._library import triton_available, triton_runs_on
from segkernels.ops.cross_entropy import reference_cross_entropy

pytestmark = requires_kernels
ops = torch.ops.segkernels

# (N, C, h, w, H, W, align_corners): FCN's stride 8, DeepLab's 65 -> 513 scale with corners
# aligned (non-integer), odd sizes, one input pixel, one axis unchanged, same size.
CONFIGS = [
    (2, 19, 4, 8, 32, 64, False),
    (1, 21, 9, 9, 65, 65, True),
    (2, 5, 7, 5, 23, 17, False),
    (1, 4, 3, 5, 10, 13, True),
    (2, 3, 1, 1, 5, 4, False),
    (1, 6, 5, 4, 5, 11, False),
    (2, 7, 6, 5, 6, 5, False),
]
IDS = [f"{c[2]}x{c[3]}-to-{c[4]}x{c[5]}-ac{int(c[6])}" for c in CONFIGS]

# Per dtype (rtol, atol) for the loss and the gradient against float64.
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 1e-6), torch.float16: (5e-3, 1e-4),
       torch.bfloat16: (3e-2, 1e-3)}


def _case(n, c, h, w, H, W, dtype=torch.float32, device="cpu", ignore=-100, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    t = torch.randint(0, c, (n, H, W), generator=g)
    t[torch.rand(n, H, W, generator=g) < 0.3] = ignore
    return x, t.to(device)


def _expected(x, t, weight=None, **kw):
    """The float64 reference's loss and its gradient for the incoming gradient 1 (per element)."""
    xd = x.detach().double().cpu().requires_grad_()
    loss = reference_cross_entropy(xd, t.cpu(), None if weight is None else weight.double().cpu(), **kw)
    (grad,) = torch.autograd.grad(loss, xd, torch.ones_like(loss))
    return loss, grad


def _ours(x, t, weight=None, **kw):
    xi = x.detach().clone().requires_grad_()
    loss = segkernels.cross_entropy(xi, t, weight, **kw)
    (grad,) = torch.autograd.grad(loss, xi, torch.ones_like(loss))
    return loss, grad


def _assert_matches(ours, expected, dtype):
    rtol, atol = TOL[dtype]
    for a, b in zip(ours, expected):
        assert_no_nan(a)
        torch.testing.assert_close(a.cpu().double(), b, rtol=rtol, atol=atol)


def test_reference_is_f_cross_entropy_at_matching_sizes_and_after_interpolate():
    x, t = _case(2, 5, 6, 7, 6, 7, torch.float64)
    w = torch.rand(5, dtype=torch.float64)
    for kw in ({}, {"weight": w, "label_smoothing": 0.2}, {"reduction": "none"}):
        assert torch.equal(reference_cross_entropy(x, t, **kw), F.cross_entropy(x, t, **kw))
    x, t = _case(2, 5, 3, 4, 7, 9, torch.float64)
    up = F.interpolate(x, size=(7, 9), mode="bilinear")
    assert torch.equal(reference_cross_entropy(x, t), F.cross_entropy(up, t))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(config, reduction, device):
    n, c, h, w, H, W, ac = config
    for dtype in (torch.float64, torch.float32):
        x, t = _case(n, c, h, w, H, W, dtype, device)
        kw = dict(reduction=reduction, align_corners=ac)
        _assert_matches(_ours(x, t, **kw), _expected(x, t, **kw), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS[:4], ids=IDS[:4])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_class_weights_and_label_smoothing(config, smoothing, weighted, device):
    n, c, h, w, H, W, ac = config
    x, t = _case(n, c, h, w, H, W, torch.float64, device, ignore=255)
    weight = torch.rand(c, dtype=torch.float64, device=device) + 0.1 if weighted else None
    for reduction in ("mean", "sum", "none"):
        kw = dict(ignore_index=255, reduction=reduction, label_smoothing=smoothing, align_corners=ac)
        _assert_matches(_ours(x, t, weight, **kw), _expected(x, t, weight, **kw), torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtypes(dtype, device):
    # 16-bit logits are read as they are, computed in float32 and returned in their dtype; the
    # gradient comes in the input's dtype.
    x, t = _case(2, 19, 4, 8, 32, 64, dtype, device)
    loss, grad = _ours(x, t, label_smoothing=0.1)
    assert loss.dtype == dtype and grad.dtype == dtype
    _assert_matches((loss, grad), _expected(x, t, label_smoothing=0.1), dtype)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_label_dtypes(label_dtype):
    x, t = _case(2, 5, 3, 4, 9, 11, torch.float64, ignore=100)
    kw = dict(ignore_index=100, reduction="none")
    _assert_matches(_ours(x, t.to(label_dtype), **kw), _expected(x, t, **kw), torch.float64)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_any_input_layout_and_its_gradient_keeps_channels_last(layout):
    x, t = _case(2, 6, 5, 7, 17, 22, torch.float64)
    xl = to_layout(x, layout).requires_grad_()
    loss = segkernels.cross_entropy(xl, t.transpose(1, 2).contiguous().transpose(1, 2))  # strided labels too
    (grad,) = torch.autograd.grad(loss, xl)
    _assert_matches((loss, grad), _expected(x, t), torch.float64)
    if layout == "channels_last":
        assert grad.is_contiguous(memory_format=torch.channels_last)


def test_large_logits_and_temperature_like_scales():
    # Logits up to about 1e4: the loss is formed as (m - z_t) + log s, so it keeps its low bits.
    for scale in (1e-3, 1.0, 1e2, 1e4):
        x, t = _case(2, 7, 4, 5, 13, 16, torch.float32, scale=scale)
        ours = _ours(x, t)
        expected = _expected(x, t)
        torch.testing.assert_close(ours[0].double(), expected[0], rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(ours[1].double(), expected[1], rtol=1e-4, atol=1e-6)


def test_ignored_pixels_images_and_batches():
    x, t = _case(3, 4, 3, 3, 9, 9, torch.float64)
    t[1] = -100  # a fully ignored image
    _assert_matches(_ours(x, t), _expected(x, t), torch.float64)
    t[:] = -100  # every pixel: "sum" is 0, "mean" NaN (as F.cross_entropy), the gradient 0
    for reduction in ("sum", "mean", "none"):
        loss, grad = _ours(x, t, reduction=reduction)
        ref = reference_cross_entropy(x, t, reduction=reduction)
        torch.testing.assert_close(loss, ref, equal_nan=True)
        assert grad.eq(0).all()
    assert _ours(x, t, reduction="sum")[0].item() == 0.0


def test_empty_batch():
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    t = torch.zeros(0, 9, 9, dtype=torch.long)
    assert segkernels.cross_entropy(x, t, reduction="none").shape == (0, 9, 9)
    loss = segkernels.cross_entropy(x, t, reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == x.shape


def test_gradcheck():
    x, t = _case(1, 4, 3, 4, 7, 9, torch.float64, ignore=255)
    x.requires_grad_()
    w = torch.rand(4, dtype=torch.float64)
    gradcheck(lambda v: segkernels.cross_entropy(v, t, w, ignore_index=255, label_smoothing=0.2), (x,))
    gradcheck(lambda v: segkernels.cross_entropy(v, t, ignore_index=255, reduction="none", align_corners=True), (x,))
    torch.autograd.gradgradcheck(lambda v: segkernels.cross_entropy(v, t, ignore_index=255), (x,))


def test_backward_is_bitwise_repeatable_across_thread_counts():
    x, t = _case(2, 19, 16, 16, 128, 128, torch.float32)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_ours(x, t))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in results[1:]:
        assert torch.equal(grad, results[0][1])


@pytest.mark.parametrize("level", ["NO_AVX2", "NO_AVX512"])
def test_cpu_code_paths_agree_with_the_reference(level, monkeypatch):
    monkeypatch.setenv(f"SEGKERNELS_{level}", "1")
    x, t = _case(2, 19, 4, 8, 32, 64, torch.float32)
    _assert_matches(_ours(x, t, label_smoothing=0.1), _expected(x, t, label_smoothing=0.1), torch.float32)
    xb = x.bfloat16()
    _assert_matches(_ours(xb, t), _expected(xb, t), torch.bfloat16)


def test_autocast_gives_float32_like_f_cross_entropy():
    x, t = _case(2, 5, 3, 4, 9, 11, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = segkernels.cross_entropy(x, t)
        ref = F.cross_entropy(F.interpolate(x, size=(9, 11), mode="bilinear"), t)
    assert loss.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(loss.double(), _expected(x, t)[0], rtol=1e-5, atol=1e-6)


def test_nonfinite_logits_give_nan_where_f_cross_entropy_does():
    x, t = _case(1, 3, 3, 3, 7, 7, torch.float64)
    t[:] = 1
    x[0, 0, 1, 1] = float("nan")
    ours = segkernels.cross_entropy(x, t, reduction="none")
    assert torch.equal(ours.isnan(), reference_cross_entropy(x, t, reduction="none").isnan())


def test_argument_errors():
    x, t = _case(2, 3, 4, 4, 8, 8)
    with pytest.raises(TypeError, match="input must be a floating"):
        segkernels.cross_entropy(x.long(), t)
    with pytest.raises(ValueError, match=r"input must be \(N, C, h, w\)"):
        segkernels.cross_entropy(x[0], t)
    with pytest.raises(TypeError, match="target must be an integer"):
        segkernels.cross_entropy(x, t.float())
    with pytest.raises(ValueError, match="target's batch"):
        segkernels.cross_entropy(x, t[:1])
    with pytest.raises(ValueError, match="at least as large"):
        segkernels.cross_entropy(x, t[:, :2])
    with pytest.raises(ValueError, match=r"target must be \(N, H, W\)"):
        segkernels.cross_entropy(x, t[0])
    with pytest.raises(ValueError, match=r"weight must be \(C,\)"):
        segkernels.cross_entropy(x, t, torch.ones(4))
    with pytest.raises(TypeError, match="weight must be a floating"):
        segkernels.cross_entropy(x, t, torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="weight must not require grad"):
        segkernels.cross_entropy(x, t, torch.ones(3, requires_grad=True))
    with pytest.raises(ValueError, match="reduction"):
        segkernels.cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        segkernels.cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(TypeError, match="align_corners"):
        segkernels.cross_entropy(x, t, align_corners=1)
    bad = t.clone()
    bad[1, 2, 3] = 3
    with pytest.raises(IndexError, match=r"target holds 1 labels outside \[0, 3\)"):
        segkernels.cross_entropy(x, bad)
    bad[1, 2, 3] = 255  # uint8 label maps and the default ignore_index=-100: 255 is a class
    with pytest.raises(IndexError, match="target holds"):
        segkernels.cross_entropy(x, bad.clamp_min(0).to(torch.uint8))


def test_direct_op_calls_are_checked():
    x, t = _case(1, 3, 4, 4, 8, 8)
    with pytest.raises(ValueError, match="H >= h"):
        ops.cross_entropy(x, t[:, :2], None, -100, 0.0, False, False, False)
    with pytest.raises(TypeError, match="integer"):
        ops.cross_entropy(x, t.float(), None, -100, 0.0, False, False, False)
    with pytest.raises(ValueError, match="label_smoothing"):
        ops.cross_entropy(x, t, None, -100, 2.0, False, False, False)
    with pytest.raises(ValueError, match="weight"):
        ops.cross_entropy(x, t, torch.ones(2), -100, 0.0, False, False, False)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype, ac, per_pixel in ((torch.float32, False, False), (torch.float64, True, True)):
        x, t = _case(2, 5, 3, 4, 7, 9, dtype, device)
        w = torch.rand(5, dtype=dtype, device=device)
        run_opcheck(ops.cross_entropy.default, (x.requires_grad_(), t, w, -100, 0.1, ac, per_pixel, True))
        log_sum = ops.cross_entropy(x, t, w, -100, 0.1, ac, True, True)[2]
        g = torch.rand(2, 7, 9, dtype=log_sum.dtype, device=device)
        run_opcheck(ops.cross_entropy_backward.default, (g, x.detach(), t, w, log_sum, -100, 0.1, ac))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device):
    x, t = _case(2, 5, 3, 4, 7, 9, torch.float32, device)

    def step(v):
        return segkernels.cross_entropy(v, t, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    la, lb = compiled(a), step(b)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(a.grad, b.grad)


def test_transforms_jvp_vmap_and_hessian():
    x, t = _case(2, 4, 3, 3, 7, 8, torch.float64)
    tangent = torch.randn_like(x)

    def ours(v, reduction="mean"):
        return segkernels.cross_entropy(v, t, label_smoothing=0.1, reduction=reduction)

    def ref(v, reduction="mean"):
        return reference_cross_entropy(v, t, label_smoothing=0.1, reduction=reduction)

    for reduction in ("mean", "none"):
        a = torch.func.jvp(lambda v: ours(v, reduction), (x,), (tangent,))
        b = torch.func.jvp(lambda v: ref(v, reduction), (x,), (tangent,))
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.func.hessian(ours)(x), torch.func.hessian(ref)(x))
    torch.testing.assert_close(torch.func.jacrev(ours)(x), torch.func.jacrev(ref)(x))
    # Per-sample losses and gradients under vmap.
    xs = torch.randn(3, 1, 4, 3, 3, dtype=torch.float64)
    ts = torch.randint(0, 4, (3, 1, 7, 8))
    per = torch.vmap(lambda v, y: segkernels.cross_entropy(v, y))(xs, ts)
    grads = torch.vmap(torch.func.grad(lambda v, y: segkernels.cross_entropy(v, y)))(xs, ts)
    for i in range(3):
        xi = xs[i].clone().requires_grad_()
        ref_i = reference_cross_entropy(xi, ts[i])
        torch.testing.assert_close(per[i], ref_i.detach())
        torch.testing.assert_close(grads[i], torch.autograd.grad(ref_i, xi)[0])


def test_module():
    x, t = _case(2, 5, 3, 4, 7, 9, torch.float64, ignore=255)
    w = torch.rand(5, dtype=torch.float64)
    module = segkernels.nn.CrossEntropyLoss(weight=w, ignore_index=255, label_smoothing=0.1, align_corners=True)
    ref = reference_cross_entropy(x, t, w, ignore_index=255, label_smoothing=0.1, align_corners=True)
    torch.testing.assert_close(module(x, t), ref)
    assert "ignore_index=255" in repr(module)
    assert module.state_dict()["weight"] is not None  # a buffer, moved with .to() as nn.CrossEntropyLoss's


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_triton_kernels_match_reference(config):
    from segkernels.ops.cross_entropy import triton as tk

    n, c, h, w, H, W, ac = config
    x, t = _case(n, c, h, w, H, W, torch.float32, ignore=255)
    if not triton_runs_on(x):
        pytest.skip("run with TRITON_INTERPRET=1 to exercise the Triton kernels on CPU tensors")
    weight = torch.rand(c) + 0.1 if config is CONFIGS[0] else None
    smoothing = 0.1 if config is CONFIGS[1] else 0.0
    layouts = ("contiguous", "channels_last") if config is CONFIGS[2] else ("contiguous",)
    for layout in layouts:
        xl = to_layout(x, layout)
        loss, wsum, log_sum = tk._forward_triton(xl, t, weight, 255, smoothing, ac, True, True)
        rows, wsum2, empty = tk._forward_triton(xl, t, weight, 255, smoothing, ac, False, False)
        kw = dict(ignore_index=255, label_smoothing=smoothing, align_corners=ac, reduction="none")
        exp_loss, _ = _expected(x, t, weight, **kw)
        torch.testing.assert_close(loss.double(), exp_loss, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(rows.double(), exp_loss.sum(-1), rtol=2e-5, atol=1e-5)
        assert torch.equal(wsum, wsum2) and empty.numel() == 0
        g = torch.rand(n, H, W)
        grad = tk._backward_triton(g, xl, t, weight, log_sum, 255, smoothing, ac)
        xd = x.double().requires_grad_()
        wd = None if weight is None else weight.double()
        (exp_grad,) = torch.autograd.grad(reference_cross_entropy(xd, t, wd, **kw), xd, g.double())
        torch.testing.assert_close(grad.double(), exp_grad, rtol=1e-4, atol=1e-6)
        if layout == "channels_last":
            assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_out_of_range_labels_give_nan():
    from segkernels.ops.cross_entropy import triton as tk

    x, t = _case(1, 3, 2, 2, 4, 4, torch.float32)
    if not triton_runs_on(x):
        pytest.skip("run with TRITON_INTERPRET=1 to exercise the Triton kernels on CPU tensors")
    t[0, 1, 2] = 7
    loss, _, _ = tk._forward_triton(x, t, None, -100, 0.0, False, True, False)
    assert loss[0, 1, 2].isnan() and loss.isnan().sum() == 1


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_kernels_compile_for_sm90():
    from segkernels.ops.cross_entropy import triton as tk

    def run():
        for dtype in (torch.float32, torch.bfloat16):
            x, t = _case(1, 19, 4, 8, 32, 64, dtype)
            loss, _, log_sum = tk._forward_triton(x, t, None, -100, 0.0, False, False, True)
            tk._backward_triton(torch.ones(1, 32, 64), x, t, None, log_sum, -100, 0.0, False)

    launches = record_triton_launches(tk, run)
    assert compile_launches_for_sm90(launches) == {"_forward_kernel", "_backward_kernel"}
