"""Label-structure regularisation (Mostajabi, Maire, Shakhnarovich, CVPR 2018) on the synthetic
scenes of segnet_end_to_end.py, with segkernels.nn.LabelAutoencoder and LabelStructureLoss.

1. Stage 1: a LabelAutoencoder learns the training label maps (its first layer an OneHotConv2d:
   the one-hot map is never formed), then is frozen.
2. Stage 2: the same small encoder-decoder network, from the same initialisation, is trained three
   ways: cross-entropy alone; cross-entropy + the decoder variant (an auxiliary head predicts the
   label code from the bottleneck, the frozen decoder turns it into a segmentation, and the
   primary output is pulled towards it); cross-entropy + the encoder variant (the auxiliary head
   regresses onto the frozen encoder's code of the ground truth).
3. Every model is scored on held-out scenes (segkernels.confusion_matrix, mean IoU), over
   several seeds.

    python examples/label_structure.py            # 5 seeds, under 3 minutes on 2 CPU cores
    python examples/label_structure.py --tiny     # a smoke run in seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import segkernels
from segkernels.nn import LabelAutoencoder, LabelStructureLoss

# The end-to-end example beside this file: its scenes, batching, metrics and provenance helpers.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import segnet_end_to_end as E2E  # noqa: E402

IGNORE = E2E.IGNORE


class Primary(nn.Module):
    """A small encoder-decoder: three stride-2 stages to a bottleneck at 1/8, bilinear upsampling
    with skip connections back to class logits, and an auxiliary 1 x 1 head on the bottleneck
    that predicts the label autoencoder's code (used by the structure loss only)."""

    def __init__(self, classes: int, code_channels: int, width: int = 16):
        super().__init__()

        def block(a, b, stride):
            return nn.Sequential(nn.Conv2d(a, b, 3, stride, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True))

        self.stem = block(3, width, 1)
        self.down = nn.ModuleList([block(width, 2 * width, 2), block(2 * width, 4 * width, 2),
                                   block(4 * width, 4 * width, 2)])
        self.up = nn.ModuleList([block(8 * width, 4 * width, 1), block(6 * width, 2 * width, 1),
                                 block(3 * width, width, 1)])
        self.classifier = nn.Conv2d(width, classes, 1)
        self.code_head = nn.Conv2d(4 * width, code_channels, 1)

    def forward(self, x):
        skips = [self.stem(x)]
        for stage in self.down:
            skips.append(stage(skips[-1]))
        y = skips.pop()
        code = self.code_head(y)
        for stage in self.up:
            skip = skips.pop()
            y = F.interpolate(y, size=skip.shape[2:], mode="bilinear", align_corners=False)
            y = stage(torch.cat([y, skip], 1))
        return self.classifier(y), code


def train_primary(model, train_set, epochs, batch_size, loss_fn, lr=3e-3) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        for x, y in E2E.batches(*train_set, batch_size, shuffle=True, seed=epoch):
            logits, code = model(x)
            loss = loss_fn(logits, code, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


@torch.no_grad()
def mean_iou(model, data, classes, batch_size) -> float:
    model.eval()
    cm = torch.zeros(classes, classes, dtype=torch.long)
    for x, y in E2E.batches(*data, batch_size, shuffle=False):
        cm += segkernels.confusion_matrix(model(x)[0], y, classes, ignore_index=IGNORE)
    return 100 * segkernels.segmentation_scores(cm)["mean_iou"].item()


def run_seed(seed: int, args) -> Dict[str, float]:
    classes = args.classes
    train_set = E2E.synthetic_scenes(args.train, args.size, classes, seed=100 * seed + 1)
    test_set = E2E.synthetic_scenes(args.test, args.size, classes, seed=100 * seed + 2)
    torch.manual_seed(seed)
    autoencoder = LabelAutoencoder(classes, code_channels=args.code, width=args.ae_width, levels=3)
    label_batches = [y for _, y in E2E.batches(*train_set, args.batch, shuffle=False)]
    history = autoencoder.fit(label_batches, epochs=args.ae_epochs, lr=3e-3)
    autoencoder.freeze()
    with torch.no_grad():
        cm = torch.zeros(classes, classes, dtype=torch.long)
        for _, y in E2E.batches(*test_set, args.batch, shuffle=False):
            cm += segkernels.confusion_matrix(autoencoder(y), y, classes, ignore_index=IGNORE)
    results = {"autoencoder (labels in, labels out)": 100 * segkernels.segmentation_scores(cm)["mean_iou"].item()}
    print(f"seed {seed}: autoencoder loss {history[0]:.3f} -> {history[-1]:.3f}", file=sys.stderr)

    torch.manual_seed(1000 + seed)
    init = Primary(classes, args.code, args.width).state_dict()  # every variant starts here
    losses = {
        "cross-entropy": lambda logits, code, y: F.cross_entropy(logits, y, ignore_index=IGNORE),
        "+ structure (decoder)": LabelStructureLoss(autoencoder, "decoder", weight=args.weight),
        "+ structure (encoder)": LabelStructureLoss(autoencoder, "encoder", weight=args.weight),
    }
    for name, loss in losses.items():
        model = Primary(classes, args.code, args.width)
        model.load_state_dict(init)
        fn = loss if name == "cross-entropy" else (lambda logits, code, y, loss=loss: loss(logits, code, y).total)
        start = time.perf_counter()
        torch.manual_seed(2000 + seed)
        train_primary(model, train_set, args.epochs, args.batch, fn)
        results[name] = mean_iou(model, test_set, classes, args.batch)
        print(f"seed {seed}: {name}: mIoU {results[name]:.1f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return results


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=None, help="seeds to average over (5; 1 with --tiny)")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--train", type=int, default=192)
    p.add_argument("--test", type=int, default=64)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--ae-epochs", type=int, default=80)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--width", type=int, default=12)
    p.add_argument("--ae-width", type=int, default=16)
    p.add_argument("--code", type=int, default=16, help="channels of the label code")
    p.add_argument("--weight", type=float, default=1.0, help="weight of the structure term")
    p.add_argument("--tiny", action="store_true", help="a smoke run in seconds")
    args = p.parse_args(argv)
    if args.tiny:
        args.train, args.test, args.size, args.epochs, args.ae_epochs = 16, 8, 32, 1, 2
    if args.seeds is None:
        args.seeds = 1 if args.tiny else 5
    torch.set_num_threads(max(1, torch.get_num_threads()))
    runs = [run_seed(seed, args) for seed in range(args.seeds)]
    print(f"Label-structure regularisation, {args.train} synthetic scenes of {args.size} x {args.size}, "
          f"{args.classes} classes, {args.epochs} epochs; commit {E2E.source_commit()}, {E2E.machine()}")
    print()
    E2E.print_seed_table(runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
