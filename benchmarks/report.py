"""Turns pytest-benchmark JSON into the markdown table (and a PNG plot) of `make bench`.

Columns: median time, speed-up over the baseline of the same op and case, what users run today
(the row whose benchmark names its formulation, listed under the table, else the "torch" row; the ratio of
the two tests' medians, and, where the bench recorded it, the same ratio from calls timed
interleaved, which the build VM's drift cannot tilt), achieved GB/s for the fewest bytes the op
must move, that as a share of the measured copy bandwidth,
and the measured peak extra memory.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict


def load_rows(path: str):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "op" not in info:
            continue
        median = b["stats"]["median"]
        rows.append(
            dict(
                op=info["op"],
                impl=info["impl"],
                case=info["case"],
                median_s=median,
                gbps=info["bytes"] / median / 1e9 if info.get("bytes") else float("nan"),
                peak_mb=info.get("peak_bytes", -1) / 2**20,
                paired=info.get("paired_speedup"),
                formulation=info.get("formulation"),
            )
        )
    return data, rows


def build_table(rows, title_lines=()):
    copy = [r for r in rows if r["op"] == "copy"]
    copy_gbps = max((r["gbps"] for r in copy), default=float("nan"))
    groups = defaultdict(list)
    for r in rows:
        if r["op"] != "copy":
            groups[(r["op"], r["case"])].append(r)
    lines = list(title_lines)
    lines.append(f"Measured copy bandwidth: {copy_gbps:.1f} GB/s (read + write of 256 MiB).")
    lines.append("")
    lines.append(
        "| op | case | impl | median ms | speed-up vs baseline | paired speed-up | GB/s | % of copy BW | peak MiB |"
    )
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|")
    speedups = []
    for (op, case), rs in sorted(groups.items()):
        # The baseline: the row that names its formulation (what users run), else the "torch" row.
        base = next((r for r in rs if r["formulation"]), None) or next((r for r in rs if r["impl"] == "torch"), None)
        for r in sorted(rs, key=lambda r: (r is not base, r["impl"])):
            sp = base["median_s"] / r["median_s"] if base else float("nan")
            if r is not base:
                speedups.append((f"{op} | {case} | {r['impl']}", sp))
            paired = f"{r['paired']:.2f}x" if r["paired"] is not None else "-"
            lines.append(
                f"| {op} | {case} | {r['impl']} | {r['median_s'] * 1e3:.2f} | {sp:.2f}x | {paired} | {r['gbps']:.1f} | "
                f"{100 * r['gbps'] / copy_gbps:.0f}% | {r['peak_mb']:.0f} |"
            )
    formulations = sorted({(r["op"], r["impl"], r["formulation"]) for r in rows if r["formulation"]})
    if formulations:
        lines += ["", "Baselines (the first row of each case): what users of each op run today, with their settings.", ""]
        lines += [f"- {op} ({impl}): {text}" for op, impl, text in formulations]
    return "\n".join(lines), speedups


def plot(speedups, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not speedups:
        return False
    labels = [s[0] for s in speedups]
    values = [s[1] for s in speedups]
    # The figure grows with its longest label instead of cutting it off (about 0.055 inch a
    # character at this font size), and bbox_inches="tight" keeps every label on the page.
    width = 4.5 + 0.055 * max(len(label) for label in labels)
    fig, ax = plt.subplots(figsize=(width, 0.32 * len(labels) + 1.2))
    ax.barh(range(len(labels)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over the baseline, what users run today (median time)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def write_report(json_path: str, out_dir: str, title_lines=()) -> str:
    _, rows = load_rows(json_path)
    table, speedups = build_table(rows, title_lines)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(table + "\n")
    if plot(speedups, os.path.join(out_dir, "speedup.png")):
        table += f"\n\nPlot: {os.path.join(out_dir, 'speedup.png')}"
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    print(write_report(args.json, args.out))
