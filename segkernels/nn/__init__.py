"""Modules over the segkernels ops: drop-ins for their torch.nn namesakes, the losses, and the
networks built from them."""

from .blocks import FRRU, BilinearUpsample, ChainedResidualPooling
from .instancefcn import InstanceFCNHead
from .label_structure import LabelAutoencoder, LabelStructureLoss, LabelStructureOutput, OneHotConv2d
from .losses import ChannelWiseKDLoss, CrossEntropyLoss, KDLoss, SelfRegulationLoss
from .pooling import MaxPool2d, MaxPool3d, MaxUnpool2d, MaxUnpool3d
from .segnet import SegNet

__all__ = [
    "MaxPool2d",
    "MaxPool3d",
    "MaxUnpool2d",
    "MaxUnpool3d",
    "SegNet",
    "CrossEntropyLoss",
    "KDLoss",
    "ChannelWiseKDLoss",
    "SelfRegulationLoss",
    "InstanceFCNHead",
    "ChainedResidualPooling",
    "FRRU",
    "BilinearUpsample",
    "OneHotConv2d",
    "LabelAutoencoder",
    "LabelStructureLoss",
    "LabelStructureOutput",
]
