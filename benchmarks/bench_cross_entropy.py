"""cross_entropy from low-resolution logits, forward + backward, against what users run:
F.interpolate(logits, size=labels, mode="bilinear", align_corners=...) then
F.cross_entropy(..., ignore_index=255) (mmsegmentation's decode head with its defaults), eager and
under torch.compile (default mode, the same two lines).

Cases (issue 18): Cityscapes at output stride 8, (8, 19, 128, 256) -> (8, 1024, 2048), float32
and bfloat16; ADE20K (16, 150, 64, 64) -> (16, 512, 512); DeepLab's (8, 21, 65, 65) -> (8, 513,
513) with align_corners=True. int64 labels, 10% of them 255 (ignored); batch times
SEGKERNELS_BENCH_SCALE. Bytes: the logits read once, the labels once, the gradient written once.
"""

import pytest
import torch
import torch.nn.functional as F

import segkernels
from common import bench_device, run_benchmark, scaled_batch

DEVICE = bench_device()
CASES = [
    ("Cityscapes", (8, 19, 128, 256), (1024, 2048), torch.float32, False),
    ("Cityscapes", (8, 19, 128, 256), (1024, 2048), torch.bfloat16, False),
    ("ADE20K", (16, 150, 64, 64), (512, 512), torch.float32, False),
    ("DeepLab", (8, 21, 65, 65), (513, 513), torch.float32, True),
]
IMPLS = ["torch", "torch.compile", "segkernels"]


def _case_id(case):
    name, _, _, dtype, _ = case
    return f"{name}-{str(dtype).replace('torch.', '')}"


def eager_loss(logits, labels, align_corners):
    up = F.interpolate(logits, size=labels.shape[1:], mode="bilinear", align_corners=align_corners)
    return F.cross_entropy(up, labels, ignore_index=255)


_compiled = torch.compile(eager_loss)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_cross_entropy_fwd_bwd(benchmark, impl, case):
    name, shape, size, dtype, align_corners = case
    shape = (scaled_batch(shape[0]),) + shape[1:]
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(shape, generator=g) * 3).to(device=DEVICE, dtype=dtype).requires_grad_()
    labels = torch.randint(0, shape[1], (shape[0], *size), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.1] = 255
    labels = labels.to(DEVICE)
    if impl == "torch":
        loss_fn = eager_loss
    elif impl == "torch.compile":
        loss_fn = _compiled
    else:
        def loss_fn(x, y, ac):
            return segkernels.cross_entropy(x, y, ignore_index=255, align_corners=ac)

    def step():
        return torch.autograd.grad(loss_fn(logits, labels, align_corners), [logits])

    moved = 2 * logits.numel() * logits.element_size() + labels.numel() * labels.element_size()
    case_name = f"{name} {tuple(shape)} -> {size} {str(dtype).replace('torch.', '')}" + (
        " align_corners" if align_corners else "")
    formulation = None
    if impl == "torch":
        formulation = "F.interpolate(bilinear) then F.cross_entropy(ignore_index=255), eager"
    elif impl == "torch.compile":
        formulation = "torch.compile (default mode) of the same two lines"
    run_benchmark(benchmark, step, op="cross_entropy fwd+bwd", impl=impl, case=case_name, bytes_moved=moved,
                  device=DEVICE, rounds=3, formulation=formulation)
