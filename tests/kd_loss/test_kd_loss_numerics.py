"""kd_loss numerics at the edges: large logits, extreme temperatures, rows spanning more than the
float range, -inf logits and NaN teachers, against the float64 eager reference."""

import pytest
import torch

import segkernels
from helpers import DEVICES, requires_kernels
from kd_cases import _check, _inputs, _nan_teacher_case
from segkernels.ops.kd_loss import reference_kd_loss, reference_seg_kd_loss

pytestmark = requires_kernels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axis", ["channel", "spatial"])
@pytest.mark.parametrize("temperature", [0.1, 1.0, 100.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_logits_and_temperatures(device, axis, temperature, dtype):
    shape = (2, 6, 5, 7)
    students, teacher = _inputs(shape, dtype, device, scale=1e4)
    # float32 resolves log-probabilities of magnitude |logit| / T to about 1e-7 of that, and the
    # loss is then scaled by T^2: the tolerances follow those magnitudes.
    t2 = temperature**2
    loss_atol = 2e-7 * t2 * 1e4 / temperature * 10
    if dtype == torch.float32:
        tol = ((1e-4, loss_atol), (1e-4, 2e-6 * temperature))
    else:  # the float32 arithmetic error, then bfloat16 rounding of the result
        tol = ((1.6e-2, max(loss_atol, 1e-2)), (1.6e-2, 1e-2))
    _check(students, teacher, temperature=temperature, axis=axis, tol=tol)
    _check(students, teacher, temperature=temperature, axis=axis, reduction="none", tol=tol)
    # identical student and teacher: KL is 0 (no cancellation error at this magnitude)
    same = segkernels.kd_loss(teacher.clone().requires_grad_(), teacher, temperature=temperature, axis=axis)
    assert abs(same.item()) < 1e-3


def _check_finite_and_close(s, t, **kw):
    """kd_loss and its gradient finite and within 1e-5 (relative) of the float64 reference; the
    gradient's tolerance scales with its largest entry (of order 1 / T at extreme temperatures)."""
    got = segkernels.kd_loss(s, t, **kw)
    ref_s = s.detach().double().requires_grad_()
    ref = reference_kd_loss(ref_s, t.double(), **kw)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)
    (grad,) = torch.autograd.grad(got.sum(), s)
    ref.sum().backward()
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), ref_s.grad, rtol=1e-5, atol=1e-5 * float(ref_s.grad.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axis", ["channel", "spatial"])
@pytest.mark.parametrize("dtype,temperature", [(torch.float32, 1e-10), (torch.float64, 1e-20)], ids=str)
def test_extreme_temperatures_keep_the_maximum_at_zero(device, axis, dtype, temperature):
    # |logit| / T far past 2**24 (2**53): each log-probability must subtract the maximum of the
    # very values it is computed from. A fused multiply-add in one place and a rounded product in
    # the other left a positive residual at the maximum: exp overflowed to inf, the loss read
    # -inf or NaN (the CPU kernels' AVX2 build).
    g = torch.Generator().manual_seed(7)
    s = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    t = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    for reduction in ("sum", "none"):
        _check_finite_and_close(s, t, temperature=temperature, axis=axis, reduction=reduction, scale_by_t2=False)
    if axis == "channel":
        labels = torch.randint(0, 5, (2, 4, 6), generator=g).to(device)
        got = segkernels.seg_kd_loss(s, t, labels, temperature=temperature)
        ref = reference_seg_kd_loss(s.detach().double(), t.double(), labels, temperature=temperature)
        assert torch.isfinite(got) and abs(float(got.detach()) - float(ref)) <= 1e-5 * abs(float(ref))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,temperature", [(torch.float32, 1e-10), (torch.float64, 1e-20)], ids=str)
def test_extreme_temperatures_on_rows_past_the_stored_length(device, dtype, temperature):
    # Rows longer than the CPU's stored-row limit (32768) take the online softmax, whose running
    # maximum rises from chunk to chunk and rescales the sum by exp((m_old - m_new) / T): at
    # this temperature that factor is 0, and the maximum's own term must still be exactly 1.
    g = torch.Generator().manual_seed(11)
    shape = (1, 2, 32942)
    s = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    t[0, 1] = torch.linspace(-1, 1, shape[-1], dtype=torch.float64)  # a new maximum in every chunk
    s = s.to(device=device, dtype=dtype).requires_grad_()
    t = t.to(device=device, dtype=dtype)
    _check_finite_and_close(s, t, temperature=temperature, axis="spatial", reduction="none", scale_by_t2=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("length", [5, 40000], ids=["short", "past-the-stored-length"])
def test_rows_spanning_more_than_the_float_range(device, dtype, length):
    # Logits near -max and +max in one row: x - max overflows to -inf, (x - max) / T need not.
    # Subtracting first (0d777c0) turned such losses into inf, and seg_kd_loss with
    # soft_weight=0 into NaN (0 * inf), where the reference stays finite.
    big = 0.9 * torch.finfo(dtype).max
    s = torch.zeros(1, 2, length, dtype=torch.float64)
    t = torch.zeros(1, 2, length, dtype=torch.float64)
    s[0, :, 0], s[0, :, 1] = big, -big
    t[0, :, 1] = 5.0
    s, t = s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)
    for temperature in (4.0, 1e30):
        # (The channel axis over 40000 classes would test float32 summation instead.)
        cases = [("spatial", s, t)] + ([("channel", s.transpose(1, 2), t.transpose(1, 2))] if length < 100 else [])
        for axis, x, y in cases:
            got = segkernels.kd_loss(x, y, temperature=temperature, axis=axis, reduction="none", scale_by_t2=False)
            ref = reference_kd_loss(x.double(), y.double(), temperature=temperature, axis=axis, reduction="none",
                                    scale_by_t2=False)
            assert torch.isfinite(got).all(), (axis, temperature, got)
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    if dtype == torch.float64:
        return  # the float64 reference itself overflows in seg_kd_loss's T^2 soft term
    x, y = s[:, :, :3].transpose(1, 2).contiguous(), t[:, :, :3].transpose(1, 2).contiguous()  # (1, 3, 2): 3 classes
    labels = torch.tensor([[2, 2]], device=device)  # a cross-entropy of big: finite
    got = segkernels.seg_kd_loss(x, y, labels, temperature=4.0, soft_weight=0.0)
    ref = reference_seg_kd_loss(x.double(), y.double(), labels, temperature=4.0, soft_weight=0.0)
    assert not torch.isnan(got)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)
    # With the T^2 soft term the true total (about 5 big) is past the float32 range: inf, as a
    # float32 sum gives, where the CPU kernel's double total once made fill_ raise.
    got = segkernels.seg_kd_loss(x, y, labels, temperature=4.0)
    assert float(reference_seg_kd_loss(x.double(), y.double(), labels, temperature=4.0)) > torch.finfo(dtype).max
    assert got == float("inf")
    # A label on the -big class: its cross-entropy (1.8 big) passes the range, the mean of it
    # and of an ordinary position does not.
    x2 = torch.cat([x, torch.randn(1, 3, 1, dtype=dtype, device=device)], 2)
    y2 = torch.cat([y, torch.randn(1, 3, 1, dtype=dtype, device=device)], 2)
    labels = torch.tensor([[1, 1, 0]], device=device)
    got = segkernels.seg_kd_loss(x2, y2, labels, temperature=4.0, hard_weight=0.25, soft_weight=0.0)
    ref = reference_seg_kd_loss(x2.double(), y2.double(), labels, temperature=4.0, hard_weight=0.25, soft_weight=0.0)
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_temperatures_past_the_arithmetic_range_are_refused(device):
    # 1 / T or T^2 past float32 made the maximum's own term 0 * inf: a NaN loss without a word.
    s = torch.randn(2, 3, 4, device=device)
    t = torch.randn(2, 3, 4, device=device)
    labels = torch.zeros(2, 4, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="1 / T overflows"):
        segkernels.kd_loss(s, t, temperature=1e-39)
    with pytest.raises(ValueError, match=r"T\^2 .* overflows .* scale_by_t2=False"):
        segkernels.kd_loss(s.bfloat16(), t.bfloat16(), temperature=1e20)
    with pytest.raises(ValueError, match="temperature=1e\\+20"):
        segkernels.seg_kd_loss(s, t, labels, temperature=1e20)
    assert torch.isfinite(segkernels.kd_loss(s, t, temperature=1e20, scale_by_t2=False))
    assert torch.isfinite(segkernels.kd_loss(s, t, temperature=1e-37))
    assert torch.isfinite(segkernels.kd_loss(s.double(), t.double(), temperature=1e20))
    assert torch.isfinite(segkernels.seg_kd_loss(s.double(), t.double(), labels, temperature=1e-39))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1e4, 1e15, 1e30])
