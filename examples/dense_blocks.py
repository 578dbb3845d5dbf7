"""The seed systems' blocks on the synthetic scenes of segnet_end_to_end.py: an FCN with its
learnable bilinear upsampling, read out densely two ways; a light-weight RefineNet form with
chained residual pooling; an FRRN form with full-resolution residual units.

    python examples/dense_blocks.py            # 5 seeds, CPU, under a minute
    python examples/dense_blocks.py --tiny     # smoke run (CI)

Per seed, three small networks of output stride 4 are trained on the same scenes with
cross-entropy (Adam, same epochs) and evaluated on held-out scenes:
1. FCN: conv-BN-ReLU blocks and two 2 x 2 poolings, a 1 x 1 classifier, then
   segkernels.nn.BilinearUpsample(factor 4) (FCN's transposed convolution initialised to
   bilinear interpolation, learnt with the network). Read out twice: through that upsampling,
   and by OverFeat's shift-and-stitch (segkernels.shift_and_stitch: the network before the
   upsampling evaluated on the 16 shifted inputs, its stride-4 outputs interleaved), which
   needs no upsampling at all but was not what the network was trained through.
2. RefineNet form: the same encoder, segkernels.nn.ChainedResidualPooling (four 5 x 5
   stride-1 poolings with compact indices) at 1/4 resolution, the classifier, BilinearUpsample.
3. FRRN form: a 16-channel full-resolution residual stream and a pooling stream through
   segkernels.nn.FRRU units at scales 2, 4, 4, 2, the classifier on the residual stream.
Prints test mIoU per seed and the mean, and each network's parameters.

What it can show: the blocks train and compose, on a toy task, at a size a CPU runs in minutes.
What it cannot: the papers' comparisons (their data, depth and training schedules).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import segkernels
from segkernels import nn as snn

# The end-to-end example beside this file: its scenes, batching, metrics and provenance helpers.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import segnet_end_to_end as E2E  # noqa: E402

IGNORE = E2E.IGNORE
STRIDE = 4


def conv_bn_relu(a: int, b: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU())


def encoder(width: int) -> nn.Sequential:
    """Output stride 4: two blocks with a 2 x 2 pooling after each, and one more block."""
    return nn.Sequential(conv_bn_relu(3, width), snn.MaxPool2d(2), conv_bn_relu(width, 2 * width), snn.MaxPool2d(2),
                         conv_bn_relu(2 * width, 2 * width))


class FCN(nn.Module):
    def __init__(self, classes: int, width: int):
        super().__init__()
        self.features = encoder(width)
        self.classifier = nn.Conv2d(2 * width, classes, 1)
        self.upsample = snn.BilinearUpsample(classes, STRIDE)

    def coarse(self, x):
        """The stride-4 class scores, before the upsampling."""
        return self.classifier(self.features(x))

    def forward(self, x):
        return self.upsample(self.coarse(x))


class RefineNetForm(FCN):
    def __init__(self, classes: int, width: int):
        super().__init__(classes, width)
        self.crp = snn.ChainedResidualPooling(2 * width, stages=4, kernel_size=5)

    def coarse(self, x):
        return self.classifier(self.crp(self.features(x)))


class FRRNForm(nn.Module):
    def __init__(self, classes: int, width: int, residual: int = 16):
        super().__init__()
        self.stem = conv_bn_relu(3, residual)
        self.units = nn.ModuleList()
        channels, self.scales = residual, [2, 4, 4, 2]
        for scale, out in zip(self.scales, [width, 2 * width, 2 * width, width]):
            self.units.append(snn.FRRU(channels, out, scale, residual_channels=residual))
            channels = out
        self.classifier = nn.Conv2d(residual, classes, 1)

    def forward(self, x):
        z = self.stem(x)
        y = segkernels.max_pool2d_with_indices(z, 2, 2, compact=True)[0]
        previous = 2
        for unit, scale in zip(self.units, self.scales):
            if scale > previous:  # the pooling stream goes down ...
                y = segkernels.max_pool2d_with_indices(y, scale // previous, scale // previous, compact=True)[0]
            elif scale < previous:  # ... and back up
                y = F.interpolate(y, scale_factor=previous // scale, mode="bilinear", align_corners=False)
            y, z = unit(y, z)
            previous = scale
        return self.classifier(z)


def train(model, data, args) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for epoch in range(args.epochs):
        for x, y in E2E.batches(*data, args.batch, shuffle=True, seed=epoch):
            loss = F.cross_entropy(model(x), y, ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def run_seed(seed: int, args) -> Dict[str, float]:
    train_set = E2E.synthetic_scenes(args.train, args.size, args.classes, seed=seed)
    test_set = E2E.synthetic_scenes(args.test, args.size, args.classes, seed=seed + 900)

    def miou(model):
        return E2E.evaluate(model, test_set, args.classes, args.batch)["mIoU"]

    results = {}
    torch.manual_seed(seed)
    fcn = FCN(args.classes, args.width)
    train(fcn, train_set, args)
    results["FCN (BilinearUpsample)"] = miou(fcn)

    class Stitched(nn.Module):  # the same trained FCN, read out by shift-and-stitch
        def forward(self, x):
            return segkernels.shift_and_stitch(fcn.coarse, x, STRIDE)

    results["FCN (shift_and_stitch)"] = miou(Stitched())
    for name, cls in [("RefineNet form (ChainedResidualPooling)", RefineNetForm), ("FRRN form (FRRU)", FRRNForm)]:
        torch.manual_seed(seed)
        model = cls(args.classes, args.width)
        train(model, train_set, args)
        results[name] = miou(model)
    return results


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=None, help="seeds to average over (5; 1 with --tiny)")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--size", type=int, default=48, help="scene side, a multiple of 4")
    p.add_argument("--train", type=int, default=160)
    p.add_argument("--test", type=int, default=64)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--tiny", action="store_true", help="a smoke run in seconds")
    args = p.parse_args(argv)
    if args.tiny:
        args.train, args.test, args.size, args.epochs = 16, 8, 32, 1
    if args.seeds is None:
        args.seeds = 1 if args.tiny else 5
    if args.size % 16:
        p.error("--size must be a multiple of 16 (FRRN's scale-4 units and the stride-4 readouts)")
    runs = [run_seed(seed, args) for seed in range(args.seeds)]
    print(f"Dense prediction blocks, {args.train} synthetic scenes of {args.size} x {args.size}, {args.classes} "
          f"classes, {args.epochs} epochs; test mIoU (%); commit {E2E.source_commit()}, {E2E.machine()}")
    print()
    E2E.print_seed_table(runs)
    print()
    for name, model in [("FCN", FCN(args.classes, args.width)), ("RefineNet form", RefineNetForm(args.classes, args.width)),
                        ("FRRN form", FRRNForm(args.classes, args.width))]:
        print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
