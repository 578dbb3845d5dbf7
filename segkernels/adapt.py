"""Unsupervised domain transfer by matching activations (GAM: Huang, Huang and Krahenbuhl,
"Domain transfer through deep activation matching", ECCV 2018).

- recalibrate_batchnorm: the Gaussian i.i.d. step in its AdaBN form, every BatchNorm's running
  statistics re-estimated on target batches (torch.optim.swa_utils.update_bn's estimate), across
  torch.distributed ranks.
- gaussian_matching_loss: the per-channel mean and standard deviation gap between two sets of
  activations, differentiable in both.
- ActivationMatching: the general step, least-squares GAN discriminators on standardised
  activations of chosen layers, and the weight-drift term that keeps the adapted network near
  the source one.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from ._checks import ArgumentTypeError, ArgumentValueError, check_int, check_tensor
from ._progress import progress_bar

__all__ = ["recalibrate_batchnorm", "gaussian_matching_loss", "ActivationMatching"]

_BatchNorm = nn.modules.batchnorm._BatchNorm


def _default_forward(model: nn.Module, batch):
    # update_bn's rule: a (input, label, ...) batch feeds its first element.
    return model(batch[0] if isinstance(batch, (list, tuple)) else batch)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable, *,
                          forward: Optional[Callable[[nn.Module, object], object]] = None,
                          group=None, progress: bool = False) -> nn.Module:
    """Re-estimates every BatchNorm's running mean and variance on `batches` (AdaBN; GAM's
    Gaussian i.i.d. matching), in place; returns the model.

    The estimate is torch.optim.swa_utils.update_bn's: statistics reset, then the cumulative
    average (momentum None) of each batch's mean and unbiased variance in training mode. Then:
    - forward(model, batch) runs a batch (default: model(batch), or model(batch[0]) for a tuple
      or list, as update_bn); the batches are not moved between devices;
    - under an initialised torch.distributed (ranks of `group`, None: the world), each rank
      runs its own batches and the averages are combined over every rank's batches (an
      all-reduce of the batch-weighted sums): each BatchNorm then holds the average over all
      of them, on every rank;
    - the model's training mode and every BatchNorm's momentum are restored afterwards;
    - progress: a tqdm bar (when tqdm is installed) on the first rank.
    A model without BatchNorm is returned unchanged; with no batch anywhere the statistics stay
    reset (mean 0, variance 1), as update_bn leaves them.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if forward is not None and not callable(forward):
        raise ArgumentTypeError(f"forward must be callable, got {type(forward).__name__}")
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if group is not None and not distributed:
        raise ArgumentValueError("group was given but torch.distributed is not initialised")
    if not norms:
        return model
    momenta = {m: m.momentum for m in norms}
    was_training = model.training
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        run = forward or _default_forward
        lead = not distributed or dist.get_rank(group) == 0
        count = 0
        for batch in progress_bar(batches, "recalibrate_batchnorm") if progress and lead else batches:
            run(model, batch)
            count += 1
        if distributed and dist.get_world_size(group) > 1:
            device = norms[0].running_mean.device
            total = torch.tensor([float(count)], dtype=torch.float64, device=device)
            dist.all_reduce(total, group=group)
            for m in norms:
                sums = torch.stack([m.running_mean.double(), m.running_var.double()]) * count
                dist.all_reduce(sums, group=group)
                if total.item() > 0:
                    m.running_mean.copy_(sums[0] / total)
                    m.running_var.copy_(sums[1] / total)
                m.num_batches_tracked.fill_(int(total.item()))
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.train(was_training)
    return model


def _channel_moments(x: torch.Tensor):
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims)
    var = (x - mean.view(1, -1, *([1] * (x.dim() - 2)))).square().mean(dims)
    # sqrt has no derivative at 0 (a dead ReLU channel): 0 there, with a zero gradient.
    positive = var > 0
    std = torch.where(positive, torch.where(positive, var, 1.0).sqrt(), 0.0)
    return mean, std


