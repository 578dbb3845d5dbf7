"""The device's measured copy bandwidth: the yardstick report.py divides achieved GB/s by."""

import torch

from common import bench_device, run_benchmark


def test_copy_bandwidth(benchmark):
    device = bench_device()
    n = 256 * 2**20 // 4  # 256 MiB of float32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    run_benchmark(
        benchmark,
        lambda: dst.copy_(src),
        op="copy",
        impl="torch",
        case="256 MiB float32",
        bytes_moved=2 * src.numel() * 4,
        device=device,
        rounds=10,
    )
