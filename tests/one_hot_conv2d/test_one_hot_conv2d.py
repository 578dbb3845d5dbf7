"""one_hot_conv2d, label_fractions and nn.OneHotConv2d against the float64 references (the one-hot
map, then F.conv2d / F.avg_pool2d), their gradients, determinism, opcheck, torch.compile, autocast,
vmap, the Triton kernels under the interpreter, and their argument errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segkernels
from helpers import (
    DEVICES,
    FLOAT_DTYPES,
    assert_close,
    assert_no_nan,
    compile_launches_for_sm90,
    gradcheck,
    poison_outputs,
    record_triton_launches,
    requires_kernels,
    run_opcheck,
    tolerances,
)
from segkernels._library import triton_available, triton_runs_on
from segkernels.ops.one_hot_conv2d import one_hot_map, reference_label_fractions, reference_one_hot_conv2d

pytestmark = requires_kernels
ops = torch.ops.segkernels
IGNORE = 255

# (classes, out_channels, kernel, stride, padding, dilation, (N, H, W)): SPADE's 3 x 3 "same",
# the label autoencoder's 4 x 4 stride 2, a dilated one, 1 x 1 (an embedding), a non-square
# kernel with uneven strides, a kernel as large as the padded map, and enough channels and
# positions for every vector path and partial block of the CPU kernels (77 = 64 + 8 + 5
# channels; rows of 75 = 64 + 8 + 3 positions; 675 positions per image, past a 512 chunk).
CONFIGS = [
    (7, 5, (3, 3), (1, 1), (1, 1), (1, 1), (2, 9, 11)),
    (5, 6, (4, 4), (2, 2), (1, 1), (1, 1), (2, 12, 10)),
    (4, 3, (3, 3), (1, 1), (2, 2), (2, 2), (1, 8, 9)),
    (9, 4, (1, 1), (1, 1), (0, 0), (1, 1), (3, 5, 6)),
    (3, 9, (2, 3), (2, 1), (0, 2), (1, 1), (2, 7, 6)),
    (3, 2, (3, 4), (1, 1), (1, 0), (1, 1), (1, 1, 4)),
    (11, 77, (3, 3), (1, 1), (1, 1), (1, 1), (2, 9, 75)),
]
IDS = [f"C{c[0]}-O{c[1]}-k{c[2][0]}x{c[2][1]}-s{c[3][0]}" for c in CONFIGS]


def _labels(shape, classes, device="cpu", dtype=torch.int64, ignore_share=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, shape, generator=g)
    y[torch.rand(shape, generator=g) < ignore_share] = IGNORE
    return y.to(device=device, dtype=dtype)


def _weight(o, c, k, dtype=torch.float32, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(o, c, *k, generator=g).to(device=device, dtype=dtype)


def _expected(labels, weight, bias, stride, padding, dilation):
    """The float64 reference, cast to the kernel's dtype."""
    out = reference_one_hot_conv2d(labels, weight.double(), None if bias is None else bias.double(), stride, padding,
                                   dilation, IGNORE)
    return out.to(weight.dtype)


# ----------------------------------------------------------------------------------------------
# References


def test_reference_is_f_one_hot_then_conv2d():
    labels = _labels((2, 6, 7), 5, ignore_share=0.0)
    weight = _weight(3, 5, (3, 3), torch.float64)
    onehot = F.one_hot(labels, 5).permute(0, 3, 1, 2).double()
    torch.testing.assert_close(one_hot_map(labels, 5, dtype=torch.float64), onehot)
    torch.testing.assert_close(reference_one_hot_conv2d(labels, weight, None, (1, 1), (1, 1), (1, 1)),
                               F.conv2d(onehot, weight, padding=1))
    torch.testing.assert_close(reference_label_fractions(labels, 5, 2), F.avg_pool2d(onehot.float(), 2))
    # An ignored pixel is an all-zero column of the one-hot map.
    labels[0, 0, 0] = IGNORE
    assert one_hot_map(labels, 5)[0, :, 0, 0].sum() == 0


