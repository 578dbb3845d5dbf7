"""segkernels end to end: SegNet teacher, distilled student, pruned teacher, one table.

    python examples/segnet_end_to_end.py                # synthetic scenes, CPU, a few minutes
    python examples/segnet_end_to_end.py --images DIR --labels DIR --classes 12 --size 128
    python examples/segnet_end_to_end.py --tiny         # smoke run (CI)

Steps, each with a progress bar:
1. data: a synthetic scene-segmentation set (random shapes of several classes on textured
   backgrounds, with an ignore border), or image/label folders (same file names; labels are
   single-channel PNGs of class indices, 255 = ignore);
2. class weights by SegNet's median frequency balancing (segkernels.median_frequency_weights);
3. a SegNet teacher (segkernels.nn.SegNet: decoder upsampling by compact uint8 pooling indices)
   trained with weighted cross-entropy;
4. a narrower SegNet student trained with Hinton distillation from the teacher
   (segkernels.seg_kd_loss: hard CE + tempered KL, ignore pixels masked);
5. the teacher's encoder channel-pruned (segkernels.pruning.prune_sequential: LASSO channel
   selection and least-squares reconstruction from Gram statistics), then briefly fine-tuned;
6. every model evaluated with segkernels.confusion_matrix (argmax fused) and
   segkernels.segmentation_scores: a table of G, C, mIoU, parameters and time per batch,
   and a PNG with sample predictions and a bar chart.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import time
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

import segkernels
from segkernels.pruning import prune_sequential

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are a nicety, not a requirement

    def tqdm(iterable=None, **kwargs):
        return iterable


IGNORE = 255


# ----------------------------------------------------------------------------------------------
# Data


def synthetic_scenes(n: int, size: int, classes: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random shapes (discs, boxes, bars) of classes 1..classes-1 on a textured class-0
    background; each class has its own colour and stripe texture, so the task is learnable but
    not trivial; a 3-pixel ignore border."""
    # Class appearance is the same in every split (its own fixed seed); only the scenes vary.
    look = torch.Generator().manual_seed(1000 + classes)
    palette = torch.rand(classes, 3, generator=look)
    freqs = 0.2 + 0.6 * torch.rand(classes, generator=look)
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.empty(n, 3, size, size)
    labels = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        label = torch.zeros(size, size, dtype=torch.long)
        for _ in range(int(torch.randint(2, 6, (1,), generator=g))):
            cls = int(torch.randint(1, classes, (1,), generator=g))
            cy, cx = (torch.rand(2, generator=g) * size).tolist()
            r = size * (0.08 + 0.15 * float(torch.rand(1, generator=g)))
            kind = int(torch.randint(0, 3, (1,), generator=g))
            if kind == 0:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            elif kind == 1:
                mask = ((yy - cy).abs() < r) & ((xx - cx).abs() < 0.6 * r)
            else:
                mask = ((yy - cy).abs() < 0.3 * r) & ((xx - cx).abs() < 1.6 * r)
            label[mask] = cls
        stripes = torch.sin(freqs[label] * (xx + yy).float())
        image = palette[label].permute(2, 0, 1) * (0.75 + 0.25 * stripes)
        image += 0.15 * torch.randn(3, size, size, generator=g)
        label[:3], label[-3:], label[:, :3], label[:, -3:] = IGNORE, IGNORE, IGNORE, IGNORE
        images[i], labels[i] = image, label
    return images, labels


