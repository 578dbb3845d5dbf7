"""max_pool{2,3}d_with_indices and max_unpool{2,3}d against ATen and the package reference."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

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
from segkernels.ops.max_unpool import (
    compact_to_flat_indices,
    reference_max_pool_with_indices,
    reference_max_unpool,
)

pytestmark = requires_kernels

# (kernel, stride, padding, dilation, ceil_mode): disjoint and overlapping windows, padding,
# dilation holes, stride > kernel (gaps), ceil_mode.
GEOMETRIES_2D = [
    ((2, 2), (2, 2), (0, 0), (1, 1), False),
    ((3, 3), (2, 2), (1, 1), (1, 1), True),
    ((3, 2), (1, 2), (1, 0), (1, 1), False),
    ((2, 3), (3, 4), (1, 1), (2, 1), True),
    ((3, 3), (3, 3), (1, 0), (1, 1), True),
    ((2, 2), (1, 1), (0, 0), (2, 2), False),
    ((2, 2), (2, 2), (1, 1), (1, 1), True),
]
GEOMETRIES_3D = [
    ((2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1), False),
    ((3, 2, 3), (2, 2, 1), (1, 1, 1), (1, 1, 1), True),
    ((2, 2, 2), (3, 2, 3), (0, 1, 0), (2, 1, 1), False),
]
SHAPES_2D = [(2, 3, 9, 11), (1, 5, 8, 8), (3, 2, 13, 7)]
SHAPES_3D = [(2, 3, 6, 7, 9), (1, 2, 5, 8, 6)]


def _random_input(shape, dtype, device, kind="randn"):
    if kind == "ties":  # few distinct values: many equal maxima per window
        return torch.randint(-2, 3, shape, device=device).to(dtype)
    x = torch.randn(shape, device=device, dtype=torch.float32).to(dtype)
    if kind == "nan":
        mask = torch.rand(shape, device=device) < 0.15
        x = x.masked_fill(mask, float("nan"))
        x = x.masked_fill(torch.rand(shape, device=device) < 0.1, float("-inf"))
    return x


def _pool(x, geometry, compact=False):
    k, s, p, d, c = geometry
    fn = segkernels.max_pool2d_with_indices if len(k) == 2 else segkernels.max_pool3d_with_indices
    return fn(x, k, s, p, d, c, compact=compact)


def _unpool(v, i, geometry, output_size, **kw):
    k, s, p, d, _ = geometry
    fn = segkernels.max_unpool2d if len(k) == 2 else segkernels.max_unpool3d
    return fn(v, i, k, s, p, output_size, dilation=d, **kw)


def _aten_pool(x, geometry):
    k, s, p, d, c = geometry
    fn = F.max_pool2d if len(k) == 2 else F.max_pool3d
    return fn(x, k, s, p, d, c, return_indices=True)


# ----------------------------------------------------------------------------------------------
# Pooling


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES_2D + GEOMETRIES_3D)
@pytest.mark.parametrize("kind", ["randn", "ties", "nan"])
def test_pool_matches_aten(device, dtype, geometry, kind):
    shapes = SHAPES_2D if len(geometry[0]) == 2 else SHAPES_3D
    for shape in shapes:
        x = _random_input(shape, dtype, device, kind)
        values, indices = _pool(x, geometry)
        ref_values, ref_indices = _aten_pool(x, geometry)
        assert_close(values, ref_values, exact=True)
        assert_close(indices, ref_indices, exact=True)
        cvalues, cindices = _pool(x, geometry, compact=True)
        assert cindices.dtype == torch.uint8
        assert_close(cvalues, ref_values, exact=True)
        k, s, p, d, c = geometry
        _, ref_compact = reference_max_pool_with_indices(x, k, s, p, d, c, compact=True)
        assert_close(cindices, ref_compact, exact=True)


@pytest.mark.parametrize("avx2", [True, False], ids=["avx2", "baseline"])
@pytest.mark.parametrize("kind", ["randn", "ties", "nan"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_pool_2x2_rows_vector_and_baseline_paths(dtype, kind, avx2, monkeypatch):
    """2x2 and 2x2x2 windows of stride 2 take an 8-windows-at-a-time AVX2 path (float32 and
    bfloat16) for the windows inside a row, the scalar chain for the rest (odd widths, ceil_mode,
    padding): rows of 8k windows and of 8k + 1..7, first maximum and NaN wins as ATen."""
    if not avx2:
        monkeypatch.setenv("SEGKERNELS_NO_AVX2", "1")
    cases = [((2, 3, 6, 32), 0, False), ((1, 2, 5, 37), 0, True), ((1, 2, 4, 46), 1, False), ((2, 2, 3, 17), 0, False),
             ((1, 2, 4, 6, 33), 0, False), ((1, 1, 5, 4, 50), 0, True)]
    for shape, pad, ceil in cases:
        x = _random_input(shape, dtype, "cpu", kind)
        nd = len(shape) - 2
        pool_t = F.max_pool2d if nd == 2 else F.max_pool3d
        pool_s = segkernels.max_pool2d_with_indices if nd == 2 else segkernels.max_pool3d_with_indices
        ref_v, ref_i = pool_t(x, 2, 2, pad, ceil_mode=ceil, return_indices=True)
        v, i = pool_s(x, 2, 2, pad, ceil_mode=ceil)
        assert_close(v, ref_v, exact=True)
        assert_close(i, ref_i, exact=True)
        cv, ci = pool_s(x, 2, 2, pad, ceil_mode=ceil, compact=True)
        assert_close(cv, ref_v, exact=True)
        k = (2,) * nd
        _, ref_c = reference_max_pool_with_indices(x, k, k, (pad,) * nd, (1,) * nd, ceil, compact=True)
        assert_close(ci, ref_c, exact=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("dims", [2, 3])
def test_pool_layouts(device, layout, dims):
    geometry = GEOMETRIES_2D[1] if dims == 2 else GEOMETRIES_3D[1]
    shape = (2, 6, 11, 9) if dims == 2 else (2, 4, 5, 7, 6)
    x = to_layout(_random_input(shape, torch.float32, device), layout)
    values, indices = _pool(x, geometry)
    ref_values, ref_indices = _aten_pool(x.contiguous(), geometry)
    assert_close(values, ref_values, exact=True)
    assert_close(indices, ref_indices, exact=True)
    if layout == "channels_last":  # kept, not copied back to NCHW
        fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
        assert values.is_contiguous(memory_format=fmt) and indices.is_contiguous(memory_format=fmt)


def test_pool_unbatched_and_empty():
    x = torch.randn(3, 8, 10)
    v, i = segkernels.max_pool2d_with_indices(x, 2)
    rv, ri = F.max_pool2d(x, 2, return_indices=True)
    assert_close(v, rv, exact=True)
    assert_close(i, ri, exact=True)
    empty = torch.randn(0, 3, 8, 10)
    v, i = segkernels.max_pool2d_with_indices(empty, 2, compact=True)
    assert v.shape == (0, 3, 4, 5) and i.shape == (0, 3, 4, 5) and i.dtype == torch.uint8


# ----------------------------------------------------------------------------------------------
# Unpooling


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES_2D + GEOMETRIES_3D)
def test_unpool_matches_aten_and_reference(device, dtype, geometry):
    shapes = SHAPES_2D if len(geometry[0]) == 2 else SHAPES_3D
    k, s, p, d, _ = geometry
    for shape in shapes:
        x = _random_input(shape, dtype, device)
        values, indices = _pool(x, geometry)
        out = _unpool(values, indices, geometry, x.shape[2:])
        assert_no_nan(out)
        expected = reference_max_unpool(values, indices, k, s, p, d, list(x.shape[2:]))
        assert_close(out, expected, exact=True)
        if all(v == 1 for v in d):  # ATen's unpool has no dilation argument
            aten = (F.max_unpool2d if len(k) == 2 else F.max_unpool3d)(values, indices, k, s, p, x.shape[2:])
            assert_close(out, aten, exact=True)
        cvalues, cindices = _pool(x, geometry, compact=True)
        assert_close(_unpool(cvalues, cindices, geometry, x.shape[2:]), expected, exact=True)


@pytest.mark.parametrize("device", DEVICES)
def test_unpool_default_and_given_output_size(device):
    x = torch.randn(2, 3, 8, 10, device=device)
    v, i = segkernels.max_pool2d_with_indices(x, 2)
    out = segkernels.max_unpool2d(v, i, 2)
    assert_close(out, F.max_unpool2d(v, i, 2), exact=True)
    # SegNet with odd sizes: the decoder passes the encoder's size back.
    x = torch.randn(2, 3, 9, 11, device=device)
    v, i = segkernels.max_pool2d_with_indices(x, 2, ceil_mode=True)
    for size in [(9, 11), (2, 3, 9, 11), (10, 12), (11, 11)]:
        out = segkernels.max_unpool2d(v, i, 2, output_size=size)
        assert_close(out, F.max_unpool2d(v, i, 2, output_size=size), exact=True)
        vc, ic = segkernels.max_pool2d_with_indices(x, 2, ceil_mode=True, compact=True)
        if tuple(size[-2:]) == (9, 11):  # flat indices only mean the same positions at the pooled size
            assert_close(segkernels.max_unpool2d(vc, ic, 2, output_size=size), out, exact=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("dims", [2, 3])
def test_unpool_layouts(device, layout, dims):
    geometry = GEOMETRIES_2D[0] if dims == 2 else GEOMETRIES_3D[0]
    shape = (2, 6, 10, 8) if dims == 2 else (2, 4, 6, 8, 4)
    x = _random_input(shape, torch.float32, device)
    values, indices = _aten_pool(x, geometry)
    expected = (F.max_unpool2d if dims == 2 else F.max_unpool3d)(values, indices, geometry[0], geometry[1])
    out = _unpool(to_layout(values, layout), to_layout(indices, layout), geometry, None)
    assert_close(out, expected, exact=True)
    if layout == "channels_last":
        fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
        assert out.is_contiguous(memory_format=fmt)
    # overlapping windows through the general gather, channels_last too
    overlapping = GEOMETRIES_2D[2] if dims == 2 else GEOMETRIES_3D[1]
    v, i = _pool(to_layout(x, layout), overlapping)
    k, s, p, d, _ = overlapping
    assert_close(
        _unpool(v, i, overlapping, x.shape[2:]),
        reference_max_unpool(v.contiguous(), i.contiguous(), k, s, p, d, list(x.shape[2:])),
        exact=True,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_unpool_arbitrary_indices_last_wins(device):
    # Indices that max-pooling could never produce: anywhere in the plane, with collisions.
    v = torch.randn(2, 3, 5, 6, device=device)
    out_size = (10, 12)
    i = torch.randint(0, 10 * 12, v.shape, device=device)
    i[0, 0, 0, :3] = 7  # three entries name element 7; the last in scan order wins
    out = segkernels.max_unpool2d(v, i, 2, output_size=out_size)
    expected = reference_max_unpool(v, i, (2, 2), (2, 2), (0, 0), (1, 1), list(out_size))
    assert_close(out, expected, exact=True)
    assert out[0, 0].flatten()[7] == v[0, 0, 0, 2]
    # Where one entry names a target, ATen agrees (which colliding entry ATen keeps has varied
    # between torch versions: 2.14's CPU kernel keeps the last, 2.11's did not always).
    flat = i.reshape(6, -1)
    hits = torch.zeros(6, 120, dtype=torch.long, device=device).scatter_add_(1, flat, torch.ones_like(flat))
    single = (hits == 1).reshape(2, 3, *out_size)
    aten = F.max_unpool2d(v, i, 2, output_size=out_size)
    assert_close(out[single], aten[single], exact=True)


# SegNet's 2x2 windows take a vector path on AVX2 CPUs: 4 (4-byte) or 8 (2-byte) entries per
# step and both rows of a window per pass, with a scalar tail. Widths straddle those step
# lengths; odd sizes leave a gap row and column; padding and ceil_mode move the windows.
SEGNET_ROW_CASES = [((6, 16), 0, False), ((7, 33), 0, False), ((9, 47), 0, True), ((5, 18), 1, False), ((4, 70), 0, False)]


@pytest.mark.parametrize("avx2", [True, False], ids=["avx2", "baseline"])
@pytest.mark.parametrize("compact", [False, True], ids=["int64", "compact"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_unpool_segnet_rows_vector_and_baseline_paths(dtype, compact, avx2, monkeypatch):
    if not avx2:
        monkeypatch.setenv("SEGKERNELS_NO_AVX2", "1")
    for (h, w), pad, ceil in SEGNET_ROW_CASES:
        x = _random_input((2, 3, h, w), dtype, "cpu")
        v, i = segkernels.max_pool2d_with_indices(x, 2, 2, pad, ceil_mode=ceil, compact=compact)
        flat = i if not compact else compact_to_flat_indices(i, [h, w], (2, 2), (2, 2), (pad, pad), (1, 1))
        v = v.detach().requires_grad_(True)
        out = segkernels.max_unpool2d(v, i, 2, 2, pad, output_size=(h, w))
        assert_no_nan(out)
        v_ref = v.detach().requires_grad_(True)
        expected = reference_max_unpool(v_ref, flat, (2, 2), (2, 2), (pad, pad), (1, 1), [h, w])
        assert_close(out, expected, exact=True)
        # The backward takes a plain gather (int64) or, with every window inside, a
        # per-offset displacement (compact); padded windows take the general row path.
        grad = _random_input(out.shape, dtype, "cpu")
        (got,) = torch.autograd.grad(out, v, grad)
        (want,) = torch.autograd.grad(expected, v_ref, grad)
        assert_no_nan(got)
        assert_close(got, want, exact=True)


# 2x2x2 windows of stride 2 take the same vector path one z-slice at a time: odd depths leave a
# gap slice, odd heights and widths gap rows and columns; widths below 8 have no vector step.
SEGNET_VOLUME_CASES = [(4, 6, 16), (5, 7, 33), (3, 9, 6), (6, 4, 22)]


@pytest.mark.parametrize("avx2", [True, False], ids=["avx2", "baseline"])
@pytest.mark.parametrize("compact", [False, True], ids=["int64", "compact"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_unpool3d_segnet_slices_vector_and_baseline_paths(dtype, compact, avx2, monkeypatch):
    if not avx2:
        monkeypatch.setenv("SEGKERNELS_NO_AVX2", "1")
    for size in SEGNET_VOLUME_CASES:
        x = _random_input((2, 3) + size, dtype, "cpu")
        v, i = segkernels.max_pool3d_with_indices(x, 2, 2, compact=compact)
        flat = i if not compact else compact_to_flat_indices(i, list(size), (2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1))
        out = segkernels.max_unpool3d(v, i, 2, 2, output_size=size)
        assert_no_nan(out)
        expected = reference_max_unpool(v, flat, (2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1), list(size))
        assert_close(out, expected, exact=True)
        if dtype == torch.float32 and not compact:
            assert_close(out, F.max_unpool3d(v, i, 2, 2, output_size=size), exact=True)
    # An entry moved to another window's target takes the general scatter; one past the map or
    # past the window raises: the slice path's hit count must see both.
    x = torch.randn(1, 2, 5, 6, 20)
    v, i = segkernels.max_pool3d_with_indices(x, 2)
    moved = i.clone()
    moved[0, 1, 1, 2, 7] = 0
    out = segkernels.max_unpool3d(v, moved, 2, output_size=(5, 6, 20))
    assert_close(out, reference_max_unpool(v, moved, (2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1), [5, 6, 20]), exact=True)
    bad = i.clone()
    bad[0, 0, 1, 1, 9] = 5 * 6 * 20
    with pytest.raises(IndexError, match="outside"):
        segkernels.max_unpool3d(v, bad, 2, output_size=(5, 6, 20))
    _, ci = segkernels.max_pool3d_with_indices(x, 2, compact=True)
    ci[0, 1, 0, 2, 3] = 8
    with pytest.raises(IndexError, match="compact"):
        segkernels.max_unpool3d(v, ci, 2, output_size=(5, 6, 20))


@pytest.mark.parametrize("avx2", [True, False], ids=["avx2", "baseline"])
def test_unpool_segnet_rows_moved_and_bad_indices(avx2, monkeypatch):
    """Entries that leave their window are caught by the vector path's hit count too."""
    if not avx2:
        monkeypatch.setenv("SEGKERNELS_NO_AVX2", "1")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, 2, 8, 70, dtype=dtype)
        v, i = segkernels.max_pool2d_with_indices(x, 2)
        moved = i.clone()
        moved[0, 1, 2, 9] = 0  # a valid target in another window: the general scatter
        moved[0, 0, 3, 30] = moved[0, 0, 3, 31]  # collides with its neighbour's target
        out = segkernels.max_unpool2d(v, moved, 2, output_size=(8, 70))
        assert_close(out, reference_max_unpool(v, moved, (2, 2), (2, 2), (0, 0), (1, 1), [8, 70]), exact=True)
        bad = i.clone()
        bad[0, 1, 3, 33] = 8 * 70
        with pytest.raises(IndexError, match="outside"):
            segkernels.max_unpool2d(v, bad, 2, output_size=(8, 70))
        _, ci = segkernels.max_pool2d_with_indices(x, 2, compact=True)
        ci[0, 0, 1, 17] = 4
        with pytest.raises(IndexError, match="compact"):
            segkernels.max_unpool2d(v, ci, 2, output_size=(8, 70))
        # Unchecked, the bad offset writes nothing and gets an exact zero gradient.
        vg = v.detach().requires_grad_(True)
        out = segkernels.max_unpool2d(vg, ci, 2, output_size=(8, 70), check_indices=False)
        # (An incoming gradient without exact zeros: bfloat16 randn draws about 1% of them.)
        (got,) = torch.autograd.grad(out, vg, torch.rand_like(out) + 0.5)
        assert got[0, 0, 1, 17] == 0 and (got != 0).sum() == got.numel() - 1


