"""Upstream state-dict manifests (key, shape, dtype) and the stand-in checkpoints made from them.

A manifest is written once from the upstream model definitions, outside svfseg (its ``header`` holds
the command and script that made it); the tests and the timing benchmark build a checkpoint of the
right names, shapes and dtypes from it, so no upstream code or published file is needed to check the
conversion.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from typing import Optional

import torch

from svfseg.convert.keymap import KeyMap


@dataclass(frozen=True)
class Manifest:
    """An upstream model's state dict without its values.

    Attributes:
        header: Where it came from (upstream repository and commit, constructor call, command, script).
        keys: ``(name, shape, dtype)`` in the upstream state dict's order.
    """

    header: dict
    keys: tuple[tuple[str, tuple[int, ...], str], ...]

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Read a manifest JSON (``{"header": {...}, "keys": [[name, shape, dtype], ...]}``).

        Raises:
            ValueError: the file is not such a manifest (one line naming it).
        """
        path = Path(path)
        try:
            blob = json.loads(path.read_text())
            keys = tuple((str(k), tuple(int(n) for n in shape), str(dtype)) for k, shape, dtype in blob["keys"])
            header = dict(blob["header"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: expected a state-dict manifest (header, keys [[name, shape, dtype]]), "
                             f"could not read it ({e})") from None
        return cls(header, keys)

    def fake_state(self, seed: int = 0, keymap: Optional[KeyMap] = None) -> dict[str, torch.Tensor]:
        """A state dict with every key, shape and dtype of the manifest and seeded random values.

        With ``keymap``, a key that repeats another (an alias) holds that key's tensor, as in a real
        upstream file (the same module saved under two names).
        """
        gen = torch.Generator().manual_seed(seed)
        out: dict[str, torch.Tensor] = {}
        aliases = {keymap.alias_of(name): name for name, _, _ in self.keys} if keymap is not None else {}
        for name, shape, dtype in self.keys:
            if aliases.get(name) in out:
                out[name] = out[aliases[name]]
                continue
            kind = getattr(torch, dtype)
            if kind.is_floating_point:
                out[name] = torch.randn(shape, generator=gen, dtype=kind)
            else:
                out[name] = torch.randint(0, 1000, shape, generator=gen, dtype=kind)
        return out
