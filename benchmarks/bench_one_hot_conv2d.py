"""Convolution over a label map and label_fractions: the one-hot map then F.conv2d / F.avg_pool2d
(what SPADE and label autoencoders run) vs segkernels.

Cases (issue 19), forward + backward (gradients of weight and bias):
- SPADE's layer: labels (2, 128, 128), 182 classes -> 128 channels, 3 x 3, padding 1; the baseline
  builds the one-hot map as SPADE's code does (zeros, then scatter_ of 1.0 along the classes).
- a label autoencoder's first layer: labels (2, 512, 512), 19 classes -> 64 channels, 4 x 4,
  stride 2, padding 1; the baseline F.one_hot(labels).permute(0, 3, 1, 2).float().
- label_fractions (8, 1024, 2048), 19 classes, factor 8 against F.one_hot + F.avg_pool2d
  (forward only: labels have no gradient).
Batches times SEGKERNELS_BENCH_SCALE. Labels are uniform over the classes, none ignored (the
baselines' one-hot has no ignore rule). Bytes are the fewest the op must move: the labels read
once, the output written (forward) and the output gradient read (backward), int64 labels.
"""

import pytest
import torch
import torch.nn.functional as F

import segkernels
from common import bench_device, run_benchmark, scaled_batch

DEVICE = bench_device()

CONV_CASES = {
    "SPADE 3x3": dict(labels=(2, 128, 128), classes=182, out=128, kernel=3, stride=1, padding=1, onehot="scatter"),
    "label AE 4x4/2": dict(labels=(2, 512, 512), classes=19, out=64, kernel=4, stride=2, padding=1,
                           onehot="F.one_hot"),
}


def _one_hot(labels, classes, how):
    if how == "scatter":  # SPADE's models/pix2pix_model.py preprocess_input
        n, h, w = labels.shape
        return torch.zeros(n, classes, h, w, device=labels.device).scatter_(1, labels.unsqueeze(1), 1.0)
    return F.one_hot(labels, classes).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("impl", ["torch", "segkernels"])
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_one_hot_conv2d(benchmark, name, impl):
    c = CONV_CASES[name]
    n, h, w = c["labels"]
    n = scaled_batch(n)
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, c["classes"], (n, h, w), generator=gen).to(DEVICE)
    conv = torch.nn.Conv2d(c["classes"], c["out"], c["kernel"], c["stride"], c["padding"]).to(DEVICE)
    weight, bias = conv.weight, conv.bias

    def torch_forward():
        return F.conv2d(_one_hot(labels, c["classes"], c["onehot"]), weight, bias, c["stride"], c["padding"])

    def segkernels_forward():
        return segkernels.one_hot_conv2d(labels, weight, bias, c["stride"], c["padding"])

    # Each gets an output gradient in its own output's layout, as the next layer would give it:
    # F.conv2d's output here is channels_last (the one-hot map is a permuted NHWC tensor).
    out = torch_forward()

    def forward_backward(forward):
        grad = torch.randn_like(forward())
        return lambda: torch.autograd.grad(forward(), (weight, bias), grad)

    call = forward_backward(torch_forward if impl == "torch" else segkernels_forward)
    moved = labels.numel() * 8 + 2 * out.numel() * out.element_size() + 2 * weight.numel() * 4
    case = (f"{name}: labels {(n, h, w)}, {c['classes']} -> {c['out']} classes/channels, k={c['kernel']} "
            f"s={c['stride']} p={c['padding']} float32")
    run_benchmark(benchmark, call, op="one_hot_conv2d forward+backward", impl=impl, case=case, bytes_moved=moved,
                  device=DEVICE, baseline=forward_backward(torch_forward) if impl == "segkernels" else None,
                  formulation=(f"one-hot map ({c['onehot']}) then F.conv2d, autograd for weight and bias"
                               if impl == "torch" else None))


@pytest.mark.parametrize("impl", ["torch", "segkernels"])
def test_label_fractions(benchmark, impl):
    n, h, w, classes, factor = scaled_batch(8), 1024, 2048, 19, 8
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, classes, (n, h, w), generator=gen).to(DEVICE)
    if impl == "torch":
        def call():
            return F.avg_pool2d(F.one_hot(labels, classes).permute(0, 3, 1, 2).float(), factor)
    else:
        def call():
            return segkernels.label_fractions(labels, classes, factor)
    moved = labels.numel() * 8 + n * classes * (h // factor) * (w // factor) * 4
    run_benchmark(benchmark, call, op="label_fractions", impl=impl,
                  case=f"labels {(n, h, w)}, {classes} classes, factor {factor}", bytes_moved=moved, device=DEVICE,
                  formulation="F.one_hot then F.avg_pool2d" if impl == "torch" else None)
