"""`make bench`: runs every benchmarks/bench_*.py on the default device and writes
benchmarks/results/<device>/{benchmark.json, report.md, speedup.png}, then prints the table.

Options: --filter EXPR (pytest -k), --out DIR; SEGKERNELS_BENCH_DEVICE=cpu|cuda picks the
device, SEGKERNELS_BENCH_SCALE=0.25 shrinks batches for a quick run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import report  # noqa: E402
from common import bench_device  # noqa: E402


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        name = f"cpu-{os.cpu_count()}core-{name}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def versions() -> str:
    parts = [f"torch {torch.__version__}", f"python {platform.python_version()}"]
    if torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except Exception:
        pass
    import segkernels

    parts.append(f"segkernels kernels loaded: {segkernels.kernels_available()}")
    return ", ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--filter", default=None, help="pytest -k expression")
    args = parser.parse_args()
    device = bench_device()
    out_dir = os.path.join(args.out, device_label(device))
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "benchmark.json")
    cmd = [sys.executable, "-m", "pytest", HERE, "-q", "-p", "no:cacheprovider", "-o", "python_files=bench_*.py"]
    cmd += [f"--benchmark-json={json_path}"]
    cmd += ["--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"]
    if args.filter:
        cmd += ["-k", args.filter]
    rc = subprocess.call(cmd, cwd=HERE)
    if rc != 0 or not os.path.exists(json_path):
        print(f"benchmarks failed (pytest exit {rc})", file=sys.stderr)
        return rc or 1
    title = [
        f"# segkernels benchmarks on {device_label(device)}",
        "",
        f"{datetime.date.today().isoformat()}; {versions()}.",
        "",
    ]
    print(report.write_report(json_path, out_dir, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
