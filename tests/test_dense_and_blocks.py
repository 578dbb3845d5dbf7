"""Dense evaluation (shift_and_stitch) and the architecture blocks on compact-index pooling
(ChainedResidualPooling, FRRU, BilinearUpsample) against their plain-PyTorch definitions:
values, gradients, autograd-saved bytes, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segkernels
from helpers import requires_kernels
from peers import PlainCRP, offsets_by_definition
from segkernels.nn.blocks import bilinear_kernel

pytestmark = requires_kernels
D = torch.float64


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while fn runs (its graph's memory)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


# ------------------------------------------------------------------------------------------
# shift_and_stitch


@pytest.mark.parametrize("factor,kernel,size", [(2, 3, (9, 11)), (3, 3, (10, 10)), (4, 5, (13, 17)), (1, 3, (6, 6))])
def test_shift_and_stitch_of_a_strided_conv_is_the_stride_1_conv(factor, kernel, size):
    x = torch.randn(2, 3, *size, dtype=D, requires_grad=True)
    w = torch.randn(4, 3, kernel, kernel, dtype=D)
    dense = segkernels.shift_and_stitch(lambda t: F.conv2d(t, w, stride=factor), x, factor)
    stride1 = F.conv2d(F.pad(x, (0, factor - 1, 0, factor - 1)), w)
    assert dense.shape[2] == factor * ((size[0] - kernel) // factor + 1)
    torch.testing.assert_close(dense, stride1[..., :dense.shape[2], :dense.shape[3]])
    g = torch.randn_like(dense)
    a = torch.autograd.grad(dense, x, g)[0]
    b = torch.autograd.grad(stride1[..., :dense.shape[2], :dense.shape[3]], x, g)[0]
    torch.testing.assert_close(a, b)


def test_shift_and_stitch_interleaves_a_network_and_batches_shifts():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 5, 3, padding=1),
                        nn.MaxPool2d(2)).double()
    x = torch.randn(3, 3, 16, 12, dtype=D)
    calls = []

    def fn(t):
        calls.append(t.shape[0])
        return net(t)

    dense = segkernels.shift_and_stitch(fn, x, 4, max_batch=5)
    assert dense.shape == (3, 5, 16, 12) and calls == [5, 5, 5, 5, 5, 5, 5, 5, 5, 3]
    pad = F.pad(x, (0, 3, 0, 3))
    for dy, dx in [(0, 0), (1, 3), (3, 2)]:
        torch.testing.assert_close(dense[..., dy::4, dx::4], net(pad[..., dy:dy + 16, dx:dx + 12]))
    assert segkernels.shift_and_stitch(net, x[:0], 2).shape == (0, 5, 8, 6)


def test_shift_and_stitch_errors():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="factor"):
        segkernels.shift_and_stitch(lambda t: t, x, 0)
    with pytest.raises(TypeError, match="factor"):
        segkernels.shift_and_stitch(lambda t: t, x, 2.0)
    with pytest.raises(TypeError, match="fn must be callable"):
        segkernels.shift_and_stitch(None, x, 2)
    with pytest.raises(ValueError, match=r"x must be \(N, C, H, W\)"):
        segkernels.shift_and_stitch(lambda t: t, x[0], 2)
    with pytest.raises(ValueError, match="keep the batch"):
        segkernels.shift_and_stitch(lambda t: t[:1], x.expand(2, 3, 8, 8), 2)
    with pytest.raises(ValueError, match="max_batch"):
        segkernels.shift_and_stitch(lambda t: t, x, 2, max_batch=0)


# ------------------------------------------------------------------------------------------
# ChainedResidualPooling


@pytest.mark.parametrize("dtype", [D, torch.float32])
def test_chained_residual_pooling_matches_the_plain_block_with_a_third_of_its_saved_bytes(dtype):
    crp = segkernels.nn.ChainedResidualPooling(8, stages=4, kernel_size=5).to(dtype)
    plain = PlainCRP(crp.convs(), 5)
    x = torch.randn(2, 8, 13, 17, dtype=dtype)
    x[:, :, 4:8, 4:8] = 0  # ties inside windows: the gradient goes where F.max_pool2d sends it
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours_bytes, a = saved_bytes(lambda: crp(xa))
    plain_bytes, b = saved_bytes(lambda: plain(xb))
    torch.testing.assert_close(a, b)
    g = torch.randn_like(a)
    ga = torch.autograd.grad(a, [xa, *crp.parameters()], g)
    gb = torch.autograd.grad(b, [xb, *crp.parameters()], g)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v)
    assert ours_bytes <= 0.6 * plain_bytes, (ours_bytes, plain_bytes)
    assert "stages=4" in repr(crp) and sorted(crp.state_dict()) == [f"{i}_outvar_dimred.weight" for i in range(1, 5)]


def test_chained_residual_pooling_gradcheck_and_errors():
    crp = segkernels.nn.ChainedResidualPooling(3, stages=2, kernel_size=3).double()
    x = torch.randn(1, 3, 5, 6, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(crp, (x,))
    with pytest.raises(ValueError, match="odd"):
        segkernels.nn.ChainedResidualPooling(3, kernel_size=4)
    with pytest.raises(ValueError, match=r"x must be \(N, 3, H, W\)"):
        crp(torch.randn(1, 4, 5, 5, dtype=D))


# ------------------------------------------------------------------------------------------
# FRRU


def test_frru_matches_the_plain_unit():
    torch.manual_seed(0)
    unit = segkernels.nn.FRRU(16, 24, scale=4).double()
    y = torch.randn(2, 16, 5, 6, dtype=D, requires_grad=True)
    z = torch.randn(2, 32, 20, 24, dtype=D, requires_grad=True)
    y2, z2 = unit(y, z)
    # pytest-semseg's FRRU, with the same layers
    x = torch.cat([y, F.max_pool2d(z, 4, 4)], 1)
    ry = unit.conv2(unit.conv1(x))
    rz = z + F.interpolate(unit.conv_res(ry), scale_factor=4, mode="nearest")
    torch.testing.assert_close(y2, ry)
    torch.testing.assert_close(z2, rz)
    ga = torch.autograd.grad((y2.sum(), z2.square().sum()), [y, z, *unit.parameters()])
    gb = torch.autograd.grad((ry.sum(), rz.square().sum()), [y, z, *unit.parameters()])
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v)
    assert y2.shape == (2, 24, 5, 6) and z2.shape == z.shape
    with pytest.raises(ValueError, match="multiples of scale"):
        unit(y, z[..., :19, :])
    with pytest.raises(ValueError, match=r"y must be \(2, 16, 5, 6\)"):
        unit(y[:, :8], z)


# ------------------------------------------------------------------------------------------
# BilinearUpsample


@pytest.mark.parametrize("factor", [1, 2, 3, 4, 8])
def test_bilinear_upsample_starts_as_f_interpolate_away_from_the_border(factor):
    m = segkernels.nn.BilinearUpsample(3, factor).double()
    x = torch.randn(2, 3, 9, 7, dtype=D)
    out = m(x)
    ref = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    assert out.shape == ref.shape == (2, 3, 9 * factor, 7 * factor)
    inner = (Ellipsis, slice(factor, out.shape[2] - factor), slice(factor, out.shape[3] - factor))
    torch.testing.assert_close(out[inner], ref[inner])
    assert isinstance(m.weight, nn.Parameter)
    fixed = segkernels.nn.BilinearUpsample(3, factor, learnable=False)
    assert not isinstance(fixed.weight, nn.Parameter) and "weight" in fixed.state_dict()


def test_bilinear_kernel_is_fcns():
    # FCN's surgery.upsample_filt(4) for factor 2, written out.
    k = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(bilinear_kernel(2), torch.outer(k, k))
    assert bilinear_kernel(3).shape == (5, 5)


# ------------------------------------------------------------------------------------------
# offset_max_pool2d


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [D, torch.float32, torch.bfloat16])
def test_offset_max_pool2d_is_k2_poolings(k, dtype):
    x = torch.randn(2, 3, 17, 14, dtype=D)
    x[x < 0.2] = 0  # ties
    x = x.to(dtype).requires_grad_()
    out = segkernels.offset_max_pool2d(x, k)
    ref = offsets_by_definition(x, k)
    assert out.shape == (2, k * k, 3, (17 - k + 1) // k, (14 - k + 1) // k)
    assert torch.equal(out, ref)
    g = torch.randn(out.shape, dtype=D).to(dtype)
    ga, gb = torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0]
    if dtype == torch.bfloat16:  # summed in float32 here, in bfloat16 by ATen
        torch.testing.assert_close(ga.float(), gb.float(), rtol=2e-2, atol=2e-2)
    else:
        torch.testing.assert_close(ga, gb)


def test_offset_max_pool2d_errors():
    with pytest.raises(ValueError, match="too small"):
        segkernels.offset_max_pool2d(torch.randn(1, 2, 4, 9), 3)
    with pytest.raises(ValueError, match="kernel_size"):
        segkernels.offset_max_pool2d(torch.randn(1, 2, 9, 9), 0)
    with pytest.raises(TypeError, match="x must be a floating"):
        segkernels.offset_max_pool2d(torch.zeros(1, 2, 9, 9, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"x must be \(N, C, H, W\)"):
        segkernels.offset_max_pool2d(torch.randn(2, 9, 9), 3)
