"""Channel pruning of a SegNet (VGG-16-BN) encoder across processes, launched with torchrun.

    torchrun --standalone --nproc_per_node=2 examples/prune_distributed.py             # CPUs (gloo)
    torchrun --standalone --nproc_per_node=8 examples/prune_distributed.py --images 5000 --size 224  # GPUs (nccl)

Each rank reads its own shard of the calibration images through a DataLoader with a
DistributedSampler; prune_sequential sums every layer's statistics over the ranks, so all of them
end with the same pruned encoder (checked at the end), ready for fine-tuning under
DistributedDataParallel. The images are synthetic and the weights random unless --checkpoint
names a SegNet state_dict: the run shows the mechanics and the time, not a pruned model worth
keeping.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import List, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

import segkernels
from segkernels.pruning import prune_sequential


class SyntheticImages(Dataset):
    """Random images made on demand from their index: any number of them without holding them."""

    def __init__(self, count: int, size: int):
        self.count, self.size = count, size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, self.size, self.size, generator=g), i


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="calibration images over all ranks")
    parser.add_argument("--size", type=int, default=160, help="image height and width")
    parser.add_argument("--batch", type=int, default=8, help="images per batch on each rank")
    parser.add_argument("--positions", type=int, default=10, help="positions sampled per image (0: all)")
    parser.add_argument("--ratio", type=float, default=0.5, help="share of input channels kept")
    parser.add_argument("--width", type=int, default=64, help="SegNet width (64: VGG-16)")
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--checkpoint", help="a SegNet state_dict to prune (default: random weights)")
    parser.add_argument("--out", help="where rank 0 saves the pruned SegNet")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    try:
        torch.manual_seed(0)  # the same random weights on every rank (prune_sequential checks)
        model = segkernels.nn.SegNet(args.classes, width=args.width)
        if args.checkpoint:
            model.load_state_dict(torch.load(args.checkpoint, map_location="cpu"))
        model = model.to(device).eval()
        params_before = sum(p.numel() for p in model.parameters())

        images = SyntheticImages(args.images, args.size)
        loader = DataLoader(images, batch_size=args.batch, sampler=DistributedSampler(images, shuffle=False),
                            pin_memory=cuda)
        start = time.perf_counter()
        pruned, report = prune_sequential(
            model.encoder_sequential(), loader, ratio=args.ratio, layers=model.prunable_convs(),
            positions_per_image=args.positions or None,
            generator=torch.Generator(device=device).manual_seed(rank),  # independent samples per rank
            progress=rank == 0)
        seconds = time.perf_counter() - start
        model.load_encoder(pruned)

        # Every rank should hold the same model, bit for bit.
        digest = torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()]).sum().item()
        digests = [None] * world
        dist.all_gather_object(digests, (digest, sum(p.numel() for p in model.parameters())))
        if rank == 0:
            print(report)
            print(f"\n{world} ranks ({dist.get_backend()}), {args.images} images {args.size}x{args.size}, "
                  f"{args.positions or 'every'} positions per image: pruned in {seconds:.1f} s; "
                  f"parameters {params_before:,} -> {digests[0][1]:,}")
            print(f"every rank holds the same pruned model: {all(d == digests[0] for d in digests)}")
            if args.out:
                torch.save(model.state_dict(), args.out)
        return 0 if all(d == digests[0] for d in digests) else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
