"""Modules over label maps: OneHotConv2d, a convolution whose input is a label map, and (on it)
the label-structure autoencoder of Mostajabi, Maire and Shakhnarovich (CVPR 2018)."""

from __future__ import annotations

import math
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import ArgumentValueError, check_choice, check_int, check_real
from ..ops.one_hot_conv2d import one_hot_conv2d

__all__ = ["OneHotConv2d", "LabelAutoencoder", "LabelStructureLoss", "LabelStructureOutput"]


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class OneHotConv2d(nn.Module):
    """nn.Conv2d(num_classes, out_channels, ...) applied to the one-hot map of a label map,
    without forming it (segkernels.one_hot_conv2d).

    Its parameters, initialisation and state_dict are those of the nn.Conv2d (weight
    (out_channels, num_classes, kh, kw), bias (out_channels,)), so trained weights load both
    ways. Input: labels (N, H, W), any integer dtype; pixels equal to ignore_index are all-zero
    in the one-hot map. Output (N, out_channels, Ho, Wo).
    """

    def __init__(self, num_classes: int, out_channels: int, kernel_size: Union[int, Tuple[int, int]],
                 stride: Union[int, Tuple[int, int]] = 1, padding: Union[int, Tuple[int, int], str] = 0,
                 dilation: Union[int, Tuple[int, int]] = 1, bias: bool = True, ignore_index: int = 255,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes", 1)
        self.out_channels = check_int(out_channels, "out_channels", 1)
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.ignore_index = ignore_index
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_channels, num_classes, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's initialisation (kaiming_uniform_ with a = sqrt(5), bias U(-1/sqrt(fan_in), ..)).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return one_hot_conv2d(labels, self.weight, self.bias, self.stride, self.padding, self.dilation,
                              ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        s = (f"{self.num_classes}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        return s + f", ignore_index={self.ignore_index}"


def _conv_bn_relu(conv: nn.Module, channels: int) -> List[nn.Module]:
    return [conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


class LabelAutoencoder(nn.Module):
    """An autoencoder of label maps (Mostajabi et al., stage 1): it learns the structure of
    ground-truth segmentations, and its frozen halves then regularise a segmentation network
    (LabelStructureLoss).

    Encoder: OneHotConv2d(num_classes, width, 4, stride 2, padding 1) (the one-hot map is never
    formed), then levels - 1 more 4 x 4 stride-2 convolutions doubling the channels, each with
    BatchNorm and ReLU, and a 1 x 1 convolution to code_channels: a code at 1 / 2**levels of the
    label resolution. Decoder: the mirror image (1 x 1, then 4 x 4 stride-2 transposed
    convolutions) back to num_classes logits at the label resolution.

    Args:
        num_classes: C.
        code_channels: channels of the code.
        width: channels after the first convolution.
        levels: stride-2 stages (the code is 2**levels times smaller per side).
        ignore_index: label of pixels in no class (all-zero one-hot, not counted in the loss).
    """

    def __init__(self, num_classes: int, code_channels: int = 32, width: int = 32, levels: int = 3,
                 ignore_index: int = 255) -> None:
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes", 1)
        self.code_channels = check_int(code_channels, "code_channels", 1)
        self.levels = check_int(levels, "levels", 1)
        width = check_int(width, "width", 1)
        self.ignore_index = ignore_index
        chans = [width * 2**i for i in range(self.levels)]
        enc: List[nn.Module] = _conv_bn_relu(OneHotConv2d(num_classes, chans[0], 4, 2, 1, bias=False,
                                                          ignore_index=ignore_index), chans[0])
        for a, b in zip(chans, chans[1:]):
            enc += _conv_bn_relu(nn.Conv2d(a, b, 4, 2, 1, bias=False), b)
        enc.append(nn.Conv2d(chans[-1], code_channels, 1))
        self.encoder = nn.Sequential(*enc)
        self.decoder_input = nn.Sequential(*_conv_bn_relu(nn.Conv2d(code_channels, chans[-1], 1, bias=False),
                                                          chans[-1]))
        self.decoder = nn.ModuleList()
        for a, b in zip(reversed(chans), list(reversed(chans))[1:]):
            self.decoder.append(nn.Sequential(*_conv_bn_relu(nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), b)))
        self.classifier = nn.ConvTranspose2d(chans[0], num_classes, 4, 2, 1)

    def code_size(self, size: Sequence[int]) -> Tuple[int, int]:
        """The code's (h, w) for labels of size (H, W)."""
        h, w = size
        for _ in range(self.levels):
            h, w = h // 2, w // 2
        return h, w

    def encode(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (N, H, W), H and W >= 2**levels -> code (N, code_channels, *code_size((H, W)))."""
        if labels.dim() != 3 or min(labels.shape[1:]) < 2**self.levels:
            raise ArgumentValueError(f"labels must be (N, H, W) with H, W >= {2**self.levels}, got {tuple(labels.shape)}")
        return self.encoder(labels)

    def decode(self, code: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """code (N, code_channels, h, w) -> class logits (N, num_classes, *size); size is the label
        map's (H, W), whose code has shape code_size(size)."""
        size = (int(size[0]), int(size[1]))
        if code.dim() != 4 or code.shape[1] != self.code_channels or tuple(code.shape[2:]) != self.code_size(size):
            raise ArgumentValueError(f"code must be (N, {self.code_channels}, *{self.code_size(size)}) for labels of "
                                     f"size {size}, got {tuple(code.shape)}")
        sizes = [size]  # the resolution after each stride-2 stage, to undo floor division exactly
        for _ in range(self.levels - 1):
            sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
        x = self.decoder_input(code)
        for stage, out_size in zip(self.decoder, reversed(sizes[1:])):
            x = stage[1:](stage[0](x, output_size=out_size))
        return self.classifier(x, output_size=size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(labels), labels.shape[1:])

    def reconstruction_loss(self, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the reconstruction against the labels (ignored pixels excluded)."""
        return F.cross_entropy(self(labels), labels.long(), ignore_index=self.ignore_index)

    def fit(self, label_batches: Iterable[torch.Tensor], epochs: int = 10, lr: float = 1e-3) -> List[float]:
        """Stage 1: trains on batches of ground-truth label maps (re-iterable, e.g. a list or a
        DataLoader of (N, H, W) tensors) with Adam; returns the mean loss of each epoch."""
        epochs = check_int(epochs, "epochs", 1)
        optimizer = torch.optim.Adam(self.parameters(), lr=check_real(lr, "lr", minimum=0.0))
        self.train()
        history = []
        for _ in range(epochs):
            total, count = 0.0, 0
            for labels in label_batches:
                loss = self.reconstruction_loss(labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, count = total + float(loss.detach()), count + 1
            history.append(total / max(count, 1))
        return history

    def freeze(self) -> "LabelAutoencoder":
        """Stage 2 uses the autoencoder frozen: evaluation mode, no parameter gradients."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self


class LabelStructureOutput(NamedTuple):
    total: torch.Tensor  # cross_entropy + weight * structure
    cross_entropy: torch.Tensor
    structure: torch.Tensor


class LabelStructureLoss(nn.Module):
    """Stage 2 of Mostajabi et al.: cross-entropy plus a label-structure term from a frozen
    LabelAutoencoder.

    The primary network gives class logits (N, C, H, W) and, from an auxiliary head, a
    prediction of the label code (N, code_channels, *autoencoder.code_size((H, W))).

    - mode="decoder" (the paper's better variant): the frozen decoder turns the code prediction
      into a segmentation; structure = the mean squared difference between the class
      probabilities of the primary output and of that decoded segmentation. Its gradient reaches
      both the logits and (through the frozen decoder) the auxiliary head.
    - mode="encoder": structure = the mean squared difference between the code prediction and the
      frozen encoder's code of the ground truth (a constant target).

    forward(logits, code_prediction, labels) returns LabelStructureOutput(total, cross_entropy,
    structure). ignore_index defaults to the autoencoder's; class_weight as F.cross_entropy's.
    """

    def __init__(self, autoencoder: LabelAutoencoder, mode: str = "decoder", weight: float = 1.0, *,
                 ignore_index: Optional[int] = None, class_weight: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        if not isinstance(autoencoder, LabelAutoencoder):
            raise ArgumentValueError(f"autoencoder must be a LabelAutoencoder, got {type(autoencoder).__name__}")
        self.autoencoder = autoencoder.freeze()
        self.mode = check_choice(mode, "mode", ("decoder", "encoder"))
        self.weight = check_real(weight, "weight", minimum=0.0)
        self.ignore_index = autoencoder.ignore_index if ignore_index is None else check_int(ignore_index, "ignore_index")
        self.register_buffer("class_weight", class_weight)

    def train(self, mode: bool = True) -> "LabelStructureLoss":
        super().train(mode)
        self.autoencoder.eval()  # frozen: its BatchNorm keeps its running statistics
        return self

    def forward(self, logits: torch.Tensor, code_prediction: torch.Tensor, labels: torch.Tensor) -> LabelStructureOutput:
        if logits.dim() != 4 or logits.shape[1] != self.autoencoder.num_classes:
            raise ArgumentValueError(f"logits must be (N, {self.autoencoder.num_classes}, H, W), got {tuple(logits.shape)}")
        if tuple(labels.shape) != (logits.shape[0], *logits.shape[2:]):
            raise ArgumentValueError(f"labels must be (N, H, W) = {(logits.shape[0], *logits.shape[2:])}, got "
                                     f"{tuple(labels.shape)}")
        ce = F.cross_entropy(logits, labels.long(), weight=self.class_weight, ignore_index=self.ignore_index)
        if self.mode == "decoder":
            decoded = self.autoencoder.decode(code_prediction, logits.shape[2:])
            structure = F.mse_loss(logits.softmax(1), decoded.softmax(1))
        else:
            with torch.no_grad():
                target = self.autoencoder.encode(labels)
            if code_prediction.shape != target.shape:
                raise ArgumentValueError(f"code_prediction must be {tuple(target.shape)} (the encoder's code of labels), "
                                         f"got {tuple(code_prediction.shape)}")
            structure = F.mse_loss(code_prediction, target)
        return LabelStructureOutput(ce + self.weight * structure, ce, structure)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, weight={self.weight}, ignore_index={self.ignore_index}"
