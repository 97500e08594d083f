"""SVFConfig: which layers to decompose, how they run, what else stays trainable."""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import torch

ModuleSelector = Union[str, Sequence[str], None]

MODES = ("auto", "reparam", "factorized", "tune")
#: The factors of W = U diag(S) Vh that may train (V stands for Vh).
FACTORS = ("U", "S", "V")
_SVD_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _check_selector(name: str, value: ModuleSelector) -> ModuleSelector:
    """Validates a module selector: None, a regex string, or a list of name strings."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"SVFConfig.{name}: {value!r} is not a valid regex ({err})") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        for item in items:
            if not isinstance(item, str) or not item:
                raise TypeError(
                    f"SVFConfig.{name}: expected non-empty module-name strings, found {item!r}"
                )
        return tuple(items)
    raise TypeError(
        f"SVFConfig.{name}: expected None, a regex string or a list of module names, "
        f"found {type(value).__name__}"
    )


def selector_matches(selector: ModuleSelector, name: str, descendants: bool = True) -> bool:
    """Tells whether a qualified module name is selected.

    A string selector is a regex that must match the whole name. A list entry selects the
    module whose qualified name equals it or ends with ``"." + entry``, and every module
    inside such a module (so ``["layer2"]`` selects ``layer2.0.conv1``).

    Args:
        selector: None (matches nothing), a regex string, or a sequence of names.
        name: qualified module name, e.g. ``"layer2.0.conv1"``.
        descendants: for list selectors, also match modules inside a listed module.

    Returns:
        True when the selector picks the module.
    """
    if selector is None:
        return False
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))] if descendants else [name]
    return any(p == item or p.endswith("." + item) for p in prefixes for item in selector)


@dataclass
class SVFConfig:
    """How `apply_svf` decomposes a model.

    Attributes:
        target_modules: regex (full match on the qualified module name) or list of module
            names/suffixes (a listed container selects everything inside it). None selects
            every supported layer (nn.Conv1d/2d/3d, nn.Linear).
        exclude_modules: same syntax; matching layers are never decomposed.
        trainable_modules: same syntax; parameters of these modules stay trainable after
            `apply_svf` (PEFT's ``modules_to_save`` idea). Every other parameter is frozen.
        skip_1x1: do not decompose convolutions whose kernel is all ones (Linear unaffected).
        skip_3x3: do not decompose convolutions whose kernel is all threes.
        mode: "reparam" (rebuild W = U diag(S) Vh, then one conv), "factorized" (V-conv,
            scale by S, 1x1 U-conv) or "auto" (per layer geometry and input, the form measured
            fastest for a training step, kept in the layers' forms plan: timed on the first
            training call, or by `plan_forms`, or read from a saved plan; the cost model only
            where nothing was measured and no timing is allowed). "tune" is auto's older name.
        train_bias: biases of decomposed layers train too.
        svd_dtype: dtype the SVD is computed in (float64 or float32); factors are cast back
            to the weight's dtype.
        fold_bn: (conv name, BatchNorm name) pairs whose frozen BatchNorm is folded into the
            SVD layer (exact: same outputs, same gradients for S; the BN op and its saved
            input disappear). The model declares them (e.g. ``backbone.conv_bn_pairs()``);
            pairs whose conv is not decomposed are left alone. None folds nothing.
        train_factors: which factors train, a non-empty subset of ("U", "S", "V"); ("S",) is
            SVF. Trained U / Vh become parameters (same state-dict keys), the layer then runs
            the rebuilt-weight form (gradients reach U and Vh through the rebuild), merges
            exactly, and `save_svf` writes them too.
        rank_multiple: 1 keeps every singular value (exact). N > 1 floors each layer's rank to a
            multiple of N (the SVF authors' svf.py uses 4): a layer whose rank is not a multiple
            loses its smallest singular values and changes its output.
    """

    target_modules: ModuleSelector = field(default=None, metadata={"help": "layers to decompose"})
    exclude_modules: ModuleSelector = field(default=None, metadata={"help": "layers to leave"})
    trainable_modules: ModuleSelector = field(
        default=None, metadata={"help": "modules whose parameters keep training"}
    )
    skip_1x1: bool = field(default=False, metadata={"help": "leave 1x1 convs alone"})
    skip_3x3: bool = field(default=False, metadata={"help": "leave 3x3 convs alone"})
    mode: str = field(default="auto", metadata={"help": "auto (measured) | reparam | factorized"})
    train_bias: bool = field(default=False, metadata={"help": "biases of SVD layers train"})
    svd_dtype: torch.dtype = field(
        default=torch.float64, metadata={"help": "dtype of the SVD computation"}
    )
    fold_bn: Sequence[Sequence[str]] | None = field(
        default=None, metadata={"help": "(conv, batchnorm) name pairs to fold"}
    )
    train_factors: Sequence[str] = field(default=("S",), metadata={"help": "factors that train: U, S, V"})
    rank_multiple: int = field(default=1, metadata={"help": "floor ranks to a multiple of this (1: exact)"})

    def __post_init__(self) -> None:
        self.target_modules = _check_selector("target_modules", self.target_modules)
        self.exclude_modules = _check_selector("exclude_modules", self.exclude_modules)
        self.trainable_modules = _check_selector("trainable_modules", self.trainable_modules)
        for flag in ("skip_1x1", "skip_3x3", "train_bias"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"SVFConfig.{flag}: expected a bool, found {getattr(self, flag)!r}")
        if self.mode not in MODES:
            raise ValueError(f"SVFConfig.mode: expected one of {MODES}, found {self.mode!r}")
        factors = (self.train_factors,) if isinstance(self.train_factors, str) else tuple(self.train_factors)
        if not factors or any(f not in FACTORS for f in factors) or len(set(factors)) != len(factors):
            raise ValueError(f"SVFConfig.train_factors: expected a non-empty subset of {FACTORS}, found {factors!r}")
        self.train_factors = tuple(f for f in FACTORS if f in factors)
        if isinstance(self.rank_multiple, bool) or not isinstance(self.rank_multiple, int) or self.rank_multiple < 1:
            raise ValueError(f"SVFConfig.rank_multiple: expected an int >= 1, found {self.rank_multiple!r}")
        if self.fold_bn is not None:
            pairs = []
            for pair in self.fold_bn:
                if isinstance(pair, str) or len(pair) != 2 or not all(isinstance(n, str) and n for n in pair):
                    raise ValueError(f"SVFConfig.fold_bn: expected (conv name, batchnorm name) pairs, found {pair!r}")
                pairs.append((pair[0], pair[1]))
            self.fold_bn = tuple(pairs)
        if isinstance(self.svd_dtype, str):
            key = self.svd_dtype.removeprefix("torch.")
            if key not in _SVD_DTYPES:
                raise ValueError(
                    f"SVFConfig.svd_dtype: expected one of {sorted(_SVD_DTYPES)}, "
                    f"found {self.svd_dtype!r}"
                )
            self.svd_dtype = _SVD_DTYPES[key]
        if self.svd_dtype not in _SVD_DTYPES.values():
            raise ValueError(
                f"SVFConfig.svd_dtype: expected torch.float32 or torch.float64, "
                f"found {self.svd_dtype!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict (dtype as its name, selectors as lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.dtype):
                value = str(value).removeprefix("torch.")
            elif isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[f.name] = value
        return out

    def to_json(self) -> str:
        """Returns the config as a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SVFConfig":
        """Builds a config from a dict; an unknown key is an error naming the closest one.

        Args:
            data: mapping of field names to values (as written by `to_dict`).

        Returns:
            The validated config.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise KeyError(f"SVFConfig: unknown key {key!r}{hint} (valid: {names})")
        return cls(**data)
