"""prune_sequential across torch.distributed ranks (two gloo processes on the CPU): bitwise-equal
pruned models on every rank, the single-process result over the union of the shards, failures
and model mismatches raised on every rank instead of hanging, progress and warnings on rank 0."""

import datetime
import os
import tempfile
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from helpers import requires_kernels
from pruning_cases import _free_port, _vgg
from segkernels import pruning

pytestmark = requires_kernels

WORLD = 2


def _equal_states(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _report_rows(report):
    # repr: the NaN error of a layer without held-out rows compares equal to itself
    return [(r.channels_after, r.rows, r.heldout_rows, repr(r.fit_error), repr(r.rel_error)) for r in report]


def _try(results, key, fn):
    """Runs a scenario; records what it returned, or the error this rank raised."""
    try:
        results[key] = fn()
    except Exception as e:
        results[key] = (type(e).__name__, isinstance(e, RuntimeError), str(e))


def _worker(rank, port, outdir, images, labels, state):
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A timeout turns a rank left waiting in a collective into a failure instead of a hung test.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        net = _vgg()
        net.load_state_dict(state)
        dataset = TensorDataset(images, labels)
        # Each rank reads its shard as (image, label) tuples, as a training script does.
        loader = DataLoader(dataset, batch_size=3,
                            sampler=DistributedSampler(dataset, num_replicas=WORLD, rank=rank, shuffle=False))
        pruned, report = pruning.prune_sequential(net, loader, ratio=0.5, positions_per_image=None, progress=False)
        results["every_position"] = (pruned.state_dict(), _report_rows(report))
        # Sampled positions, each rank with its own generator: still one model.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pruned, report = pruning.prune_sequential(net, loader, ratio=0.5, positions_per_image=1,
                                                      generator=torch.Generator().manual_seed(rank), progress=False)
        results["sampled"] = (pruned.state_dict(), _report_rows(report))
        results["warnings"] = len([w for w in caught if "unknowns" in str(w.message)])
        # A bad batch on rank 1 only: both ranks raise, neither waits forever.
        bad = [images[:2]] if rank == 0 else [images[:2, :2]]
        _try(results, "bad_batch", lambda: pruning.prune_sequential(net, bad, progress=False))
        # Rank 1 holds a different model.
        other = net if rank == 0 else nn.Sequential(*[nn.Conv2d(3, 13, 3, padding=1) if i == 0 else m
                                                      for i, m in enumerate(net)])
        _try(results, "other_model", lambda: pruning.prune_sequential(other, loader, progress=False))
        # Same shapes, weights never synchronised.
        drifted = _vgg(seed=rank)
        _try(results, "drifted", lambda: pruning.prune_sequential(drifted, loader, progress=False))
        _try(results, "other_ratio",
             lambda: pruning.prune_sequential(net, loader, ratio=0.5 if rank == 0 else 0.25, progress=False))
        # An empty shard on one rank is fine: the statistics come from the other.
        shard = [images[:4]] if rank == 0 else []
        _try(results, "empty_shard", lambda: pruning.prune_sequential(
            net, shard, ratio=0.5, positions_per_image=None, progress=False)[0].state_dict())
    finally:
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    """Runs every scenario once on two gloo ranks (one spawn: starting processes dominates)."""
    torch.manual_seed(1)
    images = torch.randn(12, 3, 9, 11)
    labels = torch.randint(0, 4, (12, 9, 11))
    net = _vgg()
    with tempfile.TemporaryDirectory() as d:
        torch.multiprocessing.spawn(_worker, args=(_free_port(), d, images, labels, net.state_dict()),
                                    nprocs=WORLD, join=True)
        results = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    return net, images, results


def test_ranks_prune_to_one_bitwise_equal_model(two_ranks):
    _, _, (r0, r1) = two_ranks
    for key in ("every_position", "sampled"):
        assert _equal_states(r0[key][0], r1[key][0]), key
        assert r0[key][1] == r1[key][1], key  # one report too: rows and held-out errors are summed
    assert _equal_states(r0["empty_shard"], r1["empty_shard"])


def test_ranks_match_one_process_over_all_images(two_ranks):
    net, images, (r0, _) = two_ranks
    state, rows = r0["every_position"]
    # The shards (DistributedSampler: images 0, 2, ... on rank 0 and 1, 3, ... on rank 1) cover
    # every image once, so the summed statistics are one process's up to rounding.
    single, report = pruning.prune_sequential(net, [images[i:i + 3] for i in range(0, 12, 3)], ratio=0.5,
                                              positions_per_image=None, progress=False)
    assert [r[:3] for r in rows] == [r[:3] for r in _report_rows(report)]  # the same rows, kept channels
    expected = single.state_dict()
    assert state.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(state[k], expected[k], rtol=1e-4, atol=1e-5, msg=k)
    # The second run pruned from rank 0's images only: a different model.
    alone, _ = pruning.prune_sequential(net, [images[:4]], ratio=0.5, positions_per_image=None, progress=False)
    for k, v in alone.state_dict().items():
        torch.testing.assert_close(r0["empty_shard"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_failures_raise_on_every_rank(two_ranks):
    _, _, (r0, r1) = two_ranks
    # The rank with the bad batch names the argument; the other says which rank failed.
    name, is_runtime, message = r1["bad_batch"]
    assert name == "ArgumentValueError" and is_runtime and "calibration_batches item 0" in message
    name, is_runtime, message = r0["bad_batch"]
    assert is_runtime and "rank 1" in message and "calibration_batches item 0" in message


@pytest.mark.parametrize("scenario, what", [
    ("other_model", "module 0"), ("drifted", "weight"), ("other_ratio", "keep")])
def test_ranks_that_disagree_on_the_model_are_refused(two_ranks, scenario, what):
    _, _, results = two_ranks
    for rank, r in enumerate(results):
        name, _, message = r[scenario]
        assert name == "ArgumentValueError", (rank, r[scenario])
        assert "ranks disagree" in message and what in message and "rank 1" in message, message


def test_warnings_show_on_rank_0_only(two_ranks):
    _, _, (r0, r1) = two_ranks
    assert r0["warnings"] > 0 and r1["warnings"] == 0
