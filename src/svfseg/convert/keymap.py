"""Renaming state dicts between an upstream model's names and svfseg's: rules, copies, aliases, both directions."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from svfseg.engine.checkpoint import CheckpointMismatch

#: (regex on an svfseg key, full match; the upstream key as a ``re.Match.expand`` template).
Rule = tuple[str, str]

#: PFENet's and BAM's backbones are the ResNet stages (the deep stem as one Sequential, model/PFENet.py
#: and model/PSPNet.py: conv1, bn1, relu1, conv2, bn2, relu2, conv3, bn3, relu3, maxpool) or VGG's
#: `features` cut into layer0..layer4 (get_vgg16_layer), which svfseg's VGG16BN names alike.
BACKBONE_RULES: tuple[Rule, ...] = (
    (r"backbone\.layer0\.conv1\.(.+)", r"layer0.0.\1"),
    (r"backbone\.layer0\.bn1\.(.+)", r"layer0.1.\1"),
    (r"backbone\.layer0\.conv2\.(.+)", r"layer0.3.\1"),
    (r"backbone\.layer0\.bn2\.(.+)", r"layer0.4.\1"),
    (r"backbone\.layer0\.conv3\.(.+)", r"layer0.6.\1"),
    (r"backbone\.layer0\.bn3\.(.+)", r"layer0.7.\1"),
    (r"backbone\.(layer[0-4]\..+)", r"\1"),
)

#: BatchNorm step counters: absent from files saved before torch 0.4.1 and never read in eval mode,
#: so a file without them converts (the model's own zero is kept).
OPTIONAL_SUFFIX = ".num_batches_tracked"


#: Keys named per category in a mismatch message.
SHOWN = 8


class KeyMapError(ValueError):
    """An svfseg state dict cannot be written in upstream names (two copies of one upstream tensor differ)."""


@dataclass(frozen=True)
class KeyMap:
    """How one upstream format names the tensors of one svfseg model.

    Attributes:
        format: The ``svfseg convert --from`` name (``pfenet``, ``bam``, ``bam_base``).
        model: The svfseg model it becomes (``model.name``).
        source: Upstream repository and file whose module tree gives the names.
        rules: svfseg key -> upstream key; the first rule that matches the whole key applies, a key
            no rule matches keeps its name.
        copies: svfseg keys holding a copy of another svfseg key's tensor, as rules to that key (BAM:
            upstream's base and meta learners share one backbone, svfseg keeps two).
        aliases: upstream keys that name a tensor a second time, as rules from the first name
            (BAM's PSPNet registers its stages both as ``layerN`` and inside ``encoder``).
    """

    format: str
    model: str
    source: str
    rules: tuple[Rule, ...]
    copies: tuple[Rule, ...] = ()
    aliases: tuple[Rule, ...] = ()

    def upstream_key(self, key: str) -> str:
        """The upstream name of the svfseg key ``key``."""
        key = _apply(self.copies, key) or key
        return _apply(self.rules, key) or key

    def alias_of(self, upstream_key: str) -> str | None:
        """The second upstream name of ``upstream_key`` (None when it has none)."""
        return _apply(self.aliases, upstream_key)

    def plan(self, svfseg_keys) -> dict[str, str]:
        """svfseg key -> upstream key for every key of the model."""
        return {k: self.upstream_key(k) for k in svfseg_keys}

    def to_upstream(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An svfseg (plain-architecture) state dict under upstream's names, aliases included.

        Raises:
            KeyMapError: two svfseg keys that upstream holds as one tensor differ.
        """
        out: dict[str, torch.Tensor] = {}
        first: dict[str, str] = {}
        for key, value in state.items():
            up = self.upstream_key(key)
            if up in out:
                if not torch.equal(out[up], value):
                    raise KeyMapError(f"{key} and {first[up]} differ, but upstream {self.format} holds both as "
                                      f"the one tensor {up}; only a model whose copies are equal converts back")
                continue
            out[up], first[up] = value, key
        for up in list(out):
            alias = self.alias_of(up)
            if alias is not None:
                out[alias] = out[up]
        return out

    def to_svfseg(self, state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                  where: str) -> dict[str, torch.Tensor]:
        """An upstream state dict under svfseg's names, checked against the model's own ``target``.

        Every target key must find its upstream tensor with the same shape, every upstream tensor must
        be used (an alias must equal the tensor it repeats); floating tensors take the target's dtype.

        Raises:
            CheckpointMismatch: one line naming the file (``where``) and listing the missing,
                unexpected and mis-shaped upstream keys.
        """
        out: dict[str, torch.Tensor] = {}
        used: set[str] = set()
        missing, shape, kind = [], [], []
        for key, up in self.plan(target).items():
            want = target[key]
            if up not in state:
                if key.endswith(OPTIONAL_SUFFIX):
                    out[key] = want.clone()
                else:
                    missing.append(up)
                continue
            used.add(up)
            value = state[up]
            if tuple(value.shape) != tuple(want.shape):
                shape.append(f"{up} {tuple(value.shape)}, expected {tuple(want.shape)}")
            elif value.is_floating_point() != want.is_floating_point():
                kind.append(f"{up} {value.dtype}, expected {want.dtype}")
            else:
                out[key] = value.to(want.dtype)
        differ = []
        for up in sorted(used):
            alias = self.alias_of(up)
            if alias is not None and alias in state:
                used.add(alias)
                if not torch.equal(state[alias], state[up]):
                    differ.append(f"{alias} != {up}")
        unexpected = [k for k in state if k not in used]
        problems = [_listing(n, keys) for n, keys in (
            ("missing", list(dict.fromkeys(missing))), ("unexpected", unexpected), ("of another shape", shape),
            ("of another kind", kind), ("repeated with another value", differ)) if keys]
        if problems:
            raise CheckpointMismatch(f"{where}: expected the {self.format} state dict of {self.source}, found "
                                     f"{'; '.join(problems)}")
        return out


def _listing(what: str, keys: list[str]) -> str:
    more = f", ... ({len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return f"{len(keys)} {what} [{', '.join(keys[:SHOWN])}{more}]"


def _apply(rules: tuple[Rule, ...], key: str) -> str | None:
    for pattern, template in rules:
        match = re.fullmatch(pattern, key)
        if match is not None:
            return match.expand(template)
    return None
