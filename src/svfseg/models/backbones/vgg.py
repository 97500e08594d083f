"""VGG16-BN split into layer0..layer4 the way PFENet/BAM split it."""

from __future__ import annotations

import re

from torch import nn

from .base import Backbone

# torchvision's VGG16 configuration "D": conv widths, "M" = 2x2 max pool.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# PFENet's get_vgg16_layer: ranges of `features` indices per stage. The final max pool
# (index 43) is dropped, so layer3 and layer4 both have stride 16.
_STAGE_RANGES = ((0, 7), (7, 14), (14, 24), (24, 34), (34, 43))


def _vgg_features(cfg=_VGG16) -> list[nn.Module]:
    layers: list[nn.Module] = []
    cin = 3
    for v in cfg:
        if v == "M":
            # ceil_mode as in PFENet: a 473 input gives 60x60 at stride 8, like the ResNets.
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    return layers


class VGG16BN(Backbone):
    """VGG16 with BatchNorm, stages as in PFENet (strides 2/4/8/16/16, channels 64..512).

    State-dict keys are ``layer{k}.{j}.*``; :meth:`checkpoint_key` maps them to the
    torchvision file's ``features.{n}.*``, so ``vgg16_bn-*.pth`` loads strictly through
    :func:`~svfseg.models.backbones.load_backbone_weights` (its ``classifier`` is ignored).
    """

    ignored_checkpoint_keys = (r"classifier\.\d+\.(weight|bias)",)

    def __init__(self) -> None:
        super().__init__()
        features = _vgg_features()
        channels, strides, stride = {}, {}, 1
        for name, (lo, hi) in zip(self.stage_names, _STAGE_RANGES):
            stage = nn.Sequential(*features[lo:hi])
            setattr(self, name, stage)
            stride *= 2 ** sum(isinstance(m, nn.MaxPool2d) for m in stage)
            strides[name] = stride
            channels[name] = [m for m in stage if isinstance(m, nn.BatchNorm2d)][-1].num_features
        self._set_stage_info(channels, strides)
        self._offsets = {name: lo for name, (lo, _) in zip(self.stage_names, _STAGE_RANGES)}
        self._init_weights()

    def conv_bn_pairs(self) -> list[tuple[str, str]]:  # noqa: D102 - see Backbone
        pairs = []
        for name in self.stage_names:
            stage = getattr(self, name)
            for j in range(len(stage) - 1):
                if isinstance(stage[j], nn.Conv2d) and isinstance(stage[j + 1], nn.modules.batchnorm._BatchNorm):
                    pairs.append((f"{name}.{j}", f"{name}.{j + 1}"))
        return pairs

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def checkpoint_key(self, key: str) -> str:
        match = re.fullmatch(r"(layer\d)\.(\d+)\.(.+)", key)
        if match is None:
            return key
        stage, index, rest = match.groups()
        return f"features.{self._offsets[stage] + int(index)}.{rest}"


def vgg16_bn() -> VGG16BN:
    """Build the VGG16-BN backbone (random init)."""
    return VGG16BN()
