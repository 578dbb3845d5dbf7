"""upsample_argmax against the float64 reference (itself checked against F.interpolate +
torch.argmax): predictions may differ only where the two largest interpolated logits are equal
to rounding. The Triton kernel runs on CPU tensors under TRITON_INTERPRET=1 (pytest -m triton)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import segkernels
from helpers import (
    DEVICES,
    FLOAT_DTYPES,
    compile_launches_for_sm90,
    poison_outputs,
    record_triton_launches,
    requires_kernels,
    run_opcheck,
    to_layout,
)
from segkernels._library import triton_available, triton_runs_on
from segkernels.ops.upsample_argmax import reference_upsample_argmax

pytestmark = requires_kernels
ops = torch.ops.segkernels

# (N, C, h, w, H, W, align_corners): an FCN's stride 8, DeepLab's 65 -> 513 (a non-integer scale
# with align_corners), odd sizes both ways, a single row and column, downsampling, same size.
CONFIGS = [
    (2, 19, 8, 16, 64, 128, False),
    (1, 21, 9, 9, 65, 65, True),
    (2, 5, 7, 5, 23, 17, False),
    (1, 4, 7, 5, 23, 17, True),
    (2, 3, 1, 1, 5, 4, False),
    (1, 6, 12, 10, 5, 7, False),
    (1, 6, 9, 11, 9, 11, True),
]
IDS = [f"{c[2]}x{c[3]}-to-{c[4]}x{c[5]}-ac{int(c[6])}" for c in CONFIGS]


def _logits(n, c, h, w, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g).to(device=device, dtype=dtype)


def assert_argmax_matches(pred, logits, size, align_corners):
    """pred equals the float64 reference except where the reference's two largest values are
    within the kernel's rounding (float32 interpolation unless the logits are float64)."""
    expected = reference_upsample_argmax(logits.cpu(), size, align_corners)
    pred = pred.cpu()
    assert pred.shape == expected.shape and pred.dtype == torch.int64
    differ = pred != expected
    if differ.any():
        up = F.interpolate(logits.cpu().double(), size=tuple(size), mode="bilinear", align_corners=align_corners)
        chosen = up.gather(1, pred.unsqueeze(1)).squeeze(1)
        best = up.gather(1, expected.unsqueeze(1)).squeeze(1)
        eps = 1e-12 if logits.dtype == torch.float64 else 1e-5
        gap = (best - chosen)[differ]
        scale = 1 + up.abs().amax(1)[differ]
        assert bool((gap <= eps * scale).all()), f"{int(differ.sum())} predictions differ, largest gap {gap.max():.3g}"


