"""The kd_loss / seg_kd_loss Triton kernels on CPU tensors under TRITON_INTERPRET=1 (float32, tiny
grids) against the float64 eager reference, and their ahead-of-time compilation for sm_90."""

import pytest
import torch

from helpers import (
    assert_close,
    compile_launches_for_sm90,
    record_triton_launches,
    requires_kernels,
    to_layout,
)
from kd_cases import _inputs, _labels, _nan_teacher_case
from segkernels._library import triton_available
from segkernels.ops.kd_loss import reference_kd_loss, reference_seg_kd_loss

pytestmark = requires_kernels


def _triton_or_skip(t):
    from segkernels._library import triton_runs_on

    if not triton_runs_on(t):
        pytest.skip("needs TRITON_INTERPRET=1 (CPU) or a CUDA device")


def _reference_op(students, teacher, labels, temperature, spatial, kl, scale_by_t2, ignore_index):
    """What the kd_loss op returns (the (K, N, ...) loss maps and each student's gradient of the sum
    of its map), from the float64 eager reference, in the inputs' dtype."""
    maps, grads = [], []
    for s in students:
        s64 = s.detach().double().requires_grad_()
        m = reference_kd_loss(s64, teacher.double(), temperature=temperature, axis="spatial" if spatial else "channel",
                              labels=labels, ignore_index=ignore_index, divergence="kl" if kl else "ce",
                              reduction="none", scale_by_t2=scale_by_t2)
        (g,) = torch.autograd.grad(m.sum(), s64)
        maps.append(m.detach())
        grads.append(g.to(s.dtype))
    return torch.stack(maps).float(), grads


