"""max_pool{2,3}d_with_indices against ATen and the package reference: int64 and compact indices,
ties and NaN, the AVX2 and baseline 2x2 paths, layouts, unbatched and empty inputs."""

import pytest
import torch
import torch.nn.functional as F

import segkernels
from helpers import DEVICES, FLOAT_DTYPES, assert_close, requires_kernels, to_layout
from segkernels.ops.max_unpool import reference_max_pool_with_indices
from unpool_cases import (
    GEOMETRIES_2D,
    GEOMETRIES_3D,
    SHAPES_2D,
    SHAPES_3D,
    _aten_pool,
    _pool,
    _random_input,
)

pytestmark = requires_kernels


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
