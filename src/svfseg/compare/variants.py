"""`svfseg compare --vary [REGIME:]KEY=V1|V2 ...`: compared rows that differ from a regime by overrides only.

A variant is a regime plus overrides (e.g. ``svf`` with ``svf.train=[U,S]``): it trains and is
scored exactly like a regime, under its own row label (``svf[svf.train=[U,S]]``). ``--vary
svf:svf.train=...`` varies the regime ``svf`` only; without ``REGIME:`` every regime that trains
part of the backbone, except the reference, is varied. Such a regime gets one row per
combination of its ``--vary`` values; the others stay as they are. A variant is an override,
never a new regime name.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Arm:
    """One compared row: its label, the ``model.regime`` it runs and its extra overrides."""

    label: str
    regime: str
    overrides: tuple[str, ...] = ()


def parse_vary(spec: str) -> tuple[str | None, str, list[str]]:
    """``"svf:svf.train=[S]|[U,S]"`` -> ``("svf", "svf.train", ["[S]", "[U,S]"])`` (regime None without ``svf:``).

    Raises:
        ValueError: not ``[REGIME:]KEY=V1|V2...`` with a dotted key and non-empty, distinct values.
    """
    head, sep, values = spec.partition("=")
    regime, colon, key = head.rpartition(":")
    items = [v.strip() for v in values.split("|")]
    if (not sep or not re.fullmatch(r"[A-Za-z_][\w.]*", key.strip()) or not all(items)
            or (colon and not regime.strip())):
        raise ValueError(f"--vary: expected [REGIME:]KEY=V1|V2|... (e.g. svf:svf.train=[S]|[U,S]), found {spec!r}")
    if len(set(items)) != len(items):
        raise ValueError(f"--vary {spec!r}: a value is listed twice")
    return (regime.strip() or None), key.strip(), items


def expand_arms(regimes: Sequence[str], reference: str, varies: Sequence[str],
                trains_backbone: Callable[[str], bool]) -> list[Arm]:
    """The rows of a compare: each regime, or, for a varied one, one row per value combination.

    Args:
        regimes: ``--regimes``, in order.
        reference: the regime every row is compared with (varied only when named: ``REGIME:``).
        varies: ``--vary`` specs; several for one regime multiply (every combination).
        trains_backbone: whether a regime trains part of the backbone (only those are varied).

    Returns:
        The arms in the order of ``regimes`` (a varied regime's arms in the order of the values).
    """
    axes = [parse_vary(v) for v in varies]
    for target, _, _ in axes:
        if target is not None and target not in regimes:
            raise ValueError(f"--vary {target}:...: {target!r} is not among --regimes {list(regimes)}")
    arms: list[Arm] = []
    for name in regimes:
        mine = [(k, vals) for target, k, vals in axes
                if (target == name) or (target is None and name != reference and trains_backbone(name))]
        keys = [k for k, _ in mine]
        if len(set(keys)) != len(keys):
            raise ValueError(f"--vary: key {keys} given twice for {name!r}; list its values in one --vary")
        if not mine:
            arms.append(Arm(name, name))
            continue
        for combo in itertools.product(*(vals for _, vals in mine)):
            pairs = [f"{k}={v}" for k, v in zip(keys, combo)]
            arms.append(Arm(f"{name}[{'; '.join(pairs)}]", name, tuple(pairs)))
    labels = [a.label for a in arms]
    folders = [folder_name(a.label) for a in arms]
    if len(set(labels)) != len(labels) or len(set(folders)) != len(folders):
        raise ValueError(f"compare: two rows would share a label or a run folder: {labels}")
    if axes and all(a.label == a.regime for a in arms):
        raise ValueError(f"--vary {list(varies)}: no regime to vary (without REGIME:, only regimes that train the "
                         f"backbone other than the reference {reference!r} are varied; found {list(regimes)})")
    return arms


def folder_name(label: str) -> str:
    """A file-system-safe form of a row label (``svf[svf.train=[U,S]]`` -> ``svf_svf.train=U-S``)."""
    if re.fullmatch(r"[\w.=-]+", label):
        return label
    regime, _, rest = label.partition("[")
    safe = re.sub(r"[^\w.=]+", "-", rest[:-1] if rest.endswith("]") else rest)
    return f"{regime}_" + re.sub(r"(?<==)-|-(?==)", "", safe).strip("-")