# ----------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_forward_matches_reference(config, dtype, device):
    c, o, k, stride, padding, dilation, shape = config
    labels = _labels(shape, c, device)
    weight = _weight(o, c, k, dtype, device)
    bias = torch.randn(o, device=device).to(dtype)
    for b in (bias, None):
        with poison_outputs():
            out = segkernels.one_hot_conv2d(labels, weight, b, stride, padding, dilation)
        assert out.is_contiguous()
        assert_no_nan(out)
        assert_close(out, _expected(labels, weight, b, stride, padding, dilation))


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                                         torch.uint16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_any_label_dtype_and_layout(label_dtype, layout):
    labels = _labels((2, 10, 9), 6, dtype=torch.int64)
    ignore = 100  # fits every dtype above
    labels[labels == IGNORE] = ignore
    labels = labels.to(label_dtype)
    if layout == "transposed":
        labels = labels.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "strided":
        wide = torch.zeros(2, 10, 18, dtype=label_dtype)
        wide[:, :, ::2] = labels
        labels = wide[:, :, ::2]
    weight = _weight(4, 6, (3, 3), torch.float64)
    out = segkernels.one_hot_conv2d(labels, weight, None, 1, 1, ignore_index=ignore)
    expected = reference_one_hot_conv2d(labels.long(), weight, None, (1, 1), (1, 1), (1, 1), ignore)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ignore,label_dtype", [(2, torch.int64), (0, torch.uint8), (-1, torch.int8)],
                         ids=["class-2", "class-0-uint8", "negative-int8"])
