"""Experiment configuration: typed dataclass defaults <- YAML recipe <- command-line dotlist."""
from __future__ import annotations

import dataclasses
import difflib
import subprocess
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and where it came from."""


@dataclass
class DataConfig:
    """Where the benchmark lives and how episodes are made (see svfseg.data.build_dataset)."""

    benchmark: str = "pascal"          # pascal | coco | synthetic
    root: str = "data/pascal"          # prepared Pascal-layout root (`svfseg prepare ...`)
    protocol: str = "dagger"           # training pool: dagger (drop images with novel classes) | pfenet
    convention: str = "interleaved"    # COCO fold convention: interleaved | consecutive
    train_crop: int = 473
    train_scale: tuple[float, float] = (0.9, 1.1)
    test_size: int = 473               # longer side of the test image (473 Pascal, 641 COCO)
    workers: int = 4                   # DataLoader worker processes (0 = load in the main process)


@dataclass
class ModelConfig:
    """Which few-shot model to build (svfseg.models.create_model)."""

    name: str = "pfenet"               # baseline | pfenet | ...
    backbone: str = "resnet50_deep"
    weights: Optional[str] = None      # backbone weight file, or "imagenet" for efficientnet_lite0
    backbone_mode: str = "frozen"      # frozen | train (ignored when svf.enabled: then "svf")
    backbone_kwargs: dict = field(default_factory=dict)  # e.g. {output_stride: 8}
    base_checkpoint: Optional[str] = None  # BAM stage 2: the stage-1 best.pt ({fold}, {benchmark}, ... filled in)
    head: dict = field(default_factory=dict)  # extra keyword arguments for the head


@dataclass
class SVFSettings:
    """Experiment-level SVF settings: the ``svf:`` section of a config.

    Which backbone stages are decomposed and what trains. Not to be confused with
    :class:`svfseg.svf.SVFConfig`, the per-layer config (built from these via ``SVFPolicy``).
    """

    enabled: bool = True
    stages: list[str] = field(default_factory=lambda: ["layer2", "layer3", "layer4"])
    skip_1x1: bool = False
    skip_3x3: bool = False
    train_bn: bool = False             # also train BN affine params inside the stages (BN stays in eval mode)
    train_bias: bool = False           # also train the biases of the decomposed layers
    mode: str = "auto"                 # auto | reparam | factorized | tune
    fold_bn: bool | None = None        # fold frozen BN into the SVD layers (None: whenever train_bn is off)
    decay_to: str = "pretrained"       # weight decay pulls S towards: pretrained | zero (the authors' code)


@dataclass
class OptimConfig:
    """SGD + poly. Each parameter group runs at ``lr * lr_mult[group]``.

    PFENet/BAM's poly function gives the head 10x the base lr; the SVF authors train the
    singular values at 1/10 of the head's lr. Hence the defaults head=10, svf=1.
    """

    lr: float = 0.0025
    momentum: float = 0.9
    weight_decay: float = 1e-4
    power: float = 0.9
    warmup_steps: int = 0
    lr_mult: dict = field(default_factory=lambda: {"head": 10.0, "svf": 1.0, "backbone": 1.0})
    grad_clip: Optional[float] = None  # max global grad norm; None = no clipping


@dataclass
class TrainConfig:
    """The training loop.

    Checkpoint selection (``select_on``): ``test_fold`` validates on fixed episodes of the test
    fold's novel classes and keeps the best (what PFENet, BAM and the SVF code do; optimistic,
    since the test classes choose the checkpoint); ``base_heldout`` validates on val-split
    episodes of base classes (the novel classes of fold ``(fold + 1) % 4``, all base classes of
    this fold, on images never trained on), so the test fold is untouched until `svfseg test`;
    ``last`` keeps the final weights.
    """

    epochs: int = 200
    batch_size: int = 4                # global batch (split evenly over processes)
    steps_per_epoch: Optional[int] = None  # default: training pool size // batch_size
    amp: str = "auto"                  # auto (bf16 if supported else fp16, GPU only) | bf16 | fp16 | off
    aux_weight: float = 1.0
    val_every: int = 1                 # validate every N epochs (0 = never)
    val_episodes: int = 1000           # size of the fixed validation episode file
    val_seed: int = 0
    val_episodes_file: Optional[str] = None  # use this episode file instead of making one
    select_on: str = "test_fold"       # test_fold | base_heldout | last (which checkpoint is "best")
    checkpoint_every: int = 0          # also save last.pt every N steps (0 = at epoch ends only)
    log_every: int = 10                # steps between CSV/TensorBoard rows
    tensorboard: bool = True
    progress: bool = True
    stop_after_steps: Optional[int] = None  # behave as if interrupted (Ctrl-C) after N steps; for tests


@dataclass
class EvalConfig:
    """`svfseg test` defaults."""

    protocol: str = "hsnet"            # pfenet | bam | hsnet (episode count and seeds)
    episodes: Optional[str] = None     # fixed episode file (overrides protocol)
    num_episodes: Optional[int] = None  # override the protocol's count
    seeds: Optional[list[int]] = None  # override the protocol's seeds
    batch_size: int = 1
    save_vis: int = 0


@dataclass
class ExperimentConfig:
    """Everything one run needs. ``fold``/``shot`` at the top so `fold=1 shot=5` works."""

    name: Optional[str] = None         # run name (default derived from the config)
    output_dir: str = "runs"
    fold: int = 0
    shot: int = 1
    seed: int = 321
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    resume: bool = False               # continue the run in run_dir() from its last.pt
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    svf: SVFSettings = field(default_factory=SVFSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def run_name(self) -> str:
        """The run folder name: explicit ``name`` or one derived from the main choices."""
        if self.name:
            return self.name
        regime = "svf" if self.svf.enabled else self.model.backbone_mode
        return f"{self.data.benchmark}_{self.model.name}_{self.model.backbone}_{regime}_fold{self.fold}_{self.shot}shot"

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name()


_CHOICES = {
    "data.benchmark": ("pascal", "coco", "synthetic"),
    "data.protocol": ("dagger", "pfenet"),
    "data.convention": ("interleaved", "consecutive"),
    "model.backbone_mode": ("frozen", "train"),
    "svf.mode": ("auto", "reparam", "factorized", "tune"),
    "svf.decay_to": ("pretrained", "zero"),
    "train.amp": ("auto", "bf16", "fp16", "off"),
    "train.select_on": ("test_fold", "base_heldout", "last"),
    "eval.protocol": ("pfenet", "bam", "hsnet"),
}


# ---------------------------------------------------------------- conversion


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) for YAML/JSON/checkpoints."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(cfg)


def from_dict(data: dict, source: str = "<dict>") -> ExperimentConfig:
    """Build a validated config from a (partial) nested dict over the defaults."""
    cfg = ExperimentConfig()
    _merge(cfg, data, prefix="", source=source)
    validate(cfg)
    return cfg


def _merge(obj: Any, data: Any, prefix: str, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<top>'}' must be a mapping, found {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        if key not in names:
            raise ConfigError(_unknown_key_message(prefix + str(key), names, prefix, source))
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, prefix + key + ".", source)
        elif isinstance(current, dict) and isinstance(value, dict):
            # Mapping leaves (optim.lr_mult, model.head) are updated key by key, not replaced.
            setattr(obj, key, {**current, **value})
        else:
            setattr(obj, key, _coerce(value, hints[key], prefix + key, source))


def _unknown_key_message(full_key: str, names: Sequence[str], prefix: str, source: str) -> str:
    leaf = full_key[len(prefix):]
    close = difflib.get_close_matches(leaf, names, n=1, cutoff=0.5)
    if not close:  # maybe it belongs to another section: search every dotted key
        all_keys = _all_keys(ExperimentConfig())
        close_full = difflib.get_close_matches(full_key, all_keys, n=1, cutoff=0.5)
        hint = f"; did you mean '{close_full[0]}'?" if close_full else ""
    else:
        hint = f"; did you mean '{prefix}{close[0]}'?"
    return f"{source}: unknown config key '{full_key}'{hint} (valid keys here: {', '.join(prefix + n for n in names)})"


def _all_keys(obj: Any, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out += _all_keys(v, prefix + f.name + ".") if dataclasses.is_dataclass(v) else [prefix + f.name]
    return out


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; errors name the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"{source}: '{key}' expects {_type_name(tp)}, found {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise bad
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def validate(cfg: ExperimentConfig) -> None:
    """Cross-field checks; each error names the offending key."""
    flat = {k: _get(cfg, k) for k in _CHOICES}
    for k, allowed in _CHOICES.items():
        if flat[k] not in allowed:
            raise ConfigError(f"config key '{k}' must be one of {list(allowed)}, found {flat[k]!r}")
    if cfg.fold not in (0, 1, 2, 3):
        raise ConfigError(f"config key 'fold' must be 0..3, found {cfg.fold}")
    if cfg.shot < 1:
        raise ConfigError(f"config key 'shot' must be >= 1, found {cfg.shot}")
    positive = {"train.batch_size": cfg.train.batch_size, "train.epochs": cfg.train.epochs,
                "optim.lr": cfg.optim.lr, "data.train_crop": cfg.data.train_crop,
                "data.test_size": cfg.data.test_size, "train.log_every": cfg.train.log_every,
                "eval.batch_size": cfg.eval.batch_size}
    for k, v in positive.items():
        if v <= 0:
            raise ConfigError(f"config key '{k}' must be > 0, found {v}")
    lo, hi = cfg.data.train_scale
    if not 0 < lo <= hi:
        raise ConfigError(f"config key 'data.train_scale' must be (min, max) with 0 < min <= max, found {(lo, hi)}")
    for k, v in cfg.optim.lr_mult.items():
        if not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"config key 'optim.lr_mult.{k}' must be a number >= 0, found {v!r}")
    if cfg.optim.grad_clip is not None and cfg.optim.grad_clip <= 0:
        raise ConfigError(f"config key 'optim.grad_clip' must be > 0 or null, found {cfg.optim.grad_clip}")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ---------------------------------------------------------------- loading


def read_yaml(path: str | Path) -> dict:
    """Read a recipe; ``_base_: other.yaml`` (or a list) is merged underneath, relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, found {type(data).__name__}")
    bases = data.pop("_base_", [])
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _deep_update(merged, read_yaml(path.parent / base))
    return _deep_update(merged, data)


