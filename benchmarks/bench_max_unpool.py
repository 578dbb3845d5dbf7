"""Max-pooling with indices and max-unpooling: PyTorch (F.max_pool / F.max_unpool) vs segkernels.

Bytes are the fewest the op must move: pooling reads the input and writes values and indices;
unpooling reads values and indices and writes the output; the unpool backward reads indices
and the selected output gradients and writes the input gradient.
"""


import pytest
import torch
import torch.nn.functional as F

import segkernels
from common import bench_device, run_benchmark, scaled_batch

DEVICE = bench_device()
CASES = [
    ("segnet", (8, 64, 360, 480), 2),
    ("deep", (16, 512, 23, 30), 2),
    ("volume", (2, 32, 64, 64, 64), 3),
]
DTYPES = [torch.float32, torch.bfloat16]


def _case(name, shape, dtype):
    shape = (scaled_batch(shape[0]),) + tuple(shape[1:])
    return shape, f"{name} {tuple(shape)} {str(dtype).replace('torch.', '')}"


def _inputs(shape, dtype, nd):
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    pool = F.max_pool2d if nd == 2 else F.max_pool3d
    values, indices = pool(x, 2, 2, return_indices=True)
    _, compact = (segkernels.max_pool2d_with_indices if nd == 2 else segkernels.max_pool3d_with_indices)(
        x, 2, 2, compact=True
    )
    return x, values, indices, compact


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name,shape,nd", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", ["torch", "segkernels", "segkernels-compact"])
def test_unpool_forward(benchmark, impl, name, shape, nd, dtype):
    shape, case = _case(name, shape, dtype)
    x, values, indices, compact = _inputs(shape, dtype, nd)
    size = x.shape[2:]
    unpool_t = F.max_unpool2d if nd == 2 else F.max_unpool3d
    unpool_s = segkernels.max_unpool2d if nd == 2 else segkernels.max_unpool3d
    baseline = lambda: unpool_t(values, indices, 2, 2, 0, size)  # noqa: E731
    if impl == "torch":
        fn = baseline
    elif impl == "segkernels":
        fn = lambda: unpool_s(values, indices, 2, 2, 0, size)  # noqa: E731
    else:
        fn = lambda: unpool_s(values, compact, 2, 2, 0, size)  # noqa: E731
    idx_bytes = 1 if impl == "segkernels-compact" else 8
    moved = values.numel() * (values.element_size() + idx_bytes) + x.numel() * x.element_size()
    run_benchmark(benchmark, fn, op=f"max_unpool{nd}d forward", impl=impl, case=case, bytes_moved=moved, device=DEVICE,
                  baseline=None if impl == "torch" else baseline,
                  formulation=f"F.max_unpool{nd}d with F.max_pool{nd}d's int64 indices" if impl == "torch" else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name,shape,nd", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", ["torch", "segkernels", "segkernels-compact"])
def test_unpool_backward(benchmark, impl, name, shape, nd, dtype):
    shape, case = _case(name, shape, dtype)
    x, values, indices, compact = _inputs(shape, dtype, nd)
    size = x.shape[2:]
    grad_out = torch.randn_like(x)

    def backward_of(unpool, idx):
        v = values.detach().requires_grad_(True)
        out = unpool(v, idx, 2, 2, 0, size)
        return lambda: torch.autograd.grad(out, v, grad_out, retain_graph=True)

    baseline = backward_of(F.max_unpool2d if nd == 2 else F.max_unpool3d, indices)
    if impl == "torch":
        fn = baseline
    else:
        fn = backward_of(segkernels.max_unpool2d if nd == 2 else segkernels.max_unpool3d,
                         compact if impl == "segkernels-compact" else indices)
    idx_bytes = 1 if impl == "segkernels-compact" else 8
    moved = values.numel() * (2 * values.element_size() + idx_bytes)
    run_benchmark(benchmark, fn, op=f"max_unpool{nd}d backward", impl=impl, case=case, bytes_moved=moved, device=DEVICE,
                  baseline=None if impl == "torch" else baseline,
                  formulation=f"autograd of F.max_unpool{nd}d" if impl == "torch" else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name,shape,nd", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", ["torch", "segkernels", "segkernels-compact"])
def test_pool_with_indices(benchmark, impl, name, shape, nd, dtype):
    shape, case = _case(name, shape, dtype)
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    torch_pool = F.max_pool2d if nd == 2 else F.max_pool3d
    baseline = lambda: torch_pool(x, 2, 2, return_indices=True)  # noqa: E731
    if impl == "torch":
        fn = baseline
    else:
        pool = segkernels.max_pool2d_with_indices if nd == 2 else segkernels.max_pool3d_with_indices
        compact = impl == "segkernels-compact"
        fn = lambda: pool(x, 2, 2, compact=compact)  # noqa: E731
    pooled = x.numel() // (2**nd)
    idx_bytes = 1 if impl == "segkernels-compact" else 8
    moved = x.numel() * x.element_size() + pooled * (x.element_size() + idx_bytes)
    run_benchmark(benchmark, fn, op=f"max_pool{nd}d with indices", impl=impl, case=case, bytes_moved=moved,
                  device=DEVICE, baseline=None if impl == "torch" else baseline,
                  formulation=f"F.max_pool{nd}d(return_indices=True)" if impl == "torch" else None)


# Overlapping windows (issue 21): RefineNet's chained-residual-pooling pooling, 5 x 5, stride 1,
# padding 2, forward + backward, against F.max_pool2d (which keeps int64 indices and the
# input for its backward).
OVERLAP_SHAPE = (2, 128, 96, 128)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("impl", ["torch", "segkernels-compact"])
def test_pool_overlapping_fwd_bwd(benchmark, impl, dtype):
    shape = (scaled_batch(OVERLAP_SHAPE[0]),) + OVERLAP_SHAPE[1:]
    x = torch.randn(shape, device=DEVICE, dtype=dtype).requires_grad_()
    g = torch.randn(shape, device=DEVICE, dtype=dtype)

    def baseline():
        return torch.autograd.grad(F.max_pool2d(x, 5, 1, 2), x, g)

    def ours():
        return torch.autograd.grad(segkernels.max_pool2d_with_indices(x, 5, 1, 2, compact=True)[0], x, g)

    # Forward: read x, write values and indices; backward: read the gradient and the indices,
    # write the input gradient.
    n, e = x.numel(), x.element_size()
    moved = n * e + n * (e + 1) + n * (e + 1) + n * e
    case = f"5x5/1/2 {tuple(shape)} {str(dtype).replace('torch.', '')}"
    run_benchmark(benchmark, baseline if impl == "torch" else ours, op="max_pool2d overlapping fwd+bwd", impl=impl,
                  case=case, bytes_moved=moved, device=DEVICE, baseline=None if impl == "torch" else baseline,
                  formulation="F.max_pool2d(5, 1, 2) forward + backward" if impl == "torch" else None)
