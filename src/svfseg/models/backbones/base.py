"""Backbone base class: named stages layer0..layer4 with known channels and strides."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

STAGE_NAMES: tuple[str, ...] = ("layer0", "layer1", "layer2", "layer3", "layer4")


def _exists(root: nn.Module, name: str) -> bool:
    try:
        return not isinstance(root.get_submodule(name), nn.Identity)
    except AttributeError:
        return False


class Backbone(nn.Module):
    """A feature extractor made of five sequential stages, ``layer0`` .. ``layer4``.

    Each stage is a submodule attribute of that name, so a qualified module name such as
    ``layer2.0.conv1`` addresses the same layer in every backbone family. Subclasses build the
    stages, then call :meth:`_set_stage_info` with the channels and strides they read from
    their own modules.

    Checkpoint files keep their original key names (torchvision, PSPNet, TF-ported). A
    subclass translates between the two namings with :meth:`checkpoint_key` and declares the
    file keys it deliberately drops (classifier heads) in ``ignored_checkpoint_keys``.
    """

    stage_names: tuple[str, ...] = STAGE_NAMES
    #: Regexes (full match) of keys in the original weight files that this model does not use.
    ignored_checkpoint_keys: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.stage_channels: dict[str, int] = {}
        self.stage_strides: dict[str, int] = {}

    def _set_stage_info(self, channels: Mapping[str, int], strides: Mapping[str, int]) -> None:
        missing = [s for s in self.stage_names if s not in channels or s not in strides]
        if missing:
            raise ValueError(f"{type(self).__name__}: no channel/stride given for stages {missing}")
        self.stage_channels = {s: int(channels[s]) for s in self.stage_names}
        self.stage_strides = {s: int(strides[s]) for s in self.stage_names}

    def get_stage(self, name: str) -> nn.Module:
        """Return the stage module called ``name`` (one of :attr:`stage_names`)."""
        self._check_stage(name)
        return getattr(self, name)

    def _check_stage(self, name: str) -> int:
        if name not in self.stage_names:
            raise ValueError(
                f"{type(self).__name__} has no stage {name!r}; stages are {list(self.stage_names)}"
            )
        return self.stage_names.index(name)

    def forward_stages(
        self,
        x: torch.Tensor,
        stages: str | Iterable[str] = ("layer2", "layer3", "layer4"),
        *,
        start: str = "layer0",
    ) -> dict[str, torch.Tensor]:
        """Run the stages in order and return the outputs of the requested ones.

        Computation stops after the deepest requested stage.

        Args:
            x: Input of stage ``start`` (an image batch (B, 3, H, W) for ``layer0``).
            stages: Stage names whose outputs are returned (a single name is accepted).
            start: First stage to run; lets a head feed an intermediate (e.g. masked) feature
                into the remaining stages.

        Returns:
            Dict from each requested stage name to its output, in the requested order.
        """
        wanted = [stages] if isinstance(stages, str) else list(stages)
        if not wanted:
            raise ValueError("forward_stages: `stages` is empty; name at least one stage")
        first = self._check_stage(start)
        last = max(self._check_stage(s) for s in wanted)
        if last < first:
            raise ValueError(f"forward_stages: stages {wanted} all come before start={start!r}")
        early = [s for s in wanted if self.stage_names.index(s) < first]
        if early:
            raise ValueError(f"forward_stages: stages {early} come before start={start!r}")
        outputs: dict[str, torch.Tensor] = {}
        for name in self.stage_names[first : last + 1]:
            x = getattr(self, name)(x)
            outputs[name] = x
        return {s: outputs[s] for s in wanted}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the output of the last stage."""
        return self.forward_stages(x, (self.stage_names[-1],))[self.stage_names[-1]]

    # -- conv -> BN pairs ---------------------------------------------------------------------
    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        """(conv name, BN name) for every conv whose output feeds only the BatchNorm after it.

        Declared, not discovered: module order does not say where a tensor flows (a block
        registers its shortcut after its last BN), and tracing the graph would tie the
        backbones to what torch.fx can follow. Each block type lists its own pairs in a
        ``conv_bn_pairs_local`` class attribute (names relative to the block); a test checks the declarations against the forward.
        SVF folds the frozen BNs of decomposed convs (``SVFConfig.fold_bn``), and inference
        exports fold the rest (``svfseg.svf.fold_conv_bn``).
        """
        pairs = []
        for prefix, module in self.named_modules():
            for conv, bn in getattr(type(module), "conv_bn_pairs_local", ()):
                conv_q, bn_q = (f"{prefix}.{n}" if prefix else n for n in (conv, bn))
                if _exists(self, conv_q) and _exists(self, bn_q):
                    pairs.append((conv_q, bn_q))
        return pairs

    # -- checkpoint naming -------------------------------------------------------------------
    def checkpoint_key(self, key: str) -> str:
        """Map one of this model's state-dict keys to its name in the original weight file."""
        return key

    def is_ignored_checkpoint_key(self, file_key: str) -> bool:
        """Whether a key of an original weight file is deliberately unused (e.g. ``fc.weight``)."""
        return any(re.fullmatch(p, file_key) for p in self.ignored_checkpoint_keys)

    def extra_repr(self) -> str:
        chans = ", ".join(
            f"{s}={self.stage_channels.get(s)}/{self.stage_strides.get(s)}" for s in self.stage_names
        )
        return f"stages (channels/stride): {chans}" if self.stage_channels else ""