def test_ignore_index_that_is_a_class_or_negative(ignore, label_dtype):
    # The kernels' lookups are branch-free on checked labels (a label outside [0, C) can only be
    # ignore_index there); an ignore_index inside [0, C) must still drop its pixels, forward and
    # gradient, and the borders (padding 2, stride 2) must still read nothing.
    labels = _labels((2, 11, 13), 5, ignore_share=0.0)
    labels[torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)) < 0.3] = ignore
    labels = labels.to(label_dtype)
    weight = _weight(6, 5, (3, 4), torch.float64).requires_grad_()
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    out = segkernels.one_hot_conv2d(labels, weight, bias, 2, 2, ignore_index=ignore)
    expected = reference_one_hot_conv2d(labels.long(), weight, bias, (2, 2), (2, 2), (1, 1), ignore)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (weight, bias), g)
    want = torch.autograd.grad(expected, (weight, bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel lengths")
def test_padding_strings_match_f_conv2d():
    labels = _labels((1, 7, 8), 4, ignore_share=0.0)
    onehot = F.one_hot(labels, 4).permute(0, 3, 1, 2).double()
    for k, d in [((3, 3), 1), ((4, 2), 1), ((2, 3), 2)]:
        weight = _weight(3, 4, k, torch.float64)
        for padding in ("same", "valid"):
            out = segkernels.one_hot_conv2d(labels, weight, None, padding=padding, dilation=d)
            torch.testing.assert_close(out, F.conv2d(onehot, weight, padding=padding, dilation=d))
    with pytest.raises(ValueError, match="stride 1"):
        segkernels.one_hot_conv2d(labels, weight, padding="same", stride=2)
    with pytest.raises(ValueError, match="padding must be"):
        segkernels.one_hot_conv2d(labels, weight, padding="full")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_no_output_channels(device):
    weight = _weight(3, 4, (3, 3), device=device)
    labels = torch.zeros(0, 5, 6, dtype=torch.int64, device=device)
    out = segkernels.one_hot_conv2d(labels, weight, None, 1, 1)
    assert out.shape == (0, 3, 5, 6)
    w = weight.clone().requires_grad_()
    segkernels.one_hot_conv2d(labels, w, None, 1, 1).sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    empty = torch.zeros(0, 4, 3, 3, device=device, requires_grad=True)
    out = segkernels.one_hot_conv2d(_labels((2, 5, 6), 4, device), empty, None, 1, 1)
    assert out.shape == (2, 0, 5, 6)


def test_fully_ignored_map_gives_the_bias():
    labels = torch.full((2, 6, 7), IGNORE)
    weight, bias = _weight(3, 4, (3, 3)), torch.randn(3)
    out = segkernels.one_hot_conv2d(labels, weight, bias, 1, 1)
    assert torch.equal(out, bias.view(1, 3, 1, 1).expand(2, 3, 6, 7))


# ----------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_gradients_match_reference(config, dtype, device):
    c, o, k, stride, padding, dilation, shape = config
    labels = _labels(shape, c, device)
    weight = _weight(o, c, k, dtype, device).requires_grad_()
    bias = torch.randn(o, device=device).to(dtype).requires_grad_()
    out = segkernels.one_hot_conv2d(labels, weight, bias, stride, padding, dilation)
    grad = torch.randn(out.shape, device=device).to(dtype)
    with poison_outputs():
        gw, gb = torch.autograd.grad(out, (weight, bias), grad)
    w64 = weight.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    ref = reference_one_hot_conv2d(labels, w64, b64, stride, padding, dilation, IGNORE)
    rw, rb = torch.autograd.grad(ref, (w64, b64), grad.double(), retain_graph=True)
    abs_w, abs_b = torch.autograd.grad(ref, (w64, b64), grad.double().abs())  # sums of |terms|
    _assert_sum_close(gw, rw, abs_w)
    _assert_sum_close(gb, rb, abs_b)


def _assert_sum_close(actual, expected, abs_sum):
    """actual: a gradient summed over many positions in float32 (float64 for float64), against
    the float64 expected. Besides the dtype's tolerance, allows the accumulation's rounding: a
    few ulps of the sum of the terms' magnitudes (a missing or extra term is far above it)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    acc_eps = torch.finfo(torch.float64 if actual.dtype == torch.float64 else torch.float32).eps
    rtol, atol = tolerances(actual.dtype)
    expected_cast = expected.to(actual.dtype).double()  # the dtype's own rounding of the exact sum
    bound = atol + rtol * expected_cast.abs() + 8 * acc_eps * abs_sum
    error = (actual.double() - expected_cast).abs()
    assert bool((error <= bound).all()), f"largest error beyond the bound: {(error - bound).max().item():.3g}"


def test_gradcheck_and_double_backward():
    labels = _labels((2, 5, 6), 4)
    weight = _weight(3, 4, (3, 3), torch.float64).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fn = lambda w, b: segkernels.one_hot_conv2d(labels, w, b, 2, 1)  # noqa: E731
    gradcheck(fn, (weight, bias))
    assert torch.autograd.gradgradcheck(fn, (weight, bias))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cpu_code_paths_give_the_same_bits(dtype, monkeypatch):
    # AVX-512, AVX2 and the baseline code add in the same order per element: equal bits. Each
    # is also checked against the reference by the tests above when run with
    # SEGKERNELS_NO_AVX512=1 or SEGKERNELS_NO_AVX2=1.
    c, o, k, stride, padding, dilation, shape = CONFIGS[-1]
    labels = _labels(shape, c)
    weight, bias = _weight(o, c, k, dtype), torch.randn(o).to(dtype)
    args = (list(stride), list(padding), list(dilation), IGNORE)
    grad = torch.randn(ops.one_hot_conv2d(labels, weight, bias, *args).shape).to(dtype)

    def run():
        return (ops.one_hot_conv2d(labels, weight, bias, *args),
                *ops.one_hot_conv2d_weight_backward(grad, labels, list(weight.shape), *args))

    widest = run()
    for switch in ("SEGKERNELS_NO_AVX512", "SEGKERNELS_NO_AVX2"):
        monkeypatch.setenv(switch, "1")
        for a, b in zip(widest, run()):
            assert_close(a, b, exact=True)


@pytest.mark.parametrize("classes", [1, 30, 31])
def test_few_class_forward_path_edges(classes, monkeypatch):
    # With AVX-512 and fewer than 31 classes the float32 forward picks weights by register
    # permutes, 128 positions at a time, then 32 with masked stores: rows of 300 columns take
    # both and a tail; 31 classes take the general path. Same bits as the AVX2 code, and the
    # float64 reference's values.
    labels = _labels((2, 3, 300), classes)
    weight, bias = _weight(5, classes, (3, 3)), torch.randn(5)
    args = ([1, 1], [1, 1], [1, 1], IGNORE)
    out = ops.one_hot_conv2d(labels, weight, bias, *args)
    assert_close(out, _expected(labels, weight, bias, (1, 1), (1, 1), (1, 1)))
    monkeypatch.setenv("SEGKERNELS_NO_AVX512", "1")
    assert_close(out, ops.one_hot_conv2d(labels, weight, bias, *args), exact=True)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_backward_reads_any_gradient_layout(device):
    # NCHW and channels_last gradients are read in place, expanded ones (out.sum().backward())
    # through their zero strides, others copied: the same bits in every case.
    c, o, k, stride, padding, dilation, shape = CONFIGS[-1]
    labels = _labels(shape, c, device)
    weight = _weight(o, c, k, device=device)
    args = (list(weight.shape), list(stride), list(padding), list(dilation), IGNORE)
    out_shape = segkernels.one_hot_conv2d(labels, weight, None, stride, padding, dilation).shape
    grad = torch.randn(out_shape, device=device)
    expected = ops.one_hot_conv2d_weight_backward(grad, labels, *args)
    layouts = {
        "channels_last": grad.to(memory_format=torch.channels_last),
        "strided": torch.randn(*out_shape[:3], 2 * out_shape[3], device=device)[..., ::2].copy_(grad),
        "transposed planes": grad.transpose(2, 3).contiguous().transpose(2, 3),
        "channels_last, every other channel": torch.randn(out_shape[0], *out_shape[2:], 2 * out_shape[1],
                                                          device=device)[..., ::2].permute(0, 3, 1, 2).copy_(grad),
    }
    for name, g in layouts.items():
        torch.testing.assert_close(g, grad, rtol=0, atol=0)
        for a, b in zip(ops.one_hot_conv2d_weight_backward(g, labels, *args), expected):
            assert_close(a, b, exact=True)
    ones = ops.one_hot_conv2d_weight_backward(torch.ones(1, device=device).expand(out_shape), labels, *args)
    for a, b in zip(ones, ops.one_hot_conv2d_weight_backward(torch.ones(out_shape, device=device), labels, *args)):
        assert_close(a, b, exact=True)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_are_bitwise_repeatable(device):
    labels = _labels((2, 33, 41), 19, device)
    # 40 channels: one wide block and a partial one on 1 or 2 threads, narrow blocks on 3.
    weight = _weight(40, 19, (3, 3), device=device).requires_grad_()
    out = segkernels.one_hot_conv2d(labels, weight, None, 1, 1)
    grad = torch.randn(out.shape, device=device)
    first = torch.autograd.grad(out, weight, grad)[0]
    threads = torch.get_num_threads()
    try:
        for n in (1, threads, 3):
            torch.set_num_threads(n)
            again = torch.autograd.grad(segkernels.one_hot_conv2d(labels, weight, None, 1, 1), weight, grad)[0]
            assert torch.equal(first, again), n
    finally:
        torch.set_num_threads(threads)


def test_per_sample_gradients_under_vmap():
    # torch.func's recipe: vmap over the labels of a batch, grad of each sample's loss.
    labels = _labels((4, 6, 7), 5)
    weight = _weight(3, 5, (3, 3), torch.float64)
    bias = torch.randn(3, dtype=torch.float64)

    def loss(w, b, y):
        return segkernels.one_hot_conv2d(y[None], w, b, 1, 1).square().mean()

    def ref_loss(w, b, y):
        return reference_one_hot_conv2d(y[None], w, b, (1, 1), (1, 1), (1, 1), IGNORE).square().mean()

    got = torch.vmap(torch.func.grad(loss, (0, 1)), in_dims=(None, None, 0))(weight, bias, labels)
    for i in range(4):
        expected = torch.func.grad(ref_loss, (0, 1))(weight, bias, labels[i])
        for a, b in zip(got, expected):
            torch.testing.assert_close(a[i], b, rtol=1e-10, atol=1e-12)
    # vmapped labels with a shared weight: one folded call, the same as the batch at once.
    out = torch.vmap(lambda y: segkernels.one_hot_conv2d(y, weight, bias, 1, 1))(labels.view(2, 2, 6, 7))
    torch.testing.assert_close(out.reshape(4, 3, 6, 7), segkernels.one_hot_conv2d(labels, weight, bias, 1, 1))


# ----------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, autocast


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    labels = _labels((2, 6, 5), 4, device)
    weight = _weight(3, 4, (3, 3), device=device, dtype=torch.float64).requires_grad_()
    bias = torch.randn(3, device=device, dtype=torch.float64, requires_grad=True)
    run_opcheck(ops.one_hot_conv2d.default, (labels, weight, bias, [2, 1], [1, 1], [1, 1], IGNORE))
    run_opcheck(ops.one_hot_conv2d.default, (labels.to(torch.uint8), weight, None, [1, 1], [0, 2], [2, 1], IGNORE))
    grad = torch.randn(2, 3, 3, 5, device=device, dtype=torch.float64, requires_grad=True)
    run_opcheck(ops.one_hot_conv2d_weight_backward.default, (grad, labels, [3, 4, 3, 3], [2, 1], [1, 1], [1, 1],
                                                            IGNORE))
    run_opcheck(ops.label_fractions.default, (labels, 4, 2, IGNORE))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device):
    labels = _labels((2, 8, 9), 5, device)
    weight = _weight(4, 5, (3, 3), device=device).requires_grad_()
    bias = torch.randn(4, device=device, requires_grad=True)

    def step(y, w, b):
        out = segkernels.one_hot_conv2d(y, w, b, 1, 1)
        return out.relu().mean() + segkernels.label_fractions(y, 5, 2).sum() * 0

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(labels, weight, bias)
    gw, gb = torch.autograd.grad(loss, (weight, bias))
    ref_w, ref_b = torch.autograd.grad(step(labels, weight, bias), (weight, bias))
    torch.testing.assert_close(gw, ref_w)
    torch.testing.assert_close(gb, ref_b)


def test_autocast_runs_in_the_lower_precision_like_conv2d():
    labels = _labels((2, 6, 7), 5)
    weight, bias = _weight(3, 5, (3, 3)), torch.randn(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = segkernels.one_hot_conv2d(labels, weight, bias, 1, 1)
        ref = F.conv2d(one_hot_map(labels, 5), weight, bias, padding=1)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert_close(out, _expected(labels, weight.bfloat16(), bias.bfloat16(), (1, 1), (1, 1), (1, 1)))


# ----------------------------------------------------------------------------------------------
# Errors


def test_argument_errors():
    labels, weight = _labels((2, 6, 7), 4), _weight(3, 4, (3, 3))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        segkernels.one_hot_conv2d(labels.float(), weight)
    with pytest.raises(ValueError, match=r"labels must be \(N, H, W\)"):
        segkernels.one_hot_conv2d(labels[None], weight)
    with pytest.raises(TypeError, match="weight must be a floating tensor"):
        segkernels.one_hot_conv2d(labels, weight.long())
    with pytest.raises(ValueError, match="weight must be"):
        segkernels.one_hot_conv2d(labels, weight[0])
    with pytest.raises(ValueError, match="stride"):
        segkernels.one_hot_conv2d(labels, weight, stride=0)
    with pytest.raises(ValueError, match="padding"):
        segkernels.one_hot_conv2d(labels, weight, padding=-1)
    with pytest.raises(ValueError, match="dilation"):
        segkernels.one_hot_conv2d(labels, weight, dilation=(1, 0))
    with pytest.raises(ValueError, match="stride must be an int or a pair"):
        segkernels.one_hot_conv2d(labels, weight, stride=(1, 1, 1))
    with pytest.raises(ValueError, match="larger than the padded labels"):
        segkernels.one_hot_conv2d(labels[:, :2], weight)
    with pytest.raises(ValueError, match="bias must be"):
        segkernels.one_hot_conv2d(labels, weight, torch.randn(4))
    with pytest.raises(TypeError, match="bias must have weight's dtype"):
        segkernels.one_hot_conv2d(labels, weight, torch.randn(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="ignore_index"):
        segkernels.one_hot_conv2d(labels, weight, ignore_index=1.5)


@pytest.mark.parametrize("device", DEVICES)
def test_labels_out_of_range_raise_index_error(device):
    weight = _weight(3, 4, (3, 3), device=device)
    for bad in (4, -1, 254):
        labels = _labels((2, 6, 7), 4, device)
        labels[1, 3, 2] = bad
        for fn in (lambda y: segkernels.one_hot_conv2d(y, weight, None, 1, 1),
                   lambda y: segkernels.one_hot_conv2d(y, weight.double(), None, 1, 1),
                   lambda y: segkernels.label_fractions(y, 4, 2)):
            with pytest.raises(IndexError, match=r"labels: .*outside \[0, 4\)"):
                fn(labels)
            with pytest.raises(RuntimeError):  # as F.conv2d's one_hot would raise
                fn(labels)


@pytest.mark.parametrize("device", DEVICES)
def test_labels_no_tap_reads_are_checked_too(device):
    # Stride 2 and a 1 x 1 kernel skip odd rows and columns; label_fractions skips the rows and
    # columns past the last whole cell. An invalid label there is still refused, as the
    # reference's one-hot map refuses it, and counted once.
    labels = torch.zeros(1, 5, 5, dtype=torch.int64, device=device)
    labels[0, 1, 1] = 7
    weight = torch.randn(2, 3, 1, 1, device=device)
    with pytest.raises(IndexError, match="1 value"):
        segkernels.one_hot_conv2d(labels, weight, stride=2)
    with pytest.raises(IndexError, match="1 value"):
        ops.one_hot_conv2d_weight_backward(torch.ones(1, 2, 3, 3, device=device), labels, [2, 3, 1, 1], [2, 2],
                                           [0, 0], [1, 1], IGNORE)
    labels[0, 1, 1] = 0
    labels[0, 4, 2] = -5
    with pytest.raises(IndexError, match="1 value"):
        segkernels.label_fractions(labels, 3, 2)
    labels[0, 4, 2] = 9  # read by all nine taps of a 3 x 3 kernel: still one value
    with pytest.raises(IndexError, match="labels hold 1 value"):
        segkernels.one_hot_conv2d(labels, torch.randn(2, 3, 3, 3, device=device), padding=1)


def test_direct_op_calls_are_checked():
    # The ops guard memory safety themselves (the public functions give friendlier errors first).
    labels, weight = _labels((2, 6, 7), 4), _weight(3, 4, (3, 3))
    with pytest.raises(ValueError, match="larger than the padded labels"):
        ops.one_hot_conv2d(labels[:, :1], weight, None, [1, 1], [0, 0], [1, 1], IGNORE)
    with pytest.raises(ValueError, match="stride >= 1"):
        ops.one_hot_conv2d(labels, weight, None, [0, 1], [0, 0], [1, 1], IGNORE)
    with pytest.raises(ValueError, match="grad_output must be"):
        ops.one_hot_conv2d_weight_backward(torch.randn(2, 3, 6, 6), labels, [3, 4, 3, 3], [1, 1], [1, 1], [1, 1],
                                           IGNORE)
    with pytest.raises(TypeError, match="labels must be an integer"):
        ops.label_fractions(labels.float(), 4, 2, IGNORE)
    bad = labels.clone()
    bad[0, 0, 0] = 7
    with pytest.raises(IndexError, match="outside"):
        ops.one_hot_conv2d(bad, weight, None, [1, 1], [1, 1], [1, 1], IGNORE)


# ----------------------------------------------------------------------------------------------
# label_fractions


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("factor, shape, classes", [(1, (2, 5, 6), 3), (3, (2, 11, 13), 5), (8, (1, 32, 40), 19),
                                                    (4, (2, 5, 9), 4)])
def test_label_fractions_match_avg_pool2d(factor, shape, classes, device):
    labels = _labels(shape, classes, device, dtype=torch.uint8 if classes < 200 else torch.int64)
    with poison_outputs():
        out = segkernels.label_fractions(labels, classes, factor)
    assert out.dtype == torch.float32 and out.shape == (shape[0], classes, shape[1] // factor, shape[2] // factor)
    assert_no_nan(out)
    torch.testing.assert_close(out, reference_label_fractions(labels, classes, factor), rtol=0, atol=0)


def test_label_fractions_errors():
    labels = _labels((2, 6, 9), 4)
    with pytest.raises(ValueError, match="at least factor"):  # avg_pool2d refuses it too
        segkernels.label_fractions(labels, 4, 7)
    with pytest.raises(ValueError, match="factor"):
        segkernels.label_fractions(labels, 4, 0)
    with pytest.raises(ValueError, match="num_classes"):
        segkernels.label_fractions(labels, 0, 2)
    with pytest.raises(TypeError, match="labels must be an integer"):
        segkernels.label_fractions(labels.float(), 4, 2)


# ----------------------------------------------------------------------------------------------
# nn.OneHotConv2d


def test_module_is_a_conv2d_over_the_one_hot_map():
    torch.manual_seed(0)
    module = segkernels.nn.OneHotConv2d(6, 4, 3, stride=2, padding=1)
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 3, stride=2, padding=1)  # the same initialisation
    assert module.state_dict().keys() == conv.state_dict().keys()
    for k, v in conv.state_dict().items():
        assert torch.equal(module.state_dict()[k], v), k
    conv.load_state_dict(module.state_dict())
    module.load_state_dict(conv.state_dict())
    labels = _labels((2, 9, 8), 6)
    torch.testing.assert_close(module(labels), conv(one_hot_map(labels, 6)))
    assert "OneHotConv2d(6, 4, kernel_size=(3, 3)" in repr(module)
    assert segkernels.nn.OneHotConv2d(6, 4, 1, bias=False).bias is None


# ----------------------------------------------------------------------------------------------
# Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1)


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("config", CONFIGS[:3] + CONFIGS[4:5] + CONFIGS[6:], ids=IDS[:3] + IDS[4:5] + IDS[6:])
def test_triton_kernels_match_reference(config):
    from segkernels.ops.one_hot_conv2d import triton as tk

    c, o, k, stride, padding, dilation, shape = config
    labels = _labels(shape, c)
    if not triton_runs_on(labels):
        pytest.skip("run with TRITON_INTERPRET=1 to exercise the Triton kernels on CPU tensors")
    weight, bias = _weight(o, c, k), torch.randn(o)
    with poison_outputs():
        out = tk._one_hot_conv2d_triton(labels, weight, bias, list(stride), list(padding), list(dilation), IGNORE)
    assert_close(out, _expected(labels, weight, bias, stride, padding, dilation))
    grad = torch.randn(out.shape)
    with poison_outputs():
        gw, gb = tk._one_hot_conv2d_weight_backward_triton(grad, labels.to(torch.uint8), list(weight.shape),
                                                           list(stride), list(padding), list(dilation), IGNORE)
    w64 = weight.double().requires_grad_()
    b64 = bias.double().requires_grad_()
    ref = reference_one_hot_conv2d(labels, w64, b64, stride, padding, dilation, IGNORE)
    rw, rb = torch.autograd.grad(ref, (w64, b64), grad.double(), retain_graph=True)
    abs_w, abs_b = torch.autograd.grad(ref, (w64, b64), grad.double().abs())
    _assert_sum_close(gw, rw, abs_w)
    _assert_sum_close(gb, rb, abs_b)
    fractions = tk._label_fractions_triton(labels, c, 2, IGNORE)
    torch.testing.assert_close(fractions, reference_label_fractions(labels, c, 2), rtol=0, atol=0)
    labels[0, 0, 0] = c  # out of range: counted on the device, raised by the launcher
    with pytest.raises(IndexError, match="outside"):
        tk._one_hot_conv2d_triton(labels, weight, bias, list(stride), list(padding), list(dilation), IGNORE)
    with pytest.raises(IndexError, match="outside"):
        tk._label_fractions_triton(labels, c, 2, IGNORE)


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_launchers_check_every_label_once():
    from segkernels.ops.one_hot_conv2d import triton as tk

    labels = torch.zeros(1, 5, 5, dtype=torch.int64)
    if not triton_runs_on(labels):
        pytest.skip("run with TRITON_INTERPRET=1 to exercise the Triton kernels on CPU tensors")
    labels[0, 1, 1] = 7  # read by no tap at stride 2 with a 1 x 1 kernel
    with pytest.raises(IndexError, match="labels hold 1 value"):
        tk._one_hot_conv2d_triton(labels, torch.randn(2, 3, 1, 1), None, [2, 2], [0, 0], [1, 1], IGNORE)
    with pytest.raises(IndexError, match="labels hold 1 value"):
        tk._one_hot_conv2d_weight_backward_triton(torch.ones(1, 2, 3, 3), labels, [2, 3, 1, 1], [2, 2], [0, 0],
                                                  [1, 1], IGNORE)
    labels[0, 1, 1] = 0
    labels[0, 2, 2] = 9  # read by all nine taps of a padded 3 x 3 kernel
    with pytest.raises(IndexError, match="labels hold 1 value"):
        tk._one_hot_conv2d_triton(labels, torch.randn(2, 3, 3, 3), None, [1, 1], [1, 1], [1, 1], IGNORE)
    labels[0, 2, 2] = 0
    labels[0, 4, 2] = -5  # past label_fractions' last whole cell
    with pytest.raises(IndexError, match="labels hold 1 value"):
        tk._label_fractions_triton(labels, 3, 2, IGNORE)


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_kernels_compile_for_sm90():
    from segkernels.ops.one_hot_conv2d import triton as tk

    labels = _labels((2, 16, 16), 19)
    weight = _weight(64, 19, (3, 3))

    def run():
        for dtype in (torch.float32, torch.bfloat16):
            w = weight.to(dtype)
            tk._one_hot_conv2d_triton(labels, w, torch.zeros(64, dtype=dtype), [1, 1], [1, 1], [1, 1], IGNORE)
            tk._one_hot_conv2d_weight_backward_triton(torch.zeros(2, 64, 16, 16, dtype=dtype), labels,
                                                      list(weight.shape), [1, 1], [1, 1], [1, 1], IGNORE)
        tk._label_fractions_triton(labels, 19, 4, IGNORE)

    launches = record_triton_launches(tk, run)
    assert compile_launches_for_sm90(launches) == {"_forward_kernel", "_weight_backward_kernel", "_fractions_kernel"}
