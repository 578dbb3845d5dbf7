"""max_unpool{2,3}d against ATen and the package reference: output sizes, layouts, colliding
indices, the SegNet vector paths, empty maps, the nn modules and the fallback without kernels."""

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
    requires_kernels,
    to_layout,
)
from segkernels.ops.max_unpool import compact_to_flat_indices, reference_max_unpool
from unpool_cases import (
    GEOMETRIES_2D,
    GEOMETRIES_3D,
    SHAPES_2D,
    SHAPES_3D,
    _aten_pool,
    _pool,
    _random_input,
    _unpool,
)

pytestmark = requires_kernels


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


@pytest.mark.parametrize("device", DEVICES)
def test_unpool_to_an_empty_output_and_back(device):
    x = torch.randn(1, 1, 1, 1, device=device, requires_grad=True)
    out = segkernels.max_unpool2d(x, torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device), 2, 2, 1)
    assert out.shape == (1, 1, 0, 0)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert_close(grad, torch.zeros_like(x), exact=True)


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