@pytest.mark.parametrize("device", DEVICES)
def test_unpool_empty_batch(device):
    v = torch.randn(0, 4, 5, 6, device=device)
    i = torch.zeros(0, 4, 5, 6, dtype=torch.long, device=device)
    assert segkernels.max_unpool2d(v, i, 2).shape == (0, 4, 10, 12)
    v3 = torch.randn(0, 2, 3, 4, 5, device=device)
    assert segkernels.max_unpool3d(v3, torch.zeros_like(v3, dtype=torch.uint8), 2).shape == (0, 2, 6, 8, 10)


# ----------------------------------------------------------------------------------------------
# Gradients, op checks, compile, determinism


def test_gradcheck_pool_and_unpool():
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64, requires_grad=True)
    for geometry in [GEOMETRIES_2D[0], GEOMETRIES_2D[1], GEOMETRIES_2D[3]]:
        for compact in (False, True):
            gradcheck(lambda t: _pool(t, geometry, compact)[0], (x,))
            values, indices = _pool(x.detach(), geometry, compact)
            v = values.clone().requires_grad_(True)
            gradcheck(lambda t: _unpool(t, indices, geometry, x.shape[2:]), (v,))
    x3 = torch.randn(1, 2, 5, 6, 5, dtype=torch.float64, requires_grad=True)
    gradcheck(lambda t: _pool(t, GEOMETRIES_3D[1], True)[0], (x3,))
    for geometry in GEOMETRIES_3D[:2]:  # windows all inside (2x2x2), and padded ones
        for compact in (False, True):
            values, indices = _pool(x3.detach(), geometry, compact)
            v = values.clone().requires_grad_(True)
            gradcheck(lambda t: _unpool(t, indices, geometry, x3.shape[2:]), (v,))