def gaussian_matching_loss(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """GAM's Gaussian i.i.d. matching term between activations (N, C, *) of two domains (batch
    and spatial sizes may differ): the mean over channels of (mu_s - mu_t)^2 + (sigma_s -
    sigma_t)^2, with per-channel means and biased standard deviations over the batch and
    spatial dimensions. Differentiable in both; a constant channel has sigma 0 and a zero
    gradient through it (not NaN)."""
    check_tensor(source, "source")
    check_tensor(target, "target")
    for name, t in (("source", source), ("target", target)):
        if t.dim() < 2 or not t.is_floating_point():
            raise ArgumentValueError(f"{name} must be floating (N, C, *) activations, got {t.dtype} {tuple(t.shape)}")
        if t.numel() == 0:
            raise ArgumentValueError(f"{name} must hold at least one activation per channel, got {tuple(t.shape)}")
    if source.shape[1] != target.shape[1]:
        raise ArgumentValueError(f"source and target must have the same channels, got {source.shape[1]} and "
                                 f"{target.shape[1]}")
    mu_s, sd_s = _channel_moments(source)
    mu_t, sd_t = _channel_moments(target)
    return ((mu_s - mu_t).square() + (sd_s - sd_t).square()).mean()


def _standardise(a: torch.Tensor) -> torch.Tensor:
    mean, std = _channel_moments(a)
    shape = (1, -1) + (1,) * (a.dim() - 2)
    return (a - mean.view(shape)) / (std.view(shape) + 1e-5)


def _discriminator(channels: int, hidden: int, dims: int) -> nn.Module:
    # A per-position critic: 1 x 1 convolutions (a linear stack for (N, C) activations).
    if dims == 2:
        return nn.Sequential(nn.Linear(channels, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                             nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
    conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[dims]
    return nn.Sequential(conv(channels, hidden, 1), nn.LeakyReLU(0.2), conv(hidden, hidden, 1), nn.LeakyReLU(0.2),
                         conv(hidden, 1, 1))


class ActivationMatching(nn.Module):
    """GAM's general matching of activation distributions, with least-squares GAN critics.

    ActivationMatching(model, layers, example, *, source=None, hidden_channels=64,
    standardise=True, forward=None):
      model: the network being adapted (trained); layers: names of its modules (as in
      model.named_modules(); GAM's ERFNet uses layers 4, 8, 12 and 17); example: one input batch,
      run once through the source network to size the critics. source: the frozen source-trained
      network (default: a copy of model as it is now, in eval mode, without gradients).
      hidden_channels: width of each critic (three 1 x 1 layers, LeakyReLU 0.2, one score per
      position). standardise: each batch's activations standardised per channel before the
      critics (the Gaussian step's residual is what they see). forward(net, batch) runs a batch
      (default net(batch)).

    Each step, with two optimisers (critics: am.critics.parameters(); network: model's):
      d_loss = am.critic_loss(source_batch, target_batch)   # 1/2 E[(D(a_s) - 1)^2] + 1/2 E[D(a_t)^2]
      g_loss = lam * am.matching_loss(target_batch) + mu * am.weight_drift()
    matching_loss is 1/2 E[(D(a_t) - 1)^2] summed over layers, with gradients for the network
    only; weight_drift is sum ||theta - theta_source||^2. GAM uses lam = 0.1. Call remove() (or
    use it as a context manager) to take the hooks off the networks.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], example, *, source: Optional[nn.Module] = None,
                 hidden_channels: int = 64, standardise: bool = True,
                 forward: Optional[Callable[[nn.Module, object], object]] = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ArgumentTypeError(f"model must be an nn.Module, got {type(model).__name__}")
        layers = list(layers)
        if not layers or not all(isinstance(name, str) for name in layers):
            raise ArgumentValueError(f"layers must be a non-empty list of module names, got {layers!r}")
        hidden = check_int(hidden_channels, "hidden_channels", 1)
        if forward is not None and not callable(forward):
            raise ArgumentTypeError(f"forward must be callable, got {type(forward).__name__}")
        # Plain attributes, not submodules: the critics are this module's only parameters.
        object.__setattr__(self, "model", model)
        if source is None:
            source = copy.deepcopy(model)
        source.eval()
        for p in source.parameters():
            p.requires_grad_(False)
        object.__setattr__(self, "source", source)
        self.layers = layers
        self.standardise = bool(standardise)
        self._forward = forward or (lambda net, batch: net(batch))
        self._captured: Dict[int, Dict[str, torch.Tensor]] = {id(model): {}, id(source): {}}
        self._hooks: List = []
        for net in (model, source):
            modules = dict(net.named_modules())
            for name in layers:
                if name not in modules:
                    raise ArgumentValueError(f"layers: no module named {name!r} in the network")
                self._hooks.append(modules[name].register_forward_hook(self._hook(id(net), name)))
        with torch.no_grad():
            acts = self._activations(source, example)
        self.critics = nn.ModuleDict()
        for name in layers:
            a = acts[name]
            if a.dim() < 2 or a.dim() > 5:
                raise ArgumentValueError(f"layer {name!r} gives {tuple(a.shape)}: activations must be (N, C, *) "
                                         "with 0 to 3 spatial dims")
            self.critics[name.replace(".", "_")] = _discriminator(a.shape[1], hidden, a.dim()).to(a.device)

    def _hook(self, key: int, name: str):
        def hook(_module, _inputs, output):
            self._captured[key][name] = output

        return hook

    def _activations(self, net: nn.Module, batch) -> Dict[str, torch.Tensor]:
        store = self._captured[id(net)]
        store.clear()
        self._forward(net, batch)
        missing = [n for n in self.layers if n not in store]
        if missing:
            raise RuntimeError(f"ActivationMatching: layers {missing} did not run in the forward pass")
        acts = {n: store[n] for n in self.layers}
        store.clear()
        return acts

    def _score(self, name: str, a: torch.Tensor) -> torch.Tensor:
        a = a.float()
        return self.critics[name.replace(".", "_")](_standardise(a) if self.standardise else a)

    def critic_loss(self, source_batch, target_batch) -> torch.Tensor:
        """The critics' least-squares loss, summed over layers; the networks get no gradient."""
        with torch.no_grad():
            src = self._activations(self.source, source_batch)
            tgt = self._activations(self.model, target_batch)
        loss = 0
        for name in self.layers:
            loss = loss + 0.5 * (self._score(name, src[name]) - 1).square().mean() + \
                0.5 * self._score(name, tgt[name]).square().mean()
        return loss

    def matching_loss(self, target_batch) -> torch.Tensor:
        """The adapted network's least-squares loss against the critics (its target activations
        scored as source), summed over layers; the critics get no gradient."""
        tgt = self._activations(self.model, target_batch)
        flags = [p.requires_grad for p in self.critics.parameters()]
        for p in self.critics.parameters():
            p.requires_grad_(False)
        try:
            loss = 0
            for name in self.layers:
                loss = loss + 0.5 * (self._score(name, tgt[name]) - 1).square().mean()
        finally:
            for p, f in zip(self.critics.parameters(), flags):
                p.requires_grad_(f)
        return loss

    def weight_drift(self) -> torch.Tensor:
        """sum over the adapted network's parameters of ||theta - theta_source||^2."""
        total = 0
        for p, q in zip(self.model.parameters(), self.source.parameters()):
            total = total + (p - q).square().sum()
        return total if isinstance(total, torch.Tensor) else torch.zeros(())

    def remove(self) -> None:
        """Takes the hooks off both networks."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def extra_repr(self) -> str:
        return f"layers={self.layers}, standardise={self.standardise}"
