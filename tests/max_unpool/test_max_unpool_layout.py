"""Layouts and dtypes as PyTorch's pooling decides them: the output keeps the input's layout by
its stride order (a channels-last map sliced or permuted stays channels-last), and integer maps
pool as F.max_pool does."""

import pytest
import torch
import torch.nn.functional as F

import segkernels
from helpers import requires_kernels

pytestmark = requires_kernels


def _channels_last_views(nd):
    fmt = torch.channels_last if nd == 2 else torch.channels_last_3d
    shape = (2, 8, 6, 7) if nd == 2 else (2, 8, 4, 6, 5)
    base = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=fmt)
    nhwc = torch.randn(shape[:1] + shape[2:] + shape[1:2], dtype=torch.float64)
    return fmt, {
        "sliced on channels": base[:, 2:6],
        "sliced on width": base[..., 1:],
        "permuted from NHWC": nhwc.movedim(-1, 1),
    }


@pytest.mark.parametrize("nd", [2, 3])
def test_pooling_keeps_the_layout_by_stride_order(nd):
    fmt, views = _channels_last_views(nd)
    pool_t = F.max_pool2d if nd == 2 else F.max_pool3d
    pool_s = segkernels.max_pool2d_with_indices if nd == 2 else segkernels.max_pool3d_with_indices
    unpool_t = F.max_unpool2d if nd == 2 else F.max_unpool3d
    unpool_s = segkernels.max_unpool2d if nd == 2 else segkernels.max_unpool3d
    for name, x in views.items():
        if name.startswith("sliced"):  # not contiguous in any format: ATen's suggest_memory_format decides
            assert not x.is_contiguous(memory_format=fmt) and not x.is_contiguous(), name
        ref_v, ref_i = pool_t(x, 2, return_indices=True)
        v, i = pool_s(x, 2)
        torch.testing.assert_close(v, ref_v, rtol=0, atol=0)
        assert torch.equal(i, ref_i), name
        assert v.is_contiguous(memory_format=fmt) == ref_v.is_contiguous(memory_format=fmt) is True, name
        ref_u = unpool_t(ref_v, ref_i, 2, output_size=x.shape[2:])
        u = unpool_s(v, i, 2, output_size=x.shape[2:])
        torch.testing.assert_close(u, ref_u, rtol=0, atol=0)
        # Unpooling keeps the layout too (F.max_unpool3d returns NCDHW whatever its input).
        assert u.is_contiguous(memory_format=fmt), name
        if nd == 2:
            assert ref_u.is_contiguous(memory_format=fmt), name
        _, ci = pool_s(x, 2, compact=True)
        assert ci.is_contiguous(memory_format=fmt), name


def test_an_nchw_map_stays_nchw():
    x = torch.randn(2, 3, 6, 6)[:, :, 1:]  # sliced, still NCHW by its strides
    v, _ = segkernels.max_pool2d_with_indices(x, 2)
    assert v.is_contiguous() and F.max_pool2d(x, 2).is_contiguous()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8], ids=str)
@pytest.mark.parametrize("compact", [False, True])
def test_integer_maps_pool_as_in_pytorch(dtype, compact):
    x = torch.randint(0, 100, (2, 3, 7, 6)).to(dtype)
    values, indices = segkernels.max_pool2d_with_indices(x, 3, 2, 1, ceil_mode=True, compact=compact)
    ref_v, ref_i = F.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
    assert values.dtype == dtype and torch.equal(values, ref_v)
    if compact:
        ref_i = segkernels.ops.max_unpool.reference.flat_to_compact_indices(ref_i, (7, 6), (3, 3), (2, 2), (1, 1),
                                                                              (1, 1))
    assert torch.equal(indices, ref_i)
    x3 = torch.randint(0, 100, (1, 2, 4, 4, 4)).to(dtype)
    assert torch.equal(segkernels.max_pool3d_with_indices(x3, 2)[0], F.max_pool3d(x3, 2))