def test_eager_wrappers_and_registered_autograd_agree():
    """With a gradient to record, the eager wrappers run their own autograd.Function (the one
    torch.library generates costs 30-50 us a call); direct op calls, and so torch.compile, use
    the registered autograd. Both must give the same first and second derivatives."""
    ops = torch.ops.segkernels
    x = _random_input((2, 3, 7, 9), torch.float64, "cpu").requires_grad_(True)
    geometry = ([3, 2], [2, 2], [1, 0], [1, 1])
    values, indices = segkernels.max_pool2d_with_indices(x, (3, 2), 2, (1, 0))
    assert "eager_autograd" in type(values.grad_fn).__name__
    direct_values, direct_indices = ops.max_pool_with_indices.default(x, *geometry, False, False)
    assert "eager_autograd" not in type(direct_values.grad_fn).__name__
    assert torch.equal(indices, direct_indices)
    v = values.detach().requires_grad_(True)
    out = segkernels.max_unpool2d(v, indices, (3, 2), 2, (1, 0), output_size=(7, 9))
    direct_out = ops.max_unpool.default(v, indices, *geometry, [7, 9], True)
    assert "eager_autograd" in type(out.grad_fn).__name__
    for got, want, wrt in ((values, direct_values, x), (out, direct_out, v)):
        assert torch.equal(got, want)
        grad = torch.randn_like(got).requires_grad_(True)
        (g1,) = torch.autograd.grad(got, wrt, grad, create_graph=True)
        (w1,) = torch.autograd.grad(want, wrt, grad, create_graph=True)
        assert torch.equal(g1, w1) and g1.abs().sum() > 0
        # Second order (with respect to the incoming gradient): both go through the backward
        # ops' own registered autograd.
        probe = torch.randn_like(g1)
        (g2,) = torch.autograd.grad(g1, grad, probe)
        (w2,) = torch.autograd.grad(w1, grad, probe)
        assert torch.equal(g2, w2) and g2.abs().sum() > 0