def test_reference_is_f_interpolate_then_argmax():
    for n, c, h, w, H, W, ac in CONFIGS:
        x = _logits(n, c, h, w, torch.float64)
        expected = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=ac).argmax(1)
        assert torch.equal(reference_upsample_argmax(x, (H, W), ac), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_matches_reference(config, dtype, device):
    n, c, h, w, H, W, ac = config
    x = _logits(n, c, h, w, dtype, device)
    with poison_outputs():
        pred = segkernels.upsample_argmax(x, (H, W), align_corners=ac)
    assert_argmax_matches(pred, x, (H, W), ac)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_any_layout(layout):
    x = to_layout(_logits(2, 7, 9, 13), layout)
    pred = segkernels.upsample_argmax(x, (33, 50))
    assert_argmax_matches(pred, x, (33, 50), False)
    assert torch.equal(pred, segkernels.upsample_argmax(x.contiguous(), (33, 50)))


def test_ties_and_nan_follow_torch_argmax():
    x = torch.zeros(1, 4, 3, 3)
    assert segkernels.upsample_argmax(x, (7, 7)).eq(0).all()  # all equal: the first class
    x[:, 2] = 1.0
    x[:, 3] = 1.0
    assert segkernels.upsample_argmax(x, (7, 7)).eq(2).all()  # a tie between 2 and 3: the first
    x[0, 1, 1, 1] = float("nan")
    pred = segkernels.upsample_argmax(x, (6, 6), align_corners=True)
    expected = F.interpolate(x, size=(6, 6), mode="bilinear", align_corners=True).argmax(1)
    assert torch.equal(pred, expected)
    assert bool((pred == 1).any()) and bool((pred == 2).any())


def test_empty_batch_and_size_arguments():
    x = _logits(0, 3, 4, 4)
    assert segkernels.upsample_argmax(x, (8, 8)).shape == (0, 8, 8)
    y = _logits(1, 3, 4, 4)
    assert torch.equal(segkernels.upsample_argmax(y, torch.Size([8, 6])), segkernels.upsample_argmax(y, [8, 6]))
    assert segkernels.upsample_argmax(y.requires_grad_(), (8, 6)).dtype == torch.int64  # no autograd error


def test_argument_errors():
    x = _logits(1, 3, 4, 4)
    with pytest.raises(TypeError, match="logits must be a floating"):
        segkernels.upsample_argmax(x.long(), (8, 8))
    with pytest.raises(ValueError, match=r"logits must be \(N, C, h, w\)"):
        segkernels.upsample_argmax(x[0], (8, 8))
    with pytest.raises(ValueError, match=r"logits must be \(N, C, h, w\)"):
        segkernels.upsample_argmax(x[:, :0], (8, 8))
    with pytest.raises(ValueError, match="size"):
        segkernels.upsample_argmax(x, (8, 0))
    with pytest.raises(ValueError, match="size"):
        segkernels.upsample_argmax(x, (8, 8, 8))
    with pytest.raises(TypeError, match="size"):
        segkernels.upsample_argmax(x, 8)
    with pytest.raises(TypeError, match="align_corners"):
        segkernels.upsample_argmax(x, (8, 8), align_corners="yes")
    if hasattr(torch, "float8_e4m3fn"):
        with pytest.raises(TypeError, match="logits must be a floating"):
            segkernels.upsample_argmax(x.to(torch.float8_e4m3fn), (8, 8))


def test_direct_op_calls_are_checked():
    x = _logits(1, 3, 4, 4)
    with pytest.raises(TypeError, match="floating"):
        ops.upsample_argmax(x.long(), [8, 8], False)
    with pytest.raises(ValueError, match="size must be positive"):
        ops.upsample_argmax(x, [8, -1], False)
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        ops.upsample_argmax(x[0], [8, 8], False)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    run_opcheck(ops.upsample_argmax.default, (_logits(2, 5, 4, 6, device=device), [9, 13], False))
    run_opcheck(ops.upsample_argmax.default, (_logits(1, 3, 5, 5, torch.float64, device), [17, 17], True))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device):
    x = _logits(2, 5, 6, 7, device=device)
    compiled = torch.compile(lambda t: segkernels.upsample_argmax(t, (24, 28)), fullgraph=True)
    assert torch.equal(compiled(x), segkernels.upsample_argmax(x, (24, 28)))


def test_vmap_folds_into_the_batch():
    x = _logits(6, 4, 5, 5).view(3, 2, 4, 5, 5)
    out = torch.vmap(lambda t: segkernels.upsample_argmax(t, (11, 9)))(x)
    assert torch.equal(out, segkernels.upsample_argmax(x.view(6, 4, 5, 5), (11, 9)).view(3, 2, 11, 9))
    out = torch.vmap(lambda t: segkernels.upsample_argmax(t, (11, 9)), in_dims=1)(x.transpose(0, 1))
    assert torch.equal(out, segkernels.upsample_argmax(x.view(6, 4, 5, 5), (11, 9)).view(3, 2, 11, 9))


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_triton_kernel_matches_reference(config):
    from segkernels.ops.upsample_argmax import triton as tk

    n, c, h, w, H, W, ac = config
    # Every dtype on the first shape only: the interpreter is slow.
    for dtype in (torch.float32, torch.float64, torch.bfloat16) if config is CONFIGS[0] else (torch.float32,):
        x = _logits(n, c, h, w, dtype)
        if not triton_runs_on(x):
            pytest.skip("run with TRITON_INTERPRET=1 to exercise the Triton kernel on CPU tensors")
        assert_argmax_matches(tk._upsample_argmax_triton(x, (H, W), ac), x, (H, W), ac)
    x = to_layout(_logits(n, c, h, w), "channels_last")
    assert_argmax_matches(tk._upsample_argmax_triton(x, (H, W), ac), x, (H, W), ac)


