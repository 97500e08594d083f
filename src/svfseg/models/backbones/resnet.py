"""ResNet-50/101 with the torchvision 7x7 stem or the PSPNet deep stem, optionally dilated."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .base import Backbone

#: Blocks per stage (layer1..layer4).
RESNET_DEPTHS: dict[int, tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

# (stride, dilation) of layer3 and layer4 for each output stride. As in PSPNet/PFENet/BAM,
# every block of a dilated stage (its first block included) uses the stage's dilation.
# DILATION_STYLES: "pspnet" (that), or "torchvision" (replace_stride_with_dilation: the first
# block of a dilated stage keeps the previous stage's dilation, as in the ResNet the SVF
# authors use for PFENet and the baseline, model/module/resnet.py).
DILATION_STYLES = ("pspnet", "torchvision")
_STAGE_SCHEDULE: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {
    8: ((1, 2), (1, 4)),
    16: ((2, 1), (1, 2)),
    32: ((2, 1), (2, 1)),
}


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 -> 3x3 (carries stride and dilation) -> 1x1, plus shortcut."""

    expansion = 4
    conv_bn_pairs_local = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("downsample.0", "downsample.1"))

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        width = planes
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(
            width, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


def _conv_bn_relu(index: str, cin: int, cout: int, kernel: int, stride: int) -> list:
    """Named (conv, bn, relu) triple: conv{index}/bn{index}/relu{index}.

    ``index`` "" gives torchvision's names conv1/bn1/relu.
    """
    return [
        (f"conv{index or 1}", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)),
        (f"bn{index or 1}", nn.BatchNorm2d(cout)),
        (f"relu{index}", nn.ReLU(inplace=True)),
    ]


def _make_stem(deep: bool) -> nn.Sequential:
    """Stage layer0: the stem convs and the max pool, output stride 4."""
    if deep:
        # PSPNet/PFENet/BAM "deep base": three 3x3 convs 3->64 (s2) ->64 ->128.
        layers = (
            _conv_bn_relu("1", 3, 64, 3, 2)
            + _conv_bn_relu("2", 64, 64, 3, 1)
            + _conv_bn_relu("3", 64, 128, 3, 1)
        )
    else:
        layers = _conv_bn_relu("", 3, 64, 7, 2)
    layers.append(("maxpool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)))
    return nn.Sequential(OrderedDict(layers))


class ResNet(Backbone):
    """ResNet backbone with stages ``layer0`` (stem + max pool) and ``layer1``..``layer4``.

    State-dict keys are the original ones with the stem moved under ``layer0.`` (e.g.
    ``layer0.conv1.weight``); :meth:`checkpoint_key` maps them back, so the original
    torchvision (``resnet50-*.pth``) and PSPNet (``resnet50_v2.pth``) files load strictly
    through :func:`~svfseg.models.backbones.load_backbone_weights`. Their ``fc`` is ignored.

    Args:
        depths: Blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
        deep_stem: Use the PSPNet 3x3-conv stem (64-64-128) instead of the 7x7 stem.
        output_stride: 8 (layer3 dilation 2, layer4 dilation 4), 16 (layer4 dilation 2) or 32.
        dilation_style: "pspnet" (every block of a dilated stage dilated) or "torchvision"
            (its first block keeps the previous stage's dilation: layer3.0 1 and layer4.0 2 at
            output stride 8). Same weights, other features.
    """

    ignored_checkpoint_keys = (r"fc\.(weight|bias)",)

    def conv_bn_pairs(self) -> list[tuple[str, str]]:  # noqa: D102 - see Backbone
        stem = [(f"layer0.conv{i}", f"layer0.bn{i}") for i in (1, 2, 3) if hasattr(self.layer0, f"conv{i}")]
        return stem + super().conv_bn_pairs()

    def __init__(self, depths: Sequence[int], *, deep_stem: bool = False, output_stride: int = 8,
                 dilation_style: str = "pspnet"):
        super().__init__()
        if dilation_style not in DILATION_STYLES:
            raise ValueError(f"ResNet dilation_style must be one of {DILATION_STYLES}, got {dilation_style!r}")
        self.dilation_style = dilation_style
        if output_stride not in _STAGE_SCHEDULE:
            raise ValueError(
                f"ResNet output_stride must be one of {sorted(_STAGE_SCHEDULE)}, got {output_stride!r}"
            )
        if len(depths) != 4 or any(int(d) < 1 for d in depths):
            raise ValueError(f"ResNet depths must be 4 positive block counts, got {depths!r}")
        self.deep_stem = deep_stem
        self.output_stride = output_stride
        self.layer0 = _make_stem(deep_stem)
        inplanes = 128 if deep_stem else 64
        (s3, d3), (s4, d4) = _STAGE_SCHEDULE[output_stride]
        plan = [(64, 1, 1), (128, 2, 1), (256, s3, d3), (512, s4, d4)]
        stride = 4
        strides = {"layer0": stride}
        channels = {"layer0": inplanes}
        previous = 1
        for i, ((planes, s, d), n) in enumerate(zip(plan, depths), start=1):
            blocks = [Bottleneck(inplanes, planes, s, d if dilation_style == "pspnet" else previous)]
            previous = d
            inplanes = planes * Bottleneck.expansion
            blocks += [Bottleneck(inplanes, planes, 1, d) for _ in range(int(n) - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            stride *= s
            strides[f"layer{i}"] = stride
            channels[f"layer{i}"] = blocks[-1].bn3.num_features
        self._set_stage_info(channels, strides)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def checkpoint_key(self, key: str) -> str:
        # The original files keep the stem at top level: conv1.weight, bn1.running_mean, ...
        if key.startswith("layer0."):
            return key[len("layer0.") :]
        return key


def resnet(depth: int, *, deep_stem: bool = False, output_stride: int = 8, dilation_style: str = "pspnet") -> ResNet:
    """Build a ResNet-50 or ResNet-101 backbone (random init).

    Args:
        depth: 50 or 101.
        deep_stem: PSPNet deep stem (what PFENet/BAM/SVF use) instead of the 7x7 stem.
        output_stride: 8, 16 or 32.
        dilation_style: "pspnet" or "torchvision" (see :class:`ResNet`).

    Returns:
        The :class:`ResNet` backbone.
    """
    if depth not in RESNET_DEPTHS:
        raise ValueError(f"ResNet depth must be one of {sorted(RESNET_DEPTHS)}, got {depth!r}")
    return ResNet(RESNET_DEPTHS[depth], deep_stem=deep_stem, output_stride=output_stride,
                  dilation_style=dilation_style)