def _deep_update(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        # Section mappings merge key by key; a leaf dict such as optim.lr_mult merges too.
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_dotlist(items: Sequence[str]) -> dict:
    """``["fold=1", "optim.lr=0.005", "svf.stages=[layer3,layer4]"]`` -> nested dict (YAML values)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"command-line override '{item}' must look like key=value (e.g. fold=1)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"command-line override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"command-line override '{item}': cannot parse value: {e}") from e
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command-line override '{item}' conflicts with an earlier override of '{p}'")
        node[parts[-1]] = value
    return out


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Defaults <- YAML recipe (``path``) <- dotlist overrides.

    Args:
        path: a recipe YAML file, or None for the defaults only.
        overrides: ``key=value`` strings (dotted keys, YAML values).

    Returns:
        The validated config.

    Raises:
        ConfigError: unknown key (with the closest valid one), wrong type or value.
    """
    cfg = ExperimentConfig()
    if path is not None:
        _merge(cfg, read_yaml(path), prefix="", source=str(path))
    if overrides:
        _merge(cfg, parse_dotlist(overrides), prefix="", source="command line")
    validate(cfg)
    return cfg


def config_with_overrides(data: dict, overrides: Sequence[str] = (), source: str = "<dict>") -> ExperimentConfig:
    """Defaults <- ``data`` (e.g. the config stored in a checkpoint) <- dotlist overrides."""
    cfg = ExperimentConfig()
    _merge(cfg, data, prefix="", source=source)
    if overrides:
        _merge(cfg, parse_dotlist(overrides), prefix="", source="command line")
    validate(cfg)
    return cfg


def dump_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def git_commit(cwd: Optional[str | Path] = None) -> Optional[str]:
    """The current git commit of the source tree (with ``-dirty``), or None outside git."""
    cwd = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