def test_gradgradcheck():
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: segkernels.max_pool2d_with_indices(t, 3, 2, 1)[0], (x,))
    v, i = segkernels.max_pool2d_with_indices(x.detach(), 2, compact=True)
    v.requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda t: segkernels.max_unpool2d(t, i, 2, output_size=(6, 7)), (v,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_pool_backward_matches_aten(device, compact, layout):
    for geometry in GEOMETRIES_2D + GEOMETRIES_3D:
        shape = SHAPES_2D[0] if len(geometry[0]) == 2 else SHAPES_3D[0]
        x = to_layout(_random_input(shape, torch.float32, device, "ties"), layout).requires_grad_(True)
        values, _ = _pool(x, geometry, compact=compact)
        g = torch.randn_like(values)
        (grad,) = torch.autograd.grad(values, x, g)
        x2 = x.detach().contiguous().requires_grad_(True)
        (ref,) = torch.autograd.grad(_aten_pool(x2, geometry)[0], x2, g.contiguous())
        assert_close(grad, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    ops = torch.ops.segkernels
    x = torch.randn(2, 3, 8, 9, device=device, requires_grad=True)
    for compact in (False, True):
        run_opcheck(ops.max_pool_with_indices.default, (x, [2, 2], [2, 2], [0, 0], [1, 1], False, compact))
        run_opcheck(ops.max_pool_with_indices.default, (x, [3, 3], [2, 1], [1, 1], [1, 1], True, compact))
        v, i = ops.max_pool_with_indices(x.detach(), [2, 2], [2, 2], [0, 0], [1, 1], False, compact)
        v.requires_grad_(True)
        run_opcheck(ops.max_unpool.default, (v, i, [2, 2], [2, 2], [0, 0], [1, 1], [8, 9], True))
        g = torch.randn(2, 3, 8, 9, device=device, requires_grad=True)
        for only_winners in (True, False):
            run_opcheck(ops.max_unpool_backward.default, (g, i, [2, 2], [2, 2], [0, 0], [1, 1], only_winners))
        run_opcheck(ops.max_pool_backward.default, (v, i, [2, 2], [2, 2], [0, 0], [1, 1], [8, 9]))
    x3 = torch.randn(1, 2, 4, 6, 5, device=device, requires_grad=True).contiguous(
        memory_format=torch.channels_last_3d
    )
    run_opcheck(ops.max_pool_with_indices.default, (x3, [2, 2, 2], [2, 2, 2], [0, 0, 0], [1, 1, 1], False, True))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def encoder_decoder(x):
        v, i = segkernels.max_pool2d_with_indices(x, 2, compact=True)
        return segkernels.max_unpool2d(torch.relu(v), i, 2, output_size=x.shape[2:])

    compiled = torch.compile(encoder_decoder, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 10, 12, device=device, requires_grad=True)
    out = compiled(x)
    assert_close(out, encoder_decoder(x), exact=True)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_mode_and_bitwise_repeatable(device):
    x = torch.randn(4, 8, 33, 31, device=device)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(3):
            for geometry in (GEOMETRIES_2D[0], GEOMETRIES_2D[2]):
                v, i = _pool(x, geometry)
                runs.append(_unpool(v, i, geometry, x.shape[2:]))
        for a, b in zip(runs[0::2], runs[2::2]):
            assert torch.equal(a, b)
        # ATen refuses here (nondeterministic alert), we do not.
        if device == "cuda":
            v, i = F.max_pool2d(x, 2, return_indices=True)
            with pytest.raises(RuntimeError):
                F.max_unpool2d(v, i, 2)
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_keeps_input_dtype(device):
    # Pooling and unpooling only move values: under autocast they run in the input's dtype,
    # like ATen's max-pooling.
    x = torch.randn(2, 3, 8, 10, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        v, i = segkernels.max_pool2d_with_indices(x, 2, compact=True)
        out = segkernels.max_unpool2d(v, i, 2)
    assert v.dtype == torch.float32 and out.dtype == torch.float32
    rv, ri = F.max_pool2d(x, 2, return_indices=True)
    assert_close(out, F.max_unpool2d(rv, ri, 2), exact=True)


# ----------------------------------------------------------------------------------------------
# Errors: a clear Python exception, never a crash or an out-of-bounds write


@pytest.mark.parametrize("device", DEVICES)
def test_error_index_out_of_range(device):
    v = torch.randn(1, 2, 4, 4, device=device)
    i = torch.zeros_like(v, dtype=torch.long)
    i[0, 1, 2, 3] = 64  # output is 8 x 8
    with pytest.raises(IndexError, match="outside"):
        segkernels.max_unpool2d(v, i, 2)
    i[0, 1, 2, 3] = -1
    with pytest.raises(IndexError, match="outside"):
        segkernels.max_unpool2d(v, i, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_error_compact_offset_too_large(device):
    v = torch.randn(1, 2, 4, 4, device=device)
    i = torch.zeros_like(v, dtype=torch.uint8)
    i[0, 0, 1, 1] = 4  # window 2x2 has offsets 0..3
    with pytest.raises(IndexError, match="compact"):
        segkernels.max_unpool2d(v, i, 2)
    # a tap that lands past a smaller output
    v, i = segkernels.max_pool2d_with_indices(torch.randn(1, 1, 4, 4, device=device), 2, compact=True)
    i.fill_(3)
    with pytest.raises(IndexError):
        segkernels.max_unpool2d(v, i, 2, output_size=(3, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_indices_unchecked_never_write_out_of_bounds(device):
    v = torch.randn(1, 2, 4, 4, device=device)
    i = torch.randint(0, 64, v.shape, device=device)
    i[0, 0, 0, 0] = 10**12
    i[0, 1, 3, 3] = -5
    out = segkernels.max_unpool2d(v, i, 2, check_indices=False)
    assert out.shape == (1, 2, 8, 8) and torch.isfinite(out).all()
    ci = torch.full_like(v, 200, dtype=torch.uint8)
    out = segkernels.max_unpool2d(v, ci, 2, check_indices=False)
    assert torch.equal(out, torch.zeros_like(out))


def test_error_messages_name_the_argument():
    v = torch.randn(1, 2, 4, 4)
    i = torch.zeros_like(v, dtype=torch.long)
    with pytest.raises(TypeError, match="indices must be int64"):
        segkernels.max_unpool2d(v, i.int(), 2)
    with pytest.raises(ValueError, match="indices must have the shape"):
        segkernels.max_unpool2d(v, i[:, :1], 2)
    with pytest.raises(ValueError, match="invalid output_size"):
        segkernels.max_unpool2d(v, i, 2, output_size=(20, 20))
    with pytest.raises(ValueError, match="output_size should be a sequence"):
        segkernels.max_unpool2d(v, i, 2, output_size=(8,))
    with pytest.raises(ValueError, match="at most 256"):
        segkernels.max_pool2d_with_indices(torch.randn(1, 1, 40, 40), 17, compact=True)
    with pytest.raises(ValueError, match="at most 256"):
        segkernels.max_unpool2d(v, i.to(torch.uint8), 17)
    with pytest.raises(TypeError, match="input must be a floating tensor"):
        segkernels.max_pool2d_with_indices(torch.ones(1, 1, 4, 4, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="input must have shape"):
        segkernels.max_pool2d_with_indices(torch.randn(4, 4), 2)
    with pytest.raises(ValueError, match="padding must be at most half"):
        segkernels.max_pool2d_with_indices(torch.randn(1, 1, 8, 8), 2, padding=2)
    with pytest.raises(ValueError, match="too small"):
        segkernels.max_pool2d_with_indices(torch.randn(1, 1, 2, 2), 3)
    with pytest.raises(ValueError, match="kernel_size must be positive"):
        segkernels.max_pool2d_with_indices(torch.randn(1, 1, 8, 8), 0)
    with pytest.raises(ValueError, match="stride"):
        segkernels.max_unpool2d(v, i, 2, stride=(1, 2, 3))


def test_errors_where_aten_raises_them():
    # Zero-size non-batch dimensions: ATen raises for pooling and unpooling alike.
    for x in (torch.ones(1, 0, 4, 4), torch.ones(1, 2, 0, 4), torch.ones(0, 4, 4)):
        with pytest.raises(RuntimeError):
            F.max_pool2d(x, 2, return_indices=True)
        with pytest.raises(ValueError, match="non-zero size"):
            segkernels.max_pool2d_with_indices(x, 2)
    with pytest.raises(ValueError, match="non-zero size"):
        segkernels.max_pool3d_with_indices(torch.ones(1, 0, 4, 4, 4), 2)
    for v in (torch.ones(1, 0, 2, 2), torch.ones(1, 1, 0, 2), torch.ones(1, 2, 0)):
        i = torch.zeros_like(v, dtype=torch.long)
        with pytest.raises(RuntimeError):
            F.max_unpool2d(v, i, 2)
        with pytest.raises(ValueError, match="non-zero size"):
            segkernels.max_unpool2d(v, i, 2)
    with pytest.raises(ValueError, match="non-zero size"):
        segkernels.max_unpool3d(torch.ones(1, 1, 0, 2, 2), torch.zeros(1, 1, 0, 2, 2, dtype=torch.long), 2)
    # ...and where it does not: an unbatched map with no channels, an empty output.
    v0 = torch.ones(0, 2, 2)
    assert segkernels.max_unpool2d(v0, torch.zeros_like(v0, dtype=torch.long), 2).shape == (0, 4, 4)
    v1 = torch.ones(1, 1, 1, 1)
    out = segkernels.max_unpool2d(v1, torch.zeros_like(v1, dtype=torch.long), 2, 3, 1)
    assert out.shape == F.max_unpool2d(v1, torch.zeros_like(v1, dtype=torch.long), 2, 3, 1).shape == (1, 1, 0, 0)
    # Argument types ATen refuses.
    x = torch.randn(1, 2, 4, 4)
    v, i = F.max_pool2d(x, 2, return_indices=True)
    for size in ([4.5, 4], torch.tensor([4, 4]), [True, 4]):
        with pytest.raises(TypeError, match="output_size must be a sequence of ints"):
            segkernels.max_unpool2d(v, i, 2, output_size=size)
    with pytest.raises(ValueError, match="kernel_size"):
        segkernels.max_unpool2d(v, i, (2,))  # F.max_pool2d broadcasts (2,); F.max_unpool2d raises
    with pytest.raises(ValueError, match="stride"):
        segkernels.max_unpool2d(v, i, 2, [])
    for flag in ("ceil_mode", "compact"):
        with pytest.raises(TypeError, match=flag):
            segkernels.max_pool2d_with_indices(x, 3, 2, **{flag: 1})
    assert segkernels.max_pool2d_with_indices(x, (2,))[0].shape == (1, 2, 2, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_unpool_negative_padding_sets_the_size_as_aten(device):
    x = torch.randn(2, 3, 6, 8, device=device)
    v, i = F.max_pool2d(x, 2, return_indices=True)
    for pad in (-1, (-2, 0)):
        expected = F.max_unpool2d(v.cpu(), i.cpu(), 2, 2, pad)
        assert_close(segkernels.max_unpool2d(v, i, 2, 2, pad).cpu(), expected, exact=True)
        assert_close(segkernels.nn.MaxUnpool2d(2, 2, pad)(v, i).cpu(), expected, exact=True)
    with pytest.raises(ValueError, match="compact indices need the pooling's padding"):
        segkernels.max_unpool2d(v, torch.zeros_like(i, dtype=torch.uint8), 2, 2, -1)
    with pytest.raises(ValueError, match="negative"):
        segkernels.max_unpool2d(v, i, 2, 2, 5)
    bad = i.clone()
    bad.view(-1)[0] = 10**6  # every index is checked then, whatever check_indices says
    with pytest.raises(IndexError):
        segkernels.max_unpool2d(v, bad, 2, 2, -1, check_indices=False)


def test_reference_unpool_with_nothing_to_write():
    empty = torch.randn(0, 2, 3, 3)
    out = reference_max_unpool(empty, torch.zeros_like(empty, dtype=torch.long), (2, 2), (2, 2), (0, 0), (1, 1), [6, 6])
    assert out.shape == (0, 2, 6, 6)
    one = torch.randn(1, 1, 1, 1)
    out = reference_max_unpool(one, torch.zeros_like(one, dtype=torch.long), (2, 2), (3, 3), (1, 1), (1, 1), [0, 0])
    assert out.shape == (1, 1, 0, 0)


def test_direct_op_calls_are_checked_in_cpp():
    ops = torch.ops.segkernels
    v = torch.randn(1, 2, 4, 4)
    with pytest.raises(RuntimeError, match="indices must have the shape"):
        ops.max_unpool(v, torch.zeros(1, 2, 4, 3, dtype=torch.long), [2, 2], [2, 2], [0, 0], [1, 1], [8, 8], True)
    with pytest.raises(RuntimeError, match="int64"):
        ops.max_unpool(v, torch.zeros(1, 2, 4, 4, dtype=torch.int32), [2, 2], [2, 2], [0, 0], [1, 1], [8, 8], True)
    with pytest.raises(RuntimeError, match="stride must be positive"):
        ops.max_pool_with_indices(v, [2, 2], [0, 2], [0, 0], [1, 1], False, False)
    with pytest.raises(IndexError):
        ops.max_unpool(v, torch.full((1, 2, 4, 4), 99, dtype=torch.long), [2, 2], [2, 2], [0, 0], [1, 1], [8, 8], True)


# ----------------------------------------------------------------------------------------------
# Modules and the reference fallback


@pytest.mark.parametrize("device", DEVICES)
def test_modules_drop_in(device):
    x = torch.randn(2, 4, 12, 10, device=device)
    pool, ref_pool = segkernels.nn.MaxPool2d(2, return_indices=True), torch.nn.MaxPool2d(2, return_indices=True)
    unpool, ref_unpool = segkernels.nn.MaxUnpool2d(2), torch.nn.MaxUnpool2d(2)
    v, i = pool(x)
    rv, ri = ref_pool(x)
    assert_close(unpool(v, i, output_size=x.shape), ref_unpool(rv, ri, output_size=x.shape), exact=True)
    assert_close(segkernels.nn.MaxPool2d(2)(x), torch.nn.MaxPool2d(2)(x), exact=True)
    vc, ic = segkernels.nn.MaxPool2d(2, return_indices=True, compact=True)(x)
    assert_close(unpool(vc, ic), ref_unpool(rv, ri), exact=True)
    unpool3 = (segkernels.nn.MaxUnpool3d((2, 1, 2), 1), torch.nn.MaxUnpool3d((2, 1, 2), 1))
    for ours, theirs in ((unpool, ref_unpool), unpool3):  # tuples and repr as torch.nn's
        assert (ours.kernel_size, ours.stride, ours.padding) == (theirs.kernel_size, theirs.stride, theirs.padding)
        assert repr(ours) == repr(theirs)
    x3 = torch.randn(1, 2, 6, 4, 8, device=device)
    v3, i3 = segkernels.nn.MaxPool3d(2, return_indices=True, compact=True)(x3)
    rv3, ri3 = torch.nn.MaxPool3d(2, return_indices=True)(x3)
    assert_close(segkernels.nn.MaxUnpool3d(2)(v3, i3), torch.nn.MaxUnpool3d(2)(rv3, ri3), exact=True)


def test_compact_to_flat_roundtrip():
    x = torch.randn(2, 3, 9, 10)
    k, s, p, d = (3, 3), (2, 2), (1, 1), (1, 1)
    _, flat = F.max_pool2d(x, k, s, p, d, return_indices=True)
    _, compact = segkernels.max_pool2d_with_indices(x, k, s, p, d, compact=True)
    assert torch.equal(compact_to_flat_indices(compact, (9, 10), k, s, p, d), flat)


def test_import_without_kernels_falls_back_to_reference():
    code = (
        "import warnings, torch, torch.nn.functional as F\n"
        "import segkernels\n"
        "assert not segkernels.kernels_available()\n"
        "x = torch.randn(2, 3, 8, 8)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    v, i = segkernels.max_pool2d_with_indices(x, 2, compact=True)\n"
        "    out = segkernels.max_unpool2d(v, i, 2)\n"
        "    segkernels.max_unpool2d(v, i, 2)\n"
        "texts = [str(m.message) for m in w]\n"
        "assert sum('max_pool2d_with_indices: no compiled kernel' in t for t in texts) == 1, texts\n"
        "assert sum('max_unpool2d: no compiled kernel' in t for t in texts) == 1, texts\n"
        "rv, ri = F.max_pool2d(x, 2, return_indices=True)\n"
        "assert torch.equal(out, F.max_unpool2d(rv, ri, 2))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, SEGKERNELS_DISABLE_KERNELS="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# ----------------------------------------------------------------------------------------------
# CUDA against CPU (the CPU kernels run the same index math; this checks the thread mapping)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_matches_cpu(dtype):
    for geometry in GEOMETRIES_2D + GEOMETRIES_3D:
        shape = (3, 5, 37, 41) if len(geometry[0]) == 2 else (2, 3, 9, 10, 11)
        x = _random_input(shape, dtype, "cpu", "nan")
        for compact in (False, True):
            v, i = _pool(x, geometry, compact)
            vc, ic = _pool(x.cuda(), geometry, compact)
            assert_close(vc.cpu(), v, exact=True)
            assert_close(ic.cpu(), i, exact=True)
            out = _unpool(v, i, geometry, x.shape[2:])
            assert_close(_unpool(vc, ic, geometry, x.shape[2:]).cpu(), out, exact=True)


# ----------------------------------------------------------------------------------------------
# The CUDA fast path for tiling windows (kernel == stride), its element functions run on the CPU


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["run4", "run2", "run4-16bit"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize(
    "spatial,kernel,padding,ceil_mode,extra",
    [
        ((9, 14), (2, 2), (0, 0), True, (0, 0)),
        ((12, 10), (2, 2), (1, 0), False, (1, 1)),
        ((11, 13), (3, 2), (1, 1), True, (0, 1)),
        ((5, 7, 6), (2, 2, 3), (0, 1, 0), True, (1, 0, 2)),
        ((3, 1), (1, 1), (0, 0), False, (0, 0)),
        ((1, 5, 3), (1, 2, 3), (0, 1, 1), True, (0, 0, 1)),
        ((5, 7, 5), (2, 2, 2), (0, 0, 0), True, (0, 1, 1)),  # H * W odd: runs cross z-planes
    ],
)
def test_tiled_fast_path_logic(spatial, kernel, padding, ceil_mode, extra, compact, layout, dtype):
    # The forward runs in runs of consecutive elements (4, or 2 for 64-bit types) that step
    # across channels, rows, planes and images; odd extents make runs straddle each of them.
    nd = len(spatial)
    x = to_layout(torch.randn(2, 3, *spatial).to(dtype), layout)
    pool = segkernels.max_pool2d_with_indices if nd == 2 else segkernels.max_pool3d_with_indices
    v, i = pool(x, kernel, kernel, padding, ceil_mode=ceil_mode, compact=True)
    base = [(p - 1) * k - 2 * pd + k for p, k, pd in zip(v.shape[2:], kernel, padding)]
    out_size = [max(b, n) + e for b, n, e in zip(base, spatial, extra)]  # every tap of x inside
    ones = [1] * nd
    if not compact:  # plane-flat indices of the same taps on the (possibly larger) output
        i = compact_to_flat_indices(i, out_size, kernel, kernel, padding, ones)
    grad_out = to_layout(torch.randn(2, 3, *out_size).to(dtype), layout)
    out, grad_in, matches = get_testing_ops().max_unpool_tiled_logic(v, i, grad_out, kernel, padding, out_size)
    expected = reference_max_unpool(v, i, kernel, kernel, padding, ones, out_size)
    assert_close(out, expected, exact=True)
    flat = compact_to_flat_indices(i, out_size, kernel, kernel, padding, ones) if compact else i
    expected_grad = grad_out.reshape(6, -1).gather(1, flat.reshape(6, -1)).reshape(v.shape)
    assert_close(grad_in, expected_grad, exact=True)
    assert int(matches) == i.numel()
    if not compact:
        # An index outside its own window is not matched by the fast path (the wrapper then
        # takes the general path), and never written elsewhere.
        bad = i.clone()
        bad[1, 2].view(-1)[0] = bad[1, 2].view(-1)[-1]
        if bad[1, 2].view(-1)[0] != i[1, 2].view(-1)[0]:
            _, _, m = get_testing_ops().max_unpool_tiled_logic(v, bad, grad_out, kernel, padding, out_size)
            assert int(m) == i.numel() - 1


@pytest.mark.parametrize(
    "width,kernel,padding,public",
    [(1, (2, 2**32), (0, 0), True), (4, (2, 2**30), (0, 2**31), True), (4, (2, 2), (0, 2**31 - 2), False)],
)
def test_huge_kernel_or_padding_never_reaches_the_32_bit_tiled_math(width, kernel, padding, public):
    # tiled_geometry<int32_t> would truncate these (kernel 2**32 -> 0: a division by zero; padding
    # 2**31 -> INT_MIN: an entry index of -2). CUDA must take its 64-bit instantiation, and the
    # test-only op that runs the 32-bit math on the CPU must refuse, not crash.
    v = torch.randn(1, 1, 2, width)
    i = torch.randint(0, 16, (1, 1, 2, width))
    with pytest.raises(ValueError, match="32-bit tiled"):
        get_testing_ops().max_unpool_tiled_logic(v, i, torch.randn(1, 1, 4, 4), kernel, padding, (4, 4))
    if public:  # output_size (4, 4) is a legal size for this geometry: the op must still be exact
        out = segkernels.max_unpool2d(v, i, kernel, padding=padding, output_size=(4, 4))
        expected = reference_max_unpool(v, i, kernel, kernel, padding, (1, 1), (4, 4))
        assert_close(out, expected, exact=True)


# ----------------------------------------------------------------------------------------------
# The CUDA pooling kernel's element function (pool_max_element), run on the CPU in the 32-bit
# arithmetic CUDA uses when the map fits, and in 64 bits. The CPU op runs a row-wise version of
# its own, so without this the CPU-only CI would never execute the logic the GPU runs.


@pytest.mark.parametrize("narrow", [True, False], ids=["int32", "int64"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES_2D + GEOMETRIES_3D)
def test_pool_element_logic_matches_aten(geometry, dtype, layout, narrow):
    k, s, p, d, c = geometry
    for shape in SHAPES_2D if len(k) == 2 else SHAPES_3D:
        for kind in ("randn", "ties", "nan", "all_neg_inf_rows"):
            x = _random_input(shape, dtype, "cpu", "nan" if kind == "all_neg_inf_rows" else kind)
            if kind == "all_neg_inf_rows":  # whole windows of -inf report their first valid tap
                x[..., :3, :] = float("-inf")
            x = to_layout(x, layout)
            ref_values, ref_indices = _aten_pool(x.contiguous(), geometry)
            _, ref_compact = reference_max_pool_with_indices(x.contiguous(), k, s, p, d, c, compact=True)
            for compact in (False, True):
                values, indices = get_testing_ops().max_pool_logic(x, k, s, p, d, c, compact, narrow)
                assert indices.dtype == (torch.uint8 if compact else torch.int64)
                assert_close(values, ref_values, exact=True)
                assert_close(indices, ref_compact if compact else ref_indices, exact=True)


def test_pool_geometry_past_the_32_bit_range_takes_64_bit_math():
    # narrow_geometry<int32_t> would truncate a stride of 2**31 to INT_MIN. CUDA must take its
    # 64-bit instantiation; the test-only op refuses the 32-bit math instead of wrapping. (ATen
    # cannot take this stride at all; one window per row, over x = -1 (padding) and x = 0.)
    x = torch.randn(1, 2, 3, 4)
    k, s, p, d, c = (1, 2), (1, 2**31), (0, 1), (1, 1), True
    with pytest.raises(ValueError, match="32-bit pooling"):
        get_testing_ops().max_pool_logic(x, k, s, p, d, c, False, True)
    expected_values = x[..., :1]
    expected_indices = (torch.arange(3) * 4).view(1, 1, 3, 1).expand(1, 2, 3, 1)
    for compact in (False, True):
        values, indices = get_testing_ops().max_pool_logic(x, k, s, p, d, c, compact, False)
        assert_close(values, expected_values, exact=True)
        assert_close(indices, torch.ones_like(indices) if compact else expected_indices, exact=True)
    values, indices = _pool(x, (k, s, p, d, c))
    assert_close(values, expected_values, exact=True)
    assert_close(indices, expected_indices, exact=True)


@pytest.mark.cuda
def test_cuda_pool_past_the_32_bit_range():
    # Runs the 64-bit instantiation of the CUDA pooling kernel (the stride does not fit int32).
    x = torch.randn(1, 2, 3, 4)
    geometry = ((1, 2), (1, 2**31), (0, 1), (1, 1), True)
    for compact in (False, True):
        v, i = _pool(x, geometry, compact)
        vc, ic = _pool(x.cuda(), geometry, compact)
        assert_close(vc.cpu(), v, exact=True)
        assert_close(ic.cpu(), i, exact=True)


def test_fast_divider_matches_integer_division():
    # FastDivider replaces every division of the 32-bit CUDA kernels; its contract is
    # 0 <= n < 2**31 and 1 <= d < 2**31. Divisors: all small ones, powers of two and their
    # neighbours, and random ones up to the top of the range; numerators: the edges around
    # multiples of d and the top of the range, and random ones.
    top = 2**31 - 1
    divisors = set(range(1, 300))
    for b in range(1, 31):
        divisors |= {2**b - 1, 2**b, 2**b + 1}
    divisors |= set(torch.randint(1, top, (300,)).tolist()) | {top, top - 1}
    random_n = torch.randint(0, top, (2000,))
    for d in sorted(divisors):
        multiples = torch.tensor([d * q for q in (1, 2, 3, top // d)])
        n = torch.cat([multiples - 1, multiples, torch.tensor([0, 1, top, top - 1, top - d]), random_n])
        n = n[(n >= 0) & (n <= top)]
        assert torch.equal(get_testing_ops().fast_divide(n, d), n // d), d
    for bad_d in (0, 2**31):
        with pytest.raises(ValueError, match="divisor"):
            get_testing_ops().fast_divide(torch.tensor([1]), bad_d)
    with pytest.raises(ValueError, match="numerators"):
        get_testing_ops().fast_divide(torch.tensor([2**31]), 3)


def test_empty_map_beside_a_non_empty_one_in_the_32_bit_logic():
    # An empty full or pooled map still gets its dividers built: FastDivider(0) once divided by
    # zero on the host (SIGFPE). Unpool to a 0 x 0 output (its gradient has one entry), a
    # pooling of a zero-height map with padding (one row of windows over padding only).
    ops = get_testing_ops()
    out, grad_in, matches = ops.max_unpool_tiled_logic(
        torch.randn(1, 1, 1, 1), torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.randn(1, 1, 0, 0), [2, 2], [1, 1], [0, 0]
    )
    assert out.shape == (1, 1, 0, 0) and int(matches) == 0
    assert_close(grad_in, torch.zeros(1, 1, 1, 1), exact=True)
    x = torch.randn(1, 1, 0, 4)
    wide = ops.max_pool_logic(x, [2, 2], [1, 1], [1, 1], [1, 1], False, False, False)
    for compact in (False, True):
        narrow = ops.max_pool_logic(x, [2, 2], [1, 1], [1, 1], [1, 1], False, compact, True)
        assert_close(narrow[0], wide[0], exact=True)
        assert narrow[0].shape == (1, 1, 1, 5) and torch.isneginf(narrow[0]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_unpool_to_an_empty_output_and_back(device):
    x = torch.randn(1, 1, 1, 1, device=device, requires_grad=True)
    out = segkernels.max_unpool2d(x, torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device), 2, 2, 1)
    assert out.shape == (1, 1, 0, 0)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert_close(grad, torch.zeros_like(x), exact=True)
