"""Unsupervised domain transfer by activation matching (GAM: Huang, Huang and Krahenbuhl, ECCV
2018) on the synthetic scenes of segnet_end_to_end.py.

    python examples/domain_transfer.py            # 5 seeds, CPU, a few minutes
    python examples/domain_transfer.py --tiny     # smoke run (CI)

Source domain: the synthetic scenes (labelled). Target domain: the same kind of scenes with
their colours mixed and shifted, the contrast lowered and a finer noise texture added; its labels
are used only to evaluate. Per seed, one small fully convolutional network (with BatchNorm) is
trained on the source, then evaluated on the target test set three ways:
1. source only;
2. AdaBN, GAM's Gaussian i.i.d. step: segkernels.adapt.recalibrate_batchnorm on target images;
3. GAM: from the AdaBN network, training on the source labels continues while
   segkernels.adapt.ActivationMatching matches three layers' activations on target images to
   the source network's (least-squares critics, lambda = 0.1) with its weight-drift term.
Prints target mIoU per seed and the mean.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import segkernels
from segkernels import adapt

# The end-to-end example beside this file: its scenes, batching, metrics and provenance helpers.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import segnet_end_to_end as E2E  # noqa: E402

IGNORE = E2E.IGNORE


def shift_domain(images: torch.Tensor, seed: int) -> torch.Tensor:
    """The target domain: colours mixed and shifted, contrast lowered, a fine noise texture."""
    g = torch.Generator().manual_seed(10_000 + seed)
    mix = torch.eye(3) * 0.6 + 0.4 * torch.rand(3, 3, generator=g)
    out = torch.einsum("ij,njhw->nihw", mix, images)
    out = 0.55 * out + 0.3 * torch.rand(1, 3, 1, 1, generator=g)
    n, _, h, w = images.shape
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    texture = 0.12 * torch.sin(1.7 * xx.float() - 1.1 * yy.float())
    return out + texture + 0.05 * torch.randn(out.shape, generator=g)


class SmallFCN(nn.Module):
    """conv-BN-ReLU blocks, two 2 x 2 poolings, a 1 x 1 classifier, bilinear upsampling."""

    def __init__(self, classes: int, width: int):
        super().__init__()

        def block(a, b):
            return nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU())

        self.features = nn.Sequential(block(3, width), nn.MaxPool2d(2), block(width, 2 * width), nn.MaxPool2d(2),
                                      block(2 * width, 2 * width))
        self.classifier = nn.Conv2d(2 * width, classes, 1)

    def forward(self, x):
        return F.interpolate(self.classifier(self.features(x)), size=x.shape[2:], mode="bilinear")


# Matched layers: the three blocks' outputs (GAM matches four layers of ERFNet).
LAYERS = ["features.0", "features.2", "features.4"]


def supervised_step(model, opt, x, y, extra=None):
    loss = F.cross_entropy(model(x), y, ignore_index=IGNORE)
    if extra is not None:
        loss = loss + extra()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def run_seed(seed: int, args) -> Dict[str, float]:
    torch.manual_seed(seed)
    src_x, src_y = E2E.synthetic_scenes(args.train, args.size, args.classes, seed=seed)
    tgt_x, _ = E2E.synthetic_scenes(args.train, args.size, args.classes, seed=seed + 500)
    tgt_x = shift_domain(tgt_x, seed)
    test_x, test_y = E2E.synthetic_scenes(args.test, args.size, args.classes, seed=seed + 900)
    test = (shift_domain(test_x, seed), test_y)

    def miou(model):
        return E2E.evaluate(model, test, args.classes, args.batch)["mIoU"]

    model = SmallFCN(args.classes, args.width)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for epoch in range(args.epochs):
        for x, y in E2E.batches(src_x, src_y, args.batch, shuffle=True, seed=epoch):
            supervised_step(model, opt, x, y)
    results = {"source only": miou(model)}

    adabn = copy.deepcopy(model)
    adapt.recalibrate_batchnorm(adabn, (x for x, _ in E2E.batches(tgt_x, src_y, args.batch, shuffle=False)))
    results["AdaBN (recalibrate_batchnorm)"] = miou(adabn)

    # GAM: the adapted network starts from AdaBN's, the critics and drift against the source one.
    gam = copy.deepcopy(adabn)
    with adapt.ActivationMatching(gam, LAYERS, src_x[: args.batch], source=copy.deepcopy(model),
                                  hidden_channels=32) as am:
        critic_opt = torch.optim.Adam(am.critics.parameters(), lr=1e-3)
        opt = torch.optim.Adam(gam.parameters(), lr=1e-3)
        gam.train()
        step = 0
        for epoch in range(args.adapt_epochs):
            target_batches = E2E.batches(tgt_x, src_y, args.batch, shuffle=True, seed=100 + epoch)
            for (x, y), (xt, _) in zip(E2E.batches(src_x, src_y, args.batch, shuffle=True, seed=200 + epoch),
                                       target_batches):
                d_loss = am.critic_loss(x, xt)
                critic_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                critic_opt.step()
                supervised_step(gam, opt, x, y,
                                extra=lambda: args.lam * am.matching_loss(xt) + args.drift * am.weight_drift())
                step += 1
    # The statistics the adapted network uses on the target: its own, re-estimated there.
    adapt.recalibrate_batchnorm(gam, (x for x, _ in E2E.batches(tgt_x, src_y, args.batch, shuffle=False)))
    results["GAM (AdaBN + ActivationMatching)"] = miou(gam)
    return results


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=None, help="seeds to average over (5; 1 with --tiny)")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--train", type=int, default=160)
    p.add_argument("--test", type=int, default=64)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--adapt-epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--lam", type=float, default=0.1, help="weight of the matching loss (GAM's lambda)")
    p.add_argument("--drift", type=float, default=1e-3, help="weight of the weight-drift term")
    p.add_argument("--tiny", action="store_true", help="a smoke run in seconds")
    args = p.parse_args(argv)
    if args.tiny:
        args.train, args.test, args.size, args.epochs, args.adapt_epochs = 16, 8, 32, 1, 1
    if args.seeds is None:
        args.seeds = 1 if args.tiny else 5
    runs = [run_seed(seed, args) for seed in range(args.seeds)]
    print(f"Domain transfer, {args.train} synthetic scenes of {args.size} x {args.size} per domain, "
          f"{args.classes} classes; target mIoU (%); commit {E2E.source_commit()}, {E2E.machine()}")
    print()
    E2E.print_seed_table(runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
