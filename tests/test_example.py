"""Smoke runs of the examples: segnet_end_to_end.py at its --tiny size (the whole package together:
median-frequency weights, SegNet with compact-index unpooling, seg_kd_loss distillation,
prune_sequential, confusion_matrix and segmentation_scores), prune_distributed.py on two
ranks under torchrun, and label_structure.py (LabelAutoencoder, LabelStructureLoss),
domain_transfer.py and dense_blocks.py (shift_and_stitch, ChainedResidualPooling, FRRU,
BilinearUpsample) at their --tiny sizes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys


EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "segnet_end_to_end.py")


LABEL_STRUCTURE = os.path.join(os.path.dirname(__file__), "..", "examples", "label_structure.py")
DENSE_BLOCKS = os.path.join(os.path.dirname(__file__), "..", "examples", "dense_blocks.py")


def load_example(path=EXAMPLE, name="segnet_end_to_end"):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table_rows(printed):
    lines = printed.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| model |"))) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        rows.append(line)
    return rows


def test_example_tiny_run(tmp_path, capsys):
    example = load_example()
    figure = tmp_path / "example.png"
    assert example.main(["--tiny", "--out", str(figure)]) == 0
    rows = _table_rows(capsys.readouterr().out)
    names = [row.split("|")[1].strip() for row in rows]
    assert names == ["teacher", "student (KD)", "student (no KD)", "teacher pruned", "teacher pruned + fine-tune"]
    for row in rows:
        g, c, miou = (float(v) for v in row.split("|")[2:5])
        assert 0.0 <= miou <= 100.0 and 0.0 <= c <= 100.0 and 0.0 < g <= 100.0
    # The pruned teacher really is smaller.
    params = {row.split("|")[1].strip(): int(row.split("|")[5].replace(",", "")) for row in rows}
    assert params["teacher pruned"] < params["teacher"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert figure.stat().st_size > 0


def test_synthetic_scenes_have_every_part():
    example = load_example()
    images, labels = example.synthetic_scenes(4, 32, 5, seed=3)
    assert images.shape == (4, 3, 32, 32) and labels.shape == (4, 32, 32)
    assert (labels[:, :3] == example.IGNORE).all() and (labels[:, :, -3:] == example.IGNORE).all()
    inner = labels[:, 3:-3, 3:-3]
    assert inner.min() >= 0 and inner.max() < 5 and len(inner.unique()) > 1


def test_distributed_pruning_example_on_two_ranks():
    # torchrun, as the README runs it: two gloo ranks on the CPU, a tiny SegNet.
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "prune_distributed.py")
    # The ranks import segkernels from this checkout, as the test process does (an in-place build
    # need not be installed).
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
         "--width", "8", "--images", "12", "--size", "32", "--batch", "2", "--positions", "0"],
        capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 ranks (gloo), 12 images 32x32" in run.stdout
    assert "every rank holds the same pruned model: True" in run.stdout
    assert run.stdout.count("| conv |") == 1  # the report prints once, on rank 0


def test_label_structure_example_tiny_run(capsys):
    example = load_example(LABEL_STRUCTURE, "label_structure")
    assert example.main(["--tiny", "--seeds", "2"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    names = [row.split("|")[1].strip() for row in rows]
    assert names == ["autoencoder (labels in, labels out)", "cross-entropy", "+ structure (decoder)",
                     "+ structure (encoder)"]
    for row in rows:
        cells = [float(v) for v in row.split("|")[2:5]]  # seed 0, seed 1, mean
        assert all(0.0 <= v <= 100.0 for v in cells)
        assert abs(cells[2] - (cells[0] + cells[1]) / 2) <= 0.051


def test_domain_transfer_example_tiny_run(capsys):
    example = load_example(os.path.join(os.path.dirname(__file__), "..", "examples", "domain_transfer.py"),
                           "domain_transfer")
    assert example.main(["--tiny"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    names = [row.split("|")[1].strip() for row in rows]
    assert names == ["source only", "AdaBN (recalibrate_batchnorm)", "GAM (AdaBN + ActivationMatching)"]
    for row in rows:
        assert all(0.0 <= float(v) <= 100.0 for v in row.split("|")[2:4])


def test_dense_blocks_example_tiny_run(capsys):
    example = load_example(DENSE_BLOCKS, "dense_blocks")
    assert example.main(["--tiny"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    names = [row.split("|")[1].strip() for row in rows]
    assert names == ["FCN (BilinearUpsample)", "FCN (shift_and_stitch)", "RefineNet form (ChainedResidualPooling)",
                     "FRRN form (FRRU)"]
    for row in rows:
        assert all(0.0 <= float(v) <= 100.0 for v in row.split("|")[2:4])


def test_dense_blocks_networks_keep_the_resolution():
    # Every network maps an image to class scores at its resolution, and shift-and-stitch of the
    # FCN's stride-4 scores has that resolution too.
    example = load_example(DENSE_BLOCKS, "dense_blocks")
    import segkernels
    import torch

    x = torch.randn(2, 3, 32, 48)
    for cls in (example.FCN, example.RefineNetForm, example.FRRNForm):
        assert cls(5, 8).eval()(x).shape == (2, 5, 32, 48)
    fcn = example.FCN(5, 8).eval()
    assert fcn.coarse(x).shape == (2, 5, 8, 12)
    assert segkernels.shift_and_stitch(fcn.coarse, x, 4).shape == (2, 5, 32, 48)