def _reference_seg_op(student, teacher, labels, class_weight, temperature, hard_weight, soft_weight, ignore_index):
    """What the seg_kd_loss op returns (the loss and the student's gradient), from the float64
    eager reference."""
    s64 = student.detach().double().requires_grad_()
    w = class_weight.double() if class_weight is not None else None
    loss = reference_seg_kd_loss(s64, teacher.double(), labels, temperature=temperature, hard_weight=hard_weight,
                                 soft_weight=soft_weight, class_weight=w, ignore_index=ignore_index)
    (g,) = torch.autograd.grad(loss, s64)
    return loss.detach().float(), g.to(student.dtype)


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_channel_kernel_under_interpreter(layout):
    from segkernels.ops.kd_loss.triton import _kd_loss_triton

    shape = (2, 5, 7, 11)
    students, teacher = _inputs(shape, torch.float32, "cpu", k=5)
    _triton_or_skip(teacher)
    masked = torch.rand(shape) < 0.2
    masked[:, 0] = False  # every position keeps some mass
    students = [to_layout(s.detach().masked_fill(masked, float("-inf")), layout) for s in students]
    teacher = to_layout(teacher.masked_fill(masked, float("-inf")), layout)
    labels = _labels(shape, "cpu")
    labels[1] = 255  # a fully ignored image
    for kl in (True, False):
        loss, grads, _ = _kd_loss_triton(students, teacher, labels, 2.0, False, 0 if kl else 1, True, 255)
        ref, ref_grads = _reference_op(students, teacher, labels, 2.0, False, kl, True, 255)
        assert_close(loss, ref)
        for g, r in zip(grads, ref_grads):  # T * (p_s - p_t): absolute error ~ T * eps
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
        assert (torch.stack(grads)[:, 1] == 0).all() and (loss[:, 1] == 0).all()
    loss, grads, _ = _kd_loss_triton(students[:1], teacher * 1e4, None, 0.1, False, 0, False, 255)
    ref, ref_grads = _reference_op(students[:1], teacher * 1e4, None, 0.1, False, True, False, 255)
    # log-probabilities of magnitude 3e5 resolve to 0.03 in float32 (loss not T^2-scaled here)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=0.1)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-5, atol=1e-5)  # (p_s - p_t) / T


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_spatial_kernel_under_interpreter():
    from segkernels.ops.kd_loss.triton import _kd_loss_triton

    shape = (2, 3, 17, 31)  # rows of 527 > one block: exercises the online softmax
    students, teacher = _inputs(shape, torch.float32, "cpu", k=2)
    _triton_or_skip(teacher)
    students = [s.detach() for s in students]
    teacher = teacher.masked_fill(torch.rand(shape) < 0.2, float("-inf"))
    teacher[0, 1, :8] = float("-inf")  # a whole leading segment of a row without mass
    students[1][1, 2, 9:] = float("-inf")  # and a whole trailing one, on the student side
    for kl in (True, False):
        loss, grads, _ = _kd_loss_triton(students, teacher, None, 3.0, True, 0 if kl else 1, True, 255)
        ref, ref_grads = _reference_op(students, teacher, None, 3.0, True, kl, True, 255)
        assert_close(loss, ref)
        for g, r in zip(grads, ref_grads):
            assert_close(g, r)


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("weighted", [False, True])
def test_triton_seg_kd_kernel_under_interpreter(weighted):
    from segkernels.ops.kd_loss.triton import _seg_kd_loss_triton

    shape = (2, 4, 9, 10)
    students, teacher = _inputs(shape, torch.float32, "cpu")
    _triton_or_skip(teacher)
    s = students[0].detach()
    labels = _labels(shape, "cpu")
    w = torch.rand(4) + 0.5 if weighted else None
    for temperature in (1.0, 2.0):
        loss, grad, _ = _seg_kd_loss_triton(s, teacher, labels, w, temperature, 0.7, 1.2, 255)
        ref, ref_grad = _reference_seg_op(s, teacher, labels, w, temperature, 0.7, 1.2, 255)
        assert_close(loss, ref)
        assert_close(grad, ref_grad)
    loss, grad, _ = _seg_kd_loss_triton(s, teacher, torch.full_like(labels, 255), w, 2.0, 1.0, 1.0, 255)
    assert loss.item() == 0 and (grad == 0).all()
    # An out-of-range label once read the class weight and the logit past their ends (a
    # crash). With no host synchronisation allowed, it now poisons the loss and the gradient.
    for bad in (4, 100000, -3):
        wrong = labels.clone()
        wrong[0, 0, 0] = bad
        loss, grad, _ = _seg_kd_loss_triton(s, teacher, wrong, w, 1.0, 1.0, 1.0, 255)
        counted = ((wrong >= 0) & (wrong < 4)).unsqueeze(1).expand_as(grad)
        assert loss.isnan() and grad[counted].isnan().all() and (grad[~counted] == 0).all()


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_extremes_match_the_reference():
    # The Triton kernels shift by the raw maximum as the C++ ones do (_shifted, shifted_logit):
    # the maximum's term stays exactly 1 at temperature 1e-10, and rows spanning more than the
    # float range stay finite. Spatial rows of 2000 run in several segments, merged in torch.
    from segkernels.ops.kd_loss.triton import _kd_loss_triton, _seg_kd_loss_triton

    g = torch.Generator().manual_seed(13)
    teacher = torch.randn(2, 5, 4, 6, generator=g)
    _triton_or_skip(teacher)
    students = [torch.randn(2, 5, 4, 6, generator=g) for _ in range(2)]
    long_t, long_s = torch.randn(1, 2, 2000, generator=g), torch.randn(1, 2, 2000, generator=g)
    long_t[0, 1] = torch.linspace(-1, 1, 2000)  # the maximum rises through every segment
    big = 0.9 * torch.finfo(torch.float32).max
    spanning, long_spanning = [x.clone() for x in students], long_s.clone()
    spanning[1][0, 0], spanning[1][0, 1] = big, -big
    long_spanning[0, 0, 5], long_spanning[0, 0, 1500] = big, -big
    for temperature, ss, ls in ((1e-10, students, long_s), (4.0, spanning, long_spanning)):
        for spatial, s, t in ((False, ss, teacher), (True, ss, teacher), (True, [ls], long_t)):
            loss, grads, _ = _kd_loss_triton(s, t, None, temperature, spatial, 0, False, 255)
            ref, ref_grads = _reference_op(s, t, None, temperature, spatial, True, False, 255)
            assert torch.isfinite(loss).all(), (temperature, spatial)
            torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
            for gr, r in zip(grads, ref_grads):
                torch.testing.assert_close(gr, r, rtol=1e-5, atol=1e-5 * max(1.0, float(r.abs().max())))
    labels = torch.randint(0, 5, (2, 4, 6), generator=g)
    labels[0, 0, :5] = 1  # the -big class: a cross-entropy past the range, a mean within it
    # The soft terms of one block summed past the float range before their scale (0 here, or
    # soft_weight / count): NaN where the CPU kernel, which sums in double, stayed finite.
    for soft_weight in (0.0, 0.01):  # (at 1 the true total is past the range)
        loss, grad, _ = _seg_kd_loss_triton(spanning[1], teacher, labels, None, 4.0, 0.05, soft_weight, 255)
        ref, ref_grad = _reference_seg_op(spanning[1], teacher, labels, None, 4.0, 0.05, soft_weight, 255)
        assert torch.isfinite(loss), soft_weight
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("spatial", [False, True])
def test_triton_nan_teacher_under_interpreter(spatial):
    from segkernels.ops.kd_loss.triton import _kd_loss_triton

    s, teacher = _nan_teacher_case("cpu")
    _triton_or_skip(teacher)
    loss, _, _ = _kd_loss_triton([s], teacher, None, 1.0, spatial, 0, True, 255)
    assert loss.isnan().sum() == 1


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_kernels_compile_for_sm90_without_a_gpu():
    """Ahead-of-time compilation (Triton to cubin) of every kernel launch the launchers make,
    for an H100/H200: checks what the interpreter cannot (types, constexpr branches, code
    generation) on a machine without a GPU."""
    import segkernels.ops.kd_loss.triton as mod

    def run():
        for dtype in (torch.float32, torch.bfloat16):
            t = torch.randn(2, 5, 4, 6).to(dtype)
            students = [torch.randn(2, 5, 4, 6).to(dtype) for _ in range(5)]  # groups of 4 and 1
            labels = torch.randint(0, 5, (2, 4, 6))
            for divergence in (0, 1, 2, 3):  # kl, ce, reverse_kl, js
                mod._kd_loss_triton(students, t, labels, 2.0, False, divergence, True, 255)
                mod._kd_loss_triton(students[:2], t, None, 2.0, True, divergence, True, 255)
            mod._kd_loss_triton(students[:1], t.contiguous(memory_format=torch.channels_last), None, 2.0, False, 0,
                                True, 255)
            for weight in (None, torch.rand(5)):
                mod._seg_kd_loss_triton(students[0], t, labels, weight, 2.0, 1.0, 1.0, 255)
            # The teacher's gradient: the channel kernel's second pass and the spatial pass 3.
            for divergence in (0, 1, 2, 3):
                mod._kd_loss_triton(students[:2], t, labels, 2.0, False, divergence, True, 255, True, 0.3)
                mod._kd_loss_triton(students[:1], t, None, 2.0, True, divergence, True, 255, True, 0.3)
            mod._seg_kd_loss_triton(students[0], t, labels, None, 2.0, 1.0, 1.0, 255, True)

    launches = record_triton_launches(mod, run)
    assert all(kw.get("enable_fp_fusion") is False for _, _, kw in launches)
    assert compile_launches_for_sm90(launches) == {
        "_kd_channel_kernel", "_kd_spatial_stats_kernel", "_kd_spatial_apply_kernel", "_kd_spatial_teacher_kernel",
        "_kd_spatial_sums_kernel", "_kd_spatial_grads_kernel",
    }