def folder_dataset(images_dir: str, labels_dir: str, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Image/label folders with matching file names, resized to size x size."""
    from PIL import Image  # only needed for real data

    names = sorted(os.listdir(labels_dir))
    images, labels = [], []
    for name in tqdm(names, desc="loading", leave=False):
        stem = os.path.splitext(name)[0]
        match = [f for f in os.listdir(images_dir) if os.path.splitext(f)[0] == stem]
        if not match:
            continue
        img = Image.open(os.path.join(images_dir, match[0])).convert("RGB").resize((size, size), Image.BILINEAR)
        lab = Image.open(os.path.join(labels_dir, name)).resize((size, size), Image.NEAREST)
        images.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3))
        labels.append(torch.frombuffer(bytearray(lab.tobytes()), dtype=torch.uint8).view(size, size))
    if not images:
        sys.exit(f"no image/label pairs found in {images_dir} and {labels_dir}")
    x = torch.stack(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True), torch.stack(labels).long()


def batches(images, labels, batch_size, shuffle, seed=0):
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)) if shuffle else None
    for start in range(0, len(images), batch_size):
        idx = order[start : start + batch_size] if shuffle else slice(start, start + batch_size)
        yield images[idx], labels[idx]


# ----------------------------------------------------------------------------------------------
# Training and evaluation


def train(model, data, epochs, batch_size, loss_fn, desc, lr=3e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    steps = epochs * math.ceil(len(data[0]) / batch_size)
    bar = tqdm(total=steps, desc=desc)
    for epoch in range(epochs):
        for x, y in batches(*data, batch_size, shuffle=True, seed=epoch):
            loss = loss_fn(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update(1)
    if hasattr(bar, "close"):
        bar.close()


@torch.no_grad()
def evaluate(model, data, classes, batch_size) -> Dict[str, float]:
    model.eval()
    cm = torch.zeros(classes, classes, dtype=torch.long)
    seconds, count = 0.0, 0
    for x, y in batches(*data, batch_size, shuffle=False):
        start = time.perf_counter()
        logits = model(x)
        seconds += time.perf_counter() - start
        count += 1
        cm += segkernels.confusion_matrix(logits, y, classes, ignore_index=IGNORE)
    scores = segkernels.segmentation_scores(cm)
    return {
        "G": 100 * scores["global_accuracy"].item(),
        "C": 100 * scores["mean_class_accuracy"].item(),
        "mIoU": 100 * scores["mean_iou"].item(),
        "params": sum(p.numel() for p in model.parameters()),
        "ms/batch": 1000 * seconds / max(count, 1),
    }


def print_seed_table(runs) -> None:
    """The examples' per-seed table: one row a model, one column a seed, then their mean."""
    import statistics

    seeds = len(runs)
    print("| model | " + " | ".join(f"seed {s}" for s in range(seeds)) + " | mean |")
    print("|---|" + "---:|" * (seeds + 1))
    for name in runs[0]:
        values = [r[name] for r in runs]
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {statistics.mean(values):.1f} |")


def source_commit() -> str:
    """The commit this run's code comes from (+dirty when the package or example differ from it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no", "--",
                                "../segkernels", "../csrc", "../setup.py", "segnet_end_to_end.py"],
                               capture_output=True, text=True).stdout
        return commit + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{os.cpu_count()}-core {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="folder of images (with --labels); default: synthetic scenes")
    p.add_argument("--labels", help="folder of single-channel label PNGs (class index per pixel, 255 = ignore)")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--size", type=int, default=64, help="image side (pixels)")
    p.add_argument("--train", type=int, default=256, help="synthetic training images")
    p.add_argument("--test", type=int, default=64, help="synthetic test images")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--teacher-width", type=int, default=16)
    p.add_argument("--student-width", type=int, default=8)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--soft-weight", type=float, default=0.25,
                   help="weight of the KD term in seg_kd_loss (the hard CE term has weight 1)")
    p.add_argument("--prune-ratio", type=float, default=0.5, help="share of prunable input channels kept")
    p.add_argument("--out", default="segnet_end_to_end.png", help="the figure's path ('' for none)")
    p.add_argument("--tiny", action="store_true", help="a smoke run in seconds")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        args.train, args.test, args.size, args.epochs, args.batch = 16, 8, 32, 1, 8
        args.teacher_width, args.student_width = 8, 4
    torch.manual_seed(args.seed)
    print(f"segkernels {segkernels.__version__} at {source_commit()}: compiled kernels "
          f"{segkernels.kernels_available()}, torch {torch.__version__}, {torch.get_num_threads()} threads on "
          f"{machine()}, seed {args.seed}, {time.strftime('%Y-%m-%d')}")

    if args.images:
        x, y = folder_dataset(args.images, args.labels, args.size)
        split = max(1, len(x) // 5)
        train_set, test_set = (x[split:], y[split:]), (x[:split], y[:split])
    else:
        train_set = synthetic_scenes(args.train, args.size, args.classes, args.seed)
        test_set = synthetic_scenes(args.test, args.size, args.classes, args.seed + 1)
    classes = args.classes
    weights = segkernels.median_frequency_weights(train_set[1], classes, ignore_index=IGNORE)
    print("median-frequency class weights:", [round(w, 3) for w in weights.tolist()])

    results: Dict[str, Dict[str, float]] = {}
    teacher = segkernels.nn.SegNet(classes, width=args.teacher_width)

    def ce(model, x, y):
        return F.cross_entropy(model(x), y, weight=weights, ignore_index=IGNORE)

    train(teacher, train_set, args.epochs, args.batch, ce, "teacher")
    results["teacher"] = evaluate(teacher, test_set, classes, args.batch)

    student = segkernels.nn.SegNet(classes, width=args.student_width)
    teacher.eval()

    def distill(model, x, y):
        with torch.no_grad():
            soft = teacher(x)
        return segkernels.seg_kd_loss(model(x), soft, y, temperature=args.temperature, class_weight=weights,
                                      soft_weight=args.soft_weight, ignore_index=IGNORE)

    train(student, train_set, args.epochs, args.batch, distill, "student (KD)")
    results["student (KD)"] = evaluate(student, test_set, classes, args.batch)

    baseline = segkernels.nn.SegNet(classes, width=args.student_width)
    train(baseline, train_set, args.epochs, args.batch, ce, "student (no KD)")
    results["student (no KD)"] = evaluate(baseline, test_set, classes, args.batch)

    pruned = segkernels.nn.SegNet(classes, width=args.teacher_width)
    pruned.load_state_dict(teacher.state_dict())
    pruned.eval()
    encoder, prunable = pruned.encoder_sequential(), pruned.prunable_convs()
    calibration = [x for x, _ in batches(*train_set, args.batch, shuffle=False)]
    encoder, report = prune_sequential(encoder, calibration, ratio=args.prune_ratio, layers=prunable)
    pruned.load_encoder(encoder)
    results["teacher pruned"] = evaluate(pruned, test_set, classes, args.batch)
    train(pruned, train_set, max(1, args.epochs // 4), args.batch, ce, "pruned fine-tune", lr=1e-3)
    results["teacher pruned + fine-tune"] = evaluate(pruned, test_set, classes, args.batch)

    header = "| model | G % | C % | mIoU % | parameters | ms / batch |"
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['G']:.1f} | {r['C']:.1f} | {r['mIoU']:.1f} | {r['params']:,} | {r['ms/batch']:.1f} |")
    print()
    print("\n".join(lines))
    print()
    print(f"pruning report: {report}")
    if args.out:
        save_figure(args.out, test_set, {"teacher": teacher, "student (KD)": student, "pruned": pruned}, results)
        print(f"figure: {args.out}")
    return 0


def save_figure(path, test_set, models, results):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no figure")
        return
    x, y = test_set[0][:3], test_set[1][:3]
    with torch.no_grad():
        preds = {name: m.eval()(x).argmax(1) for name, m in models.items()}
    cols = 2 + len(preds)
    fig = plt.figure(figsize=(2.4 * cols, 2.4 * len(x) + 3))
    grid = fig.add_gridspec(len(x) + 1, cols, height_ratios=[1] * len(x) + [1.3])
    show = lambda t: (t - t.min()) / (t.max() - t.min() + 1e-9)  # noqa: E731
    for r in range(len(x)):
        panels = [("image", show(x[r].permute(1, 2, 0))), ("label", y[r].masked_fill(y[r] == IGNORE, -1))]
        panels += [(name, p[r]) for name, p in preds.items()]
        panels = [(title, img.numpy()) for title, img in panels]  # matplotlib wants arrays, not tensors
        for c, (title, img) in enumerate(panels):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(img, cmap=None if title == "image" else "tab10", vmin=None if title == "image" else -1,
                      vmax=None if title == "image" else 9, interpolation="nearest")
            ax.set_axis_off()
            if r == 0:
                ax.set_title(title, fontsize=9)
    ax = fig.add_subplot(grid[len(x), :])
    names = list(results)
    for k, metric in enumerate(["G", "C", "mIoU"]):
        ax.bar([i + 0.27 * (k - 1) for i in range(len(names))], [results[n][metric] for n in names], width=0.27,
               label=metric)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("%")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
