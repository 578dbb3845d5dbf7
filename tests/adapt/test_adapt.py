"""segkernels.adapt (GAM's domain transfer): recalibrate_batchnorm against
torch.optim.swa_utils.update_bn (one process, and two gloo ranks over the union of their
batches), gaussian_matching_loss against its formula, ActivationMatching's losses and hooks."""

from __future__ import annotations

import datetime
import os
import socket
import tempfile

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from segkernels import adapt

D = torch.float64


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6, momentum=0.3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4), nn.BatchNorm1d(4)).double()


def _batches(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 6, 7, generator=g, dtype=D) * 2 + 1, torch.zeros(4)) for _ in range(n)]


def _bn_state(net):
    return {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}


def test_recalibrate_batchnorm_equals_update_bn_and_restores_the_model():
    batches = _batches()
    ours, ref = _net(), _net()
    ours.eval()
    ref.eval()
    adapt.recalibrate_batchnorm(ours, batches, progress=True)  # the bar changes nothing
    update_bn(batches, ref)
    a, b = _bn_state(ours), _bn_state(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not ours.training and ours[4].momentum == 0.3 and ours[1].momentum == 0.1
    # A forward function for models called otherwise, and no gradient recorded.
    calls = []

    def forward(model, batch):
        calls.append(1)
        return model(batch[0])

    again = _net()
    adapt.recalibrate_batchnorm(again, iter(batches), forward=forward)
    assert len(calls) == 5 and all(torch.equal(v, _bn_state(again)[k]) for k, v in a.items())
    assert adapt.recalibrate_batchnorm(nn.Linear(2, 2), batches) is not None  # no BatchNorm: unchanged
    with pytest.raises(TypeError, match="forward must be callable"):
        adapt.recalibrate_batchnorm(_net(), batches, forward=3)


def _worker(rank, port, outdir, batches):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        net = _net()
        mine = batches[:2] if rank == 0 else batches[2:]  # unequal shards: 2 and 3 batches
        adapt.recalibrate_batchnorm(net, mine)
        torch.save(_bn_state(net), os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_recalibrate_batchnorm_across_two_gloo_ranks_averages_every_batch():
    batches = _batches()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        torch.multiprocessing.spawn(_worker, args=(port, d, batches), nprocs=2)
        states = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(2)]
    ref = _net()
    update_bn(batches, ref)
    expected = _bn_state(ref)
    for state in states:
        for k in expected:
            torch.testing.assert_close(state[k], expected[k], rtol=1e-12, atol=1e-12)


def test_gaussian_matching_loss_formula_and_dead_channels():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 5, 6, 7, generator=g, dtype=D).requires_grad_()
    t = (torch.randn(3, 5, 8, 2, generator=g, dtype=D) * 2 + 1).requires_grad_()
    loss = adapt.gaussian_matching_loss(s, t)
    mu_s, mu_t = s.mean((0, 2, 3)), t.mean((0, 2, 3))
    sd_s, sd_t = s.std((0, 2, 3), unbiased=False), t.std((0, 2, 3), unbiased=False)
    expected = ((mu_s - mu_t) ** 2 + (sd_s - sd_t) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    for a, b in zip(torch.autograd.grad(loss, (s, t)), torch.autograd.grad(expected, (s, t))):
        torch.testing.assert_close(a, b)
    dead = s.detach().clone()
    dead[:, 2] = 0.0  # a dead ReLU channel: sigma 0, gradient finite
    dead.requires_grad_()
    (grad,) = torch.autograd.grad(adapt.gaussian_matching_loss(dead, t), dead)
    assert torch.isfinite(grad).all()
    assert adapt.gaussian_matching_loss(torch.randn(8, 3), torch.randn(5, 3)).dim() == 0  # (N, C) too
    with pytest.raises(ValueError, match="same channels"):
        adapt.gaussian_matching_loss(torch.randn(2, 3, 4), torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="at least one"):
        adapt.gaussian_matching_loss(torch.randn(0, 3, 4), torch.randn(2, 3, 4))


def test_activation_matching_trains_critics_and_the_network():
    net = _net().float()
    example = torch.randn(4, 3, 6, 7)
    source_data = [torch.randn(4, 3, 6, 7) for _ in range(3)]
    target_data = [torch.randn(4, 3, 6, 7) * 3 + 2 for _ in range(3)]  # a shifted domain
    with adapt.ActivationMatching(net, ["2", "5", "9"], example, hidden_channels=16) as am:
        assert sorted(am.critics.keys()) == ["2", "5", "9"]
        assert am.weight_drift().item() == 0.0
        critic_opt = torch.optim.Adam(am.critics.parameters(), lr=1e-2)
        net_opt = torch.optim.SGD(net.parameters(), lr=1e-3)
        first = None
        for step in range(30):
            d = am.critic_loss(source_data[step % 3], target_data[step % 3])
            first = d.item() if first is None else first
            critic_opt.zero_grad()
            d.backward()
            assert all(p.grad is None for p in net.parameters())  # the networks get nothing
            critic_opt.step()
        assert d.item() < first  # the critics learn to tell the domains apart
        g = 0.1 * am.matching_loss(target_data[0]) + 1e-3 * am.weight_drift()
        critic_opt.zero_grad()
        net_opt.zero_grad()
        g.backward()
        assert all(p.grad is None for p in am.critics.parameters())  # the critics get nothing
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
        net_opt.step()
        assert am.weight_drift().item() > 0
        assert all(not p.requires_grad for p in am.source.parameters())
    assert not net[2]._forward_hooks  # removed on exit
    with pytest.raises(ValueError, match="no module named"):
        adapt.ActivationMatching(net, ["nope"], example)
