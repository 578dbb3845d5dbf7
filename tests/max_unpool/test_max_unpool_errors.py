"""max_pool / max_unpool errors: a clear Python exception, never a crash or an out-of-bounds
write (bad and unchecked indices, bad arguments, where ATen raises, direct op calls)."""

import pytest
import torch
import torch.nn.functional as F

import segkernels
from helpers import DEVICES, assert_close, requires_kernels
from segkernels.ops.max_unpool import reference_max_unpool

pytestmark = requires_kernels


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
    with pytest.raises(TypeError, match="input must be a floating or integer tensor"):
        segkernels.max_pool2d_with_indices(torch.ones(1, 1, 4, 4, dtype=torch.bool), 2)
    with pytest.raises(TypeError, match="input must be a floating tensor"):  # as F.max_unpool2d
        segkernels.max_unpool2d(torch.ones(1, 1, 2, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 2, dtype=torch.long), 2)
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
