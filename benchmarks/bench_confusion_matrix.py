"""confusion_matrix from logits: argmax + torch.bincount ("torch"), torchmetrics, segkernels.

Bytes: one read of the logits and of the int64 labels (the matrix itself is negligible).
"""

import pytest
import torch

import segkernels
from common import bench_device, run_benchmark, scaled_batch
from segkernels.ops.confusion_matrix import reference_confusion_matrix

DEVICE = bench_device()
CLASSES = 19
SHAPE = (8, CLASSES, 512, 1024)  # Cityscapes logits at label resolution


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["torch", "torchmetrics", "segkernels"])
def test_confusion_matrix_from_logits(benchmark, impl, dtype):
    shape = (scaled_batch(SHAPE[0]),) + SHAPE[1:]
    logits = torch.randn(shape, device=DEVICE, dtype=dtype)
    labels = torch.randint(0, CLASSES, (shape[0], *shape[2:]), device=DEVICE)
    labels[:, :8] = 255  # an ignore border
    if impl == "torch":
        fn = lambda: reference_confusion_matrix(logits, labels, CLASSES)  # noqa: E731
    elif impl == "torchmetrics":
        from torchmetrics.classification import MulticlassConfusionMatrix

        metric = MulticlassConfusionMatrix(num_classes=CLASSES, ignore_index=255).to(DEVICE)
        fn = lambda: metric(logits, labels)  # noqa: E731
    else:
        fn = lambda: segkernels.confusion_matrix(logits, labels, CLASSES)  # noqa: E731
    moved = logits.numel() * logits.element_size() + labels.numel() * labels.element_size()
    case = f"{tuple(shape)} {str(dtype).replace('torch.', '')}"
    run_benchmark(benchmark, fn, op="confusion_matrix from logits", impl=impl, case=case, bytes_moved=moved,
                  device=DEVICE, rounds=3,
                  formulation="logits.argmax(1), then torch.bincount of the labelled pixels" if impl == "torch" else None)


LOW_RES = (8, CLASSES, 128, 256)  # Cityscapes logits at output stride 8
LABEL_SIZE = (1024, 2048)


@pytest.mark.parametrize("impl", ["torch", "segkernels"])
def test_confusion_matrix_from_low_resolution_logits(benchmark, impl):
    shape = (scaled_batch(LOW_RES[0]),) + LOW_RES[1:]
    logits = torch.randn(shape, device=DEVICE)
    labels = torch.randint(0, CLASSES, (shape[0], *LABEL_SIZE), device=DEVICE)
    labels[:, :8] = 255
    if impl == "torch":
        def fn():
            up = torch.nn.functional.interpolate(logits, size=LABEL_SIZE, mode="bilinear", align_corners=False)
            return reference_confusion_matrix(up, labels, CLASSES)
    else:
        def fn():
            return segkernels.confusion_matrix(logits, labels, CLASSES)
    moved = logits.numel() * logits.element_size() + labels.numel() * labels.element_size()
    run_benchmark(benchmark, fn, op="confusion_matrix from low-resolution logits", impl=impl,
                  case=f"{tuple(shape)} -> {LABEL_SIZE} float32", bytes_moved=moved, device=DEVICE, rounds=3,
                  formulation=("F.interpolate(bilinear), argmax(1), then torch.bincount of the labelled pixels"
                               if impl == "torch" else None))
