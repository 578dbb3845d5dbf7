"""upsample_argmax: full-resolution predictions from low-resolution logits, against what users
run, F.interpolate(mode="bilinear", align_corners=False) then argmax (mmsegmentation's
inference path: resize the logits to the image, then argmax).

Case (issue 18): Cityscapes logits at output stride 8, (8, 19, 128, 256) -> (8, 1024, 2048),
float32 and bfloat16; batch times SEGKERNELS_BENCH_SCALE. Bytes: the logits read once and the
int64 prediction map written once.
"""

import pytest
import torch
import torch.nn.functional as F

import segkernels
from common import bench_device, run_benchmark, scaled_batch

DEVICE = bench_device()
LOGITS = (8, 19, 128, 256)
SIZE = (1024, 2048)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["torch", "segkernels"])
def test_upsample_argmax(benchmark, impl, dtype):
    shape = (scaled_batch(LOGITS[0]),) + LOGITS[1:]
    logits = torch.randn(shape, device=DEVICE).to(dtype)
    if impl == "torch":
        def call():
            return F.interpolate(logits, size=SIZE, mode="bilinear", align_corners=False).argmax(1)
    else:
        def call():
            return segkernels.upsample_argmax(logits, SIZE)
    moved = logits.numel() * logits.element_size() + shape[0] * SIZE[0] * SIZE[1] * 8
    case = f"{tuple(shape)} -> {SIZE} {str(dtype).replace('torch.', '')}"
    run_benchmark(benchmark, call, op="upsample_argmax", impl=impl, case=case, bytes_moved=moved, device=DEVICE,
                  rounds=3, formulation="F.interpolate(bilinear) then argmax(1)" if impl == "torch" else None)
