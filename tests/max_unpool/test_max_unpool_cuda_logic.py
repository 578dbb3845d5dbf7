"""The CUDA kernels' logic: CUDA against CPU, and the CUDA element functions (tiled unpooling,
pooling, the 32-bit fast divider) run on the CPU through the test-only ops of get_testing_ops()."""

import pytest
import torch

import segkernels
from helpers import (
    FLOAT_DTYPES,
    assert_close,
    get_testing_ops,
    requires_kernels,
    to_layout,
)
from segkernels.ops.max_unpool import (
    compact_to_flat_indices,
    reference_max_pool_with_indices,
    reference_max_unpool,
)
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


# The CUDA kernel for wide or overlapping windows on NCHW maps (pool_separable_kernel): its tile
# functions run on the CPU a tile at a time, as a block runs them. Shapes span several 16 x 32
# tiles with partial ones at the bottom and right; geometries: RefineNet's 5 x 5 / 1, stems'
# 3 x 3 / 2, even, one-sided, wide and tall windows, padding, ceil_mode.
SEPARABLE_GEOMETRIES = [
    ((5, 5), (1, 1), (2, 2), (1, 1), False),
    ((3, 3), (2, 2), (1, 1), (1, 1), True),
    ((4, 3), (1, 1), (1, 1), (1, 1), False),
    ((5, 4), (2, 1), (2, 2), (1, 1), True),
    ((1, 5), (1, 1), (0, 2), (1, 1), False),
    ((7, 2), (3, 2), (3, 0), (1, 1), True),
    ((9, 9), (1, 1), (4, 4), (1, 1), False),
]
SEPARABLE_SHAPES = [(1, 2, 37, 70), (2, 1, 5, 3), (1, 1, 33, 97)]


@pytest.mark.parametrize("narrow", [True, False], ids=["int32", "int64"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("geometry", SEPARABLE_GEOMETRIES)
def test_pool_separable_tile_logic_matches_aten(geometry, dtype, narrow):
    k, s, p, d, c = geometry
    for shape in SEPARABLE_SHAPES:
        if any(n < kk for n, kk in zip(shape[2:], k)) and not c:
            continue  # ATen refuses a map smaller than its window without ceil_mode
        for kind in ("randn", "ties", "nan", "all_neg_inf_rows"):
            x = _random_input(shape, dtype, "cpu", "nan" if kind == "all_neg_inf_rows" else kind)
            if kind == "all_neg_inf_rows":  # whole windows of -inf report their first valid tap
                x[..., :3, :] = float("-inf")
            ref_values, ref_indices = _aten_pool(x, geometry)
            _, ref_compact = reference_max_pool_with_indices(x, k, s, p, d, c, compact=True)
            for compact in (False, True):
                values, indices = get_testing_ops().max_pool_separable_logic(x, k, s, p, c, compact, narrow)
                assert indices.dtype == (torch.uint8 if compact else torch.int64)
                assert_close(values, ref_values, exact=True)
                assert_close(indices, ref_compact if compact else ref_indices, exact=True)


def test_pool_separable_tile_logic_refuses_what_the_kernel_does_not_take():
    ops = get_testing_ops()
    x = torch.randn(1, 2, 40, 40)
    with pytest.raises(ValueError, match="separable kernel takes"):  # disjoint 2 x 2 windows
        ops.max_pool_separable_logic(x, [2, 2], [2, 2], [0, 0], False, True, True)
    # 15 strides of 20 rows plus the window: 325 scratch rows, past the 48 KiB of shared memory
    # (CUDA runs it with the per-element kernel).
    with pytest.raises(ValueError, match="too tall"):
        ops.max_pool_separable_logic(torch.randn(1, 1, 400, 8), [25, 3], [20, 1], [0, 1], False, True, True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_separable_pooling_matches_aten(dtype):
    # The tiled separable kernel, and the per-element one it leaves tall windows to.
    for geometry in SEPARABLE_GEOMETRIES + [((25, 3), (20, 1), (0, 1), (1, 1), False)]:
        shape = (2, 3, 400, 70) if geometry[0][0] == 25 else (2, 3, 37, 70)
        x = _random_input(shape, dtype, "cuda", "nan")
        ref_values, ref_indices = _aten_pool(x.cpu(), geometry)
        for compact in (False, True):
            v, i = _pool(x, geometry, compact)
            assert_close(v.cpu(), ref_values, exact=True)
            k, s, p, d, c = geometry
            expected = reference_max_pool_with_indices(x.cpu(), k, s, p, d, c, compact=True)[1] if compact else ref_indices
            assert_close(i.cpu(), expected, exact=True)


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


# ----------------------------------------------------------------------------------------------
# The 32-bit fast divider


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