def test_one_class_kl_is_exactly_zero_at_any_temperature(device, temperature):
    # One class: both softmaxes are exactly 1, so KL is 0, even after the T^2 scale.
    s = torch.tensor([[0.3], [1.7]], dtype=torch.float64, device=device)
    t = torch.tensor([[-0.5], [2.0]], dtype=torch.float64, device=device)
    got = segkernels.kd_loss(s, t, temperature=temperature, reduction="none")
    assert torch.equal(got, torch.zeros(2, dtype=torch.float64, device=device)), got


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axis", ["channel", "spatial"])
@pytest.mark.parametrize("divergence", ["kl", "ce"])
def test_minus_inf_logits(device, axis, divergence):
    shape = (2, 5, 4, 6)
    students, teacher = _inputs(shape, torch.float32, device)
    masked = torch.rand(shape, device=device) < 0.3
    masked[:, 0] = False  # every distribution keeps some mass
    masked.view(2, 5, -1)[:, :, 0] = False
    teacher = teacher.masked_fill(masked, float("-inf"))
    s = students[0].detach().masked_fill(masked, float("-inf")).requires_grad_()
    out = segkernels.kd_loss(s, teacher, axis=axis, divergence=divergence, reduction="none")
    assert torch.isfinite(out).all()
    _check([s], teacher, axis=axis, divergence=divergence, reduction="none")
    (g,) = torch.autograd.grad(out.sum(), s)
    assert torch.isfinite(g).all()
    # teacher mass where the student has -inf: infinite KL, still a finite gradient, no NaN
    s2 = students[0].detach().clone()
    s2[:, 1, 0] = float("-inf")
    s2.requires_grad_()
    t2 = torch.randn(shape, device=device)
    out2 = segkernels.kd_loss(s2, t2, axis=axis, divergence=divergence, reduction="none")
    assert not torch.isnan(out2).any() and torch.isinf(out2).any()
    (g2,) = torch.autograd.grad(out2.sum(), s2)
    assert torch.isfinite(g2).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axis", ["channel", "spatial"])
def test_nan_teacher_gives_nan_where_it_reaches(device, axis):
    # It once read as pt == 0 and gave a loss of 0 (with a NaN gradient): F.kl_div gives NaN.
    s, teacher = _nan_teacher_case(device)
    out = segkernels.kd_loss(s, teacher, axis=axis, reduction="none")
    ref = reference_kd_loss(s, teacher, axis=axis, reduction="none")
    expected = torch.zeros_like(out, dtype=torch.bool)
    if axis == "channel":
        expected[0, 2, 3] = True  # the one position
    else:
        expected[0, 1] = True  # the one (n, c) row
    assert torch.equal(out.isnan(), expected) and torch.equal(ref.isnan(), expected)
    assert torch.isnan(segkernels.kd_loss(s, teacher, axis=axis))
