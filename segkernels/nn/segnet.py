"""SegNet (Badrinarayanan et al.): a VGG-16-style encoder whose max-pooling indices drive the
decoder's upsampling, here with compact uint8 indices (1/8 of int64's memory)."""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from .._checks import ArgumentValueError, check_int
from .pooling import MaxPool2d, MaxUnpool2d

__all__ = ["SegNet"]

# VGG-16's five stages: convolutions per stage and channels at width 64.
_STAGES = [(2, 64), (2, 128), (3, 256), (3, 512), (3, 512)]


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SegNet(nn.Module):
    """SegNet encoder-decoder.

    Args:
        num_classes: output channels (class logits).
        in_channels: input image channels.
        width: channels of the first stage (64 in the paper); every stage scales with it, so a
            small width gives a small network for quick runs.
    Input (N, in_channels, H, W), any H and W (odd sizes are restored through output_size);
    output (N, num_classes, H, W) logits.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("width", width)):
            check_int(value, name, 1)
        chans = [max(1, c * width // 64) for _, c in _STAGES]
        self.encoder = nn.ModuleList()
        cin = in_channels
        for (convs, _), cout in zip(_STAGES, chans):
            layers = [_conv_bn_relu(cin if i == 0 else cout, cout) for i in range(convs)]
            self.encoder.append(nn.Sequential(*layers))
            cin = cout
        self.decoder = nn.ModuleList()
        for stage in reversed(range(len(_STAGES))):
            convs = _STAGES[stage][0]
            cout = chans[stage - 1] if stage > 0 else chans[0]
            layers = [_conv_bn_relu(chans[stage], chans[stage]) for _ in range(convs - 1)]
            layers.append(_conv_bn_relu(chans[stage], cout))
            self.decoder.append(nn.Sequential(*layers))
        self.classifier = nn.Conv2d(chans[0], num_classes, 3, padding=1)
        # ceil_mode: odd sizes keep their last row and column; compact uint8 indices.
        self.pool = MaxPool2d(2, 2, return_indices=True, ceil_mode=True, compact=True)
        self.unpool = MaxUnpool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices: List[torch.Tensor] = []
        sizes = []
        for stage in self.encoder:
            x = stage(x)
            sizes.append(x.shape[2:])
            x, idx = self.pool(x)
            indices.append(idx)
        for stage in self.decoder:
            x = self.unpool(x, indices.pop(), output_size=sizes.pop())
            x = stage(x)
        return self.classifier(x)

    def encoder_sequential(self) -> nn.Sequential:
        """The encoder as one VGG-style nn.Sequential (conv, BN, ReLU, ..., MaxPool2d after each
        stage), sharing this model's modules: what segkernels.pruning.prune_sequential takes."""
        layers: List[nn.Module] = []
        for stage in self.encoder:
            for block in stage:
                layers += list(block)
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        return nn.Sequential(*layers)

    def prunable_convs(self) -> List[int]:
        """Indices among the encoder's convs whose input channels may be pruned: every conv but the
        first of each stage, since a stage's last conv also feeds the decoder's unpooling."""
        prunable, index = [], 0
        for stage in self.encoder:
            prunable += list(range(index + 1, index + len(stage)))
            index += len(stage)
        return prunable

    def load_encoder(self, pruned: nn.Sequential) -> None:
        """Puts a pruned encoder_sequential()'s convs and BatchNorms back into the encoder, in order."""
        convs = [m for m in pruned if isinstance(m, nn.Conv2d)]
        bns = [m for m in pruned if isinstance(m, nn.BatchNorm2d)]
        blocks = [block for stage in self.encoder for block in stage]
        if len(convs) != len(blocks) or len(bns) != len(blocks):
            raise ArgumentValueError(f"pruned must hold the encoder's {len(blocks)} convs and BatchNorms, got "
                                     f"{len(convs)} and {len(bns)}")
        for block, conv, bn in zip(blocks, convs, bns):
            block[0], block[1] = conv, bn
