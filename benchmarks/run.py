"""`make bench`: runs every benchmarks/bench_*.py on the default device and writes
benchmarks/results/<device>/{benchmark.json, report.md, speedup.png}, then prints the table.

Options: --filter EXPR (pytest -k), --only STEMS (e.g. kd_loss,pruning), --timeout SECONDS per
file, --out DIR; SEGKERNELS_BENCH_DEVICE=cpu|cuda picks the
device, SEGKERNELS_BENCH_SCALE=0.25 shrinks batches for a quick run.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
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


def source_commit() -> str:
    """The commit the measured code comes from (+dirty when the package, the extension or the
    benchmarks differ from it)."""
    try:
        commit = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--untracked-files=no", "--",
                                "../segkernels", "../csrc", "../benchmarks/*.py", "../setup.py"],
                               capture_output=True, text=True).stdout
        return commit + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"


def versions() -> str:
    parts = [f"commit {source_commit()}", f"torch {torch.__version__}", f"python {platform.python_version()}"]
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


def run_file(path: str, json_path: str, filt: str | None, timeout: float | None) -> int:
    cmd = [sys.executable, "-m", "pytest", path, "-q", "-p", "no:cacheprovider", "-o", "python_files=bench_*.py"]
    cmd += [f"--benchmark-json={json_path}", "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"]
    if filt:
        cmd += ["-k", filt]
    try:
        return subprocess.call(cmd, cwd=HERE, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{os.path.basename(path)}: stopped after {timeout:.0f} s", file=sys.stderr)
        return 124


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--filter", default=None, help="pytest -k expression")
    parser.add_argument("--only", default=None, help="comma-separated op stems (bench_<stem>.py) to run")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per benchmark file")
    args = parser.parse_args()
    device = bench_device()
    # Absolute: each op file runs in its own pytest process from benchmarks/ (make bench passes a
    # path relative to the repository root).
    out_dir = os.path.join(os.path.abspath(args.out), device_label(device))
    raw_dir = os.path.join(out_dir, "raw")
    os.makedirs(raw_dir, exist_ok=True)
    # One pytest run per op file (the copy bandwidth first): a failing or slow op loses only
    # its own rows, and the report still comes out.
    files = sorted(glob.glob(os.path.join(HERE, "bench_*.py")), key=lambda f: (not f.endswith("bench_copy.py"), f))
    if args.only:
        wanted = {"copy"} | set(args.only.split(","))
        files = [f for f in files if os.path.basename(f)[6:-3] in wanted]
    failed = []
    for path in files:
        stem = os.path.basename(path)[:-3]
        json_path = os.path.join(raw_dir, f"{stem}.json")
        if os.path.exists(json_path):
            os.remove(json_path)
        rc = run_file(path, json_path, args.filter, args.timeout)
        if rc not in (0, 5):
            failed.append(f"{stem} (pytest exit {rc})")
    # The report holds the latest run of every op file in raw/, so `--only` refreshes a few ops
    # without losing the others.
    merged = None
    for json_path in sorted(glob.glob(os.path.join(raw_dir, "bench_*.json"))):
        with open(json_path) as f:
            data = json.load(f)
        if merged is None:
            merged = data
        else:
            merged["benchmarks"] += data["benchmarks"]
    if merged is None:
        print("no benchmark produced results", file=sys.stderr)
        return 1
    json_path = os.path.join(out_dir, "benchmark.json")
    with open(json_path, "w") as f:
        json.dump(merged, f, indent=1)
    title = [
        f"# segkernels benchmarks on {device_label(device)}",
        "",
        f"{datetime.date.today().isoformat()}; {versions()}.",
        "",
    ]
    if failed:
        title += [f"Incomplete: {', '.join(failed)}.", ""]
    print(report.write_report(json_path, out_dir, title))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
