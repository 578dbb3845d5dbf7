"""max_pool / max_unpool gradients (gradcheck, gradgradcheck, against ATen's backward), the eager
wrappers' autograd, opcheck, torch.compile, deterministic mode and autocast."""

import pytest
import torch
import torch.nn.functional as F

import segkernels
from helpers import DEVICES, assert_close, gradcheck, requires_kernels, run_opcheck, to_layout
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
    assert "_function" in type(values.grad_fn).__name__
    direct_values, direct_indices = ops.max_pool_with_indices.default(x, *geometry, False, False)
    assert "_function" not in type(direct_values.grad_fn).__name__
    assert torch.equal(indices, direct_indices)
    v = values.detach().requires_grad_(True)
    out = segkernels.max_unpool2d(v, indices, (3, 2), 2, (1, 0), output_size=(7, 9))
    direct_out = ops.max_unpool.default(v, indices, *geometry, [7, 9], True)
    assert "_function" in type(out.grad_fn).__name__
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("compact", [False, True])
def test_overlapping_pool_backward_is_atens_sum_bit_for_bit(dtype, compact):
    # The CPU backward of overlapping windows adds each plane's entries in output order, as
    # ATen's kernel does: the same sums, bit for bit (float32 and float64; 16-bit inputs are
    # summed in float32 and rounded once, ATen rounds after every addition).
    for geometry in [GEOMETRIES_2D[1], GEOMETRIES_2D[2], *GEOMETRIES_2D[-3:]]:
        x = _random_input(SHAPES_2D[0], dtype, "cpu", "ties").requires_grad_(True)
        values, _ = _pool(x, geometry, compact=compact)
        g = torch.randn_like(values)
        (grad,) = torch.autograd.grad(values, x, g)
        x2 = x.detach().clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(_aten_pool(x2, geometry)[0], x2, g)
        assert torch.equal(grad, ref), geometry
