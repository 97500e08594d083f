"""Backbones with named stages layer0..layer4: ResNet-50/101, VGG16-BN, EfficientNet-Lite0."""

from .base import STAGE_NAMES, Backbone
from .batchnorm import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    freeze_batchnorm,
    is_frozen_batchnorm,
)
from .efficientnet import EfficientNetLite, efficientnet_lite0, package_weights_path
from .registry import backbone_stages, create_backbone, list_backbones, register_backbone
from .resnet import Bottleneck, ResNet, resnet
from .vgg import VGG16BN, vgg16_bn
from .weights import (
    LoadReport,
    WeightsMismatchError,
    checkpoint_state_dict,
    load_backbone_weights,
    read_state_dict,
)

__all__ = [
    "STAGE_NAMES",
    "Backbone",
    "backbone_stages",
    "Bottleneck",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "LoadReport",
    "ResNet",
    "WeightsMismatchError",
    "checkpoint_state_dict",
    "create_backbone",
    "freeze_batchnorm",
    "is_frozen_batchnorm",
    "list_backbones",
    "load_backbone_weights",
    "read_state_dict",
    "register_backbone",
    "resnet",
    "VGG16BN",
    "EfficientNetLite",
    "efficientnet_lite0",
    "package_weights_path",
    "vgg16_bn",
]
