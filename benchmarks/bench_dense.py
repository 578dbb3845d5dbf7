"""Dense evaluation and the seeds' blocks (issue 21): OverFeat's offset max-pooling against its
k^2 separate F.max_pool2d calls, and light-weight RefineNet's chained residual pooling against
the official block (nn.MaxPool2d(5, 1, 2) and 1 x 1 convolutions), forward + backward."""

import pytest
import torch

import segkernels
from common import bench_device, run_benchmark, scaled_batch
from peers import PlainCRP, offsets_by_definition

DEVICE = bench_device()


@pytest.mark.parametrize("impl", ["torch", "segkernels"])
def test_offset_max_pool2d(benchmark, impl):
    # OverFeat's last pooling: 3 x 3 at every offset of its layer-5 map.
    shape = (scaled_batch(8), 256, 48, 64)
    x = torch.randn(shape, device=DEVICE)
    fn = (lambda: offsets_by_definition(x, 3)) if impl == "torch" else (lambda: segkernels.offset_max_pool2d(x, 3))
    moved = x.numel() * 4 * 2  # read x, write about as many pooled values
    run_benchmark(benchmark, fn, op="offset_max_pool2d", impl=impl, case=f"k=3 {tuple(shape)} float32",
                  bytes_moved=moved, device=DEVICE,
                  formulation="9 F.max_pool2d(3, 3) calls on the offset slices, stacked" if impl == "torch" else None)


@pytest.mark.parametrize("impl", ["torch", "segkernels"])
def test_chained_residual_pooling(benchmark, impl):
    # A light-weight RefineNet CRP at 1/4 of a 384 x 512 image, 128 channels, 4 stages.
    torch.manual_seed(0)
    crp = segkernels.nn.ChainedResidualPooling(128, 4, 5).to(DEVICE)
    block = crp if impl == "segkernels" else PlainCRP(crp.convs())
    x = torch.randn(scaled_batch(2), 128, 96, 128, device=DEVICE, requires_grad=True)

    def step():
        out = block(x)
        return torch.autograd.grad(out, [x, *crp.parameters()], torch.ones_like(out))

    run_benchmark(benchmark, step, op="ChainedResidualPooling fwd+bwd", impl=impl,
                  case=f"4 stages {tuple(x.shape)} float32", bytes_moved=0, device=DEVICE,
                  formulation="the official CRPBlock (nn.MaxPool2d(5, 1, 2), 1 x 1 convs)" if impl == "torch" else None)