AXES = [(9, 65), (65, 513), (7, 23), (12, 5), (1, 4), (5, 1), (2, 42), (2, 50), (6, 6)]


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_axis_table_reads_what_f_interpolate_reads():
    # The host-side taps of the Triton kernel: F.interpolate's weights, and the same pixels
    # read (a NaN at input k reaches exactly the outputs that read k, even with weight 0).
    from segkernels.ops.upsample_argmax import triton as tk

    for in_size, out_size in AXES:
        for ac in (False, True):
            i0, i1, w0, w1 = tk.axis_table(in_size, out_size, ac, torch.float32, "cpu")
            eye = torch.eye(in_size).view(in_size, 1, 1, in_size)
            weights = F.interpolate(eye, size=(1, out_size), mode="bilinear", align_corners=ac).view(in_size, out_size)
            ours = torch.zeros(in_size, out_size)
            ours[i0, torch.arange(out_size)] += w0
            ours[i1, torch.arange(out_size)] += w1
            torch.testing.assert_close(ours, weights, rtol=0, atol=1e-6)
            for k in range(in_size):
                ramp = torch.zeros(1, 1, 1, in_size)
                ramp[..., k] = float("nan")
                eager = F.interpolate(ramp, size=(1, out_size), mode="bilinear", align_corners=ac).view(-1).isnan()
                assert torch.equal((i0 == k) | (i1 == k), eager), (in_size, out_size, ac, k)


# Unchanged axes, one unchanged axis, align_corners' last column and a plain upsampling.
NON_FINITE_CASES = [((4, 4), (4, 4), False), ((4, 5), (4, 13), False), ((2, 2), (2, 42), True),
                    ((2, 2), (2, 50), False), ((3, 5), (11, 16), True), ((5, 3), (9, 7), False)]


def _check_non_finite(run, value, device="cpu"):
    # The same pixels read as F.interpolate, so NaN and infinities land on the same outputs.
    for (h, w), (H, W), ac in NON_FINITE_CASES:
        for spot in [(0, 0), (h - 1, w - 1), (h // 2, w // 2)]:
            x = torch.zeros(1, 3, h, w, device=device)
            x[0, 1, spot[0], spot[1]] = value
            x[0, 2, spot[0], 0] = value
            expected = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=ac).argmax(1)
            assert torch.equal(run(x, (H, W), ac), expected), (h, w, H, W, ac, spot)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_spread_as_in_f_interpolate(value, device):
    _check_non_finite(lambda x, size, ac: segkernels.upsample_argmax(x, size, align_corners=ac), value, device)


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_non_finite_logits_spread_as_in_f_interpolate():
    from segkernels.ops.upsample_argmax import triton as tk

    if not triton_runs_on(torch.zeros(1)):
        pytest.skip("run with TRITON_INTERPRET=1 to exercise the Triton kernel on CPU tensors")
    for value in (float("nan"), -float("inf")):
        _check_non_finite(tk._upsample_argmax_triton, value)


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_kernel_compiles_for_sm90():
    from segkernels.ops.upsample_argmax import triton as tk

    def run():
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            tk._upsample_argmax_triton(_logits(1, 19, 8, 16, dtype), (64, 128), False)

    launches = record_triton_launches(tk, run)
    assert compile_launches_for_sm90(launches) == {"_upsample_argmax_kernel"}
