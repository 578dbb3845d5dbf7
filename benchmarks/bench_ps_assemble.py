"""InstanceFCN position-sensitive assembly: the plain-indexing reference (advanced indexing
forward, index_put-accumulate backward) vs segkernels.

Shapes (issue 4): scores (8, 25, 64, 64) with 256 windows per image, m = 21, k = 5; G = 21
groups (8, 525, 64, 64) with 64 windows per image; dense (4, 25, 64, 64), m = 21, stride 1.
Windows are centred uniformly over the map, so many reach past the border.

Bytes are the fewest the op must move: the forward reads one score per output element and
writes the output (plus the windows); forward + backward adds reading the output gradient and
writing the score gradient.
"""

import pytest
import torch

import segkernels
from common import bench_device, run_benchmark, scaled_batch
from segkernels.ops.ps_assemble import reference_ps_assemble, reference_ps_assemble_dense

DEVICE = bench_device()
K, M = 5, 21
SPARSE_CASES = [
    ("k5 256/img", (8, 25, 64, 64), 256),
    ("G21 64/img", (8, 525, 64, 64), 64),
]
DENSE_CASES = [("dense", (4, 25, 64, 64), 1)]
DTYPES = [torch.float32, torch.bfloat16]


def _dtype_id(d):
    return str(d).replace("torch.", "")


def _windows(n, h, w, per_image):
    gen = torch.Generator().manual_seed(0)
    centres = torch.randint(h * w, (n, per_image), generator=gen)
    b = torch.arange(n).view(-1, 1).expand(n, per_image)
    win = torch.stack([b, centres // w - M // 2, centres % w - M // 2], dim=-1).reshape(-1, 3)
    return win.to(DEVICE)


def _sparse(impl, scores, windows):
    if impl == "torch":
        return lambda s: reference_ps_assemble(s, windows, K, M)
    return lambda s: segkernels.ps_assemble(s, windows, k=K, m=M, check_windows=False)


def _dense(impl, stride):
    if impl == "torch":
        return lambda s: reference_ps_assemble_dense(s, K, M, stride)
    return lambda s: segkernels.ps_assemble_dense(s, k=K, m=M, stride=stride)


def _cases():
    for name, shape, per in SPARSE_CASES:
        yield name, shape, per, False
    for name, shape, stride in DENSE_CASES:
        yield name, shape, stride, True


CASES = list(_cases())


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("name,shape,param,dense", CASES, ids=[c[0].replace(" ", "-") for c in CASES])
@pytest.mark.parametrize("impl", ["torch", "segkernels"])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_ps_assemble(benchmark, mode, impl, name, shape, param, dense, dtype):
    shape = (scaled_batch(shape[0]),) + tuple(shape[1:])
    n, c, h, w = shape
    case = f"{name} {shape} m={M} {_dtype_id(dtype)}"
    scores = torch.randn(shape, device=DEVICE).to(dtype)
    if dense:
        fn = _dense(impl, param)
        windows_bytes = 0
    else:
        windows = _windows(n, h, w, param)
        fn = _sparse(impl, scores, windows)
        windows_bytes = windows.numel() * 8
    out = fn(scores)
    out_bytes = out.numel() * out.element_size()
    if mode == "forward":
        call = lambda: fn(scores)  # noqa: E731
        moved = 2 * out_bytes + windows_bytes
    else:
        leaf = scores.detach().requires_grad_(True)
        grad = torch.randn_like(out)

        def call():
            (g,) = torch.autograd.grad(fn(leaf), leaf, grad)
            return g

        moved = 3 * out_bytes + 2 * windows_bytes + scores.numel() * scores.element_size()
    op = "ps_assemble_dense" if dense else "ps_assemble"
    # No library has the op (InstanceFCN's code is not public): the baseline is the advanced
    # indexing a user would write, segkernels' reference.
    run_benchmark(benchmark, call, op=f"{op} {mode}", impl=impl, case=case, bytes_moved=moved, device=DEVICE,
                  formulation="advanced indexing into the score maps (no library has the op)" if impl == "torch"
                  else None)
