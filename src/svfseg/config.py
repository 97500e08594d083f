"""Experiment configuration: typed dataclass defaults <- YAML recipe <- command-line dotlist."""
from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import subprocess
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

logger = logging.getLogger(__name__)

#: How the backbone trains (``model.regime``): frozen (the FSS paradigm), svf (only the
#: singular values of ``svf.stages``), full (every backbone weight; BN statistics stay frozen).
REGIMES = ("frozen", "svf", "full", "bitfit", "bn", "last_stage", "lora")

class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and where it came from."""


@dataclass
class DataConfig:
    """Where the benchmark lives and how episodes are made (see svfseg.data.build_dataset)."""

    benchmark: str = "pascal"          # pascal | coco | synthetic
    root: str = "data/pascal"          # prepared Pascal-layout root (`svfseg prepare ...`)
    protocol: str = "dagger"           # training pool: dagger (drop images with novel classes) | pfenet
    convention: str = "interleaved"    # COCO fold convention: interleaved | consecutive
    query_rule: str = "any"            # query classes: any (any size, as PFENet/BAM) | min_pixels (>= 2,048 px)
    train_crop: int = 473
    train_scale: tuple[float, float] = (0.9, 1.1)
    test_size: int = 473               # longer side of the test image (473 Pascal, 641 COCO)
    workers: int = 4                   # DataLoader worker processes (0 = load in the main process)


@dataclass
class ModelConfig:
    """Which few-shot model to build (svfseg.models.create_model)."""

    name: str = "pfenet"               # a registered model: baseline | pfenet | bam | bam_base | ...
    backbone: str = "resnet50_deep"
    weights: Optional[str] = None      # backbone weight file, or "imagenet" for efficientnet_lite0
    regime: str = "svf"                # REGIMES; svf.stages are the stages svf/bitfit/bn/lora/last_stage train
    backbone_kwargs: dict = field(default_factory=dict)  # e.g. {output_stride: 8}
    base_checkpoint: Optional[str] = None  # BAM stage 2: the stage-1 best.pt ({fold}, {benchmark}, ... filled in)
    head: dict = field(default_factory=dict)  # extra keyword arguments for the head


_SVF_MODES = ("auto", "reparam", "factorized")


@dataclass
class SVFPolicy:
    """Which backbone weights SVF decomposes and what trains: the ``svf:`` section of a config.

    The default is the paper's: every conv (1x1 and 3x3, downsample included) of layer2,
    layer3 and layer4 is decomposed and only its singular values train; layer0, layer1, every
    other backbone weight and every BatchNorm stay frozen. Used when ``model.regime=svf``;
    :func:`svfseg.models.policy.apply_policy` turns it into the per-layer
    :class:`svfseg.svf.SVFConfig` of the model-agnostic library.

    Attributes:
        stages: Backbone stages whose convs are decomposed and whose singular values train.
        skip_1x1: Leave 1x1 convs undecomposed (frozen).
        skip_3x3: Leave 3x3 convs undecomposed (frozen).
        train_bn: Also train the BatchNorm affine parameters inside ``stages`` (running
            statistics stay frozen: BN is always in eval mode).
        train_bias: Also train the conv biases of the decomposed layers.
        mode: SVD layer forward, "auto" | "reparam" | "factorized" (see ``svfseg.svf``).
        decay_to: What weight decay pulls the singular values towards: "pretrained" (their
            initial values) or "zero" (SGD's plain decay, as the authors' code). Read by the
            optimiser; the model ignores it.
    """

    stages: tuple[str, ...] = ("layer2", "layer3", "layer4")
    skip_1x1: bool = False
    skip_3x3: bool = False
    train_bn: bool = False
    train_bias: bool = False
    mode: str = "auto"
    decay_to: str = "pretrained"

    def __post_init__(self) -> None:
        if isinstance(self.stages, str):
            self.stages = (self.stages,)
        self.stages = tuple(self.stages)
        if not self.stages or not all(isinstance(s, str) and s for s in self.stages):
            raise ValueError(f"SVFPolicy.stages: expected a non-empty list of stage names, got {self.stages!r}")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"SVFPolicy.stages: duplicate stage names in {self.stages!r}")
        if self.mode not in _SVF_MODES:
            raise ValueError(f"SVFPolicy.mode: expected one of {_SVF_MODES}, got {self.mode!r}")
        if self.skip_1x1 and self.skip_3x3:
            logger.warning("SVFPolicy: skip_1x1 and skip_3x3 both set; only other kernel sizes are decomposed")

    @property
    def target_regex(self) -> str:
        """Full-match regex on qualified module names selecting everything inside ``stages``."""
        names = "|".join(re.escape(s) for s in self.stages)
        return rf"(?:{names})(?:\..+)?"

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (for configs, checkpoints and ``describe()``)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["stages"] = list(self.stages)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SVFPolicy:
        """Build a policy from :meth:`to_dict` output; unknown keys are an error.

        ``lr_mult`` (in policies svfseg 0.1 wrote; the optimiser reads ``optim.lr_mult``) is
        accepted and ignored.
        """
        d = {k: v for k, v in d.items() if k != "lr_mult"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"SVFPolicy: unknown keys {unknown}; valid keys are {sorted(known)}")
        return cls(**d)


@dataclass
class LoRAConfig:
    """The ``lora:`` section (``model.regime=lora``): LoRA adapters (Hugging Face ``peft``) on the convs of ``svf.stages``.

    Attributes:
        r: Rank of each adapter.
        alpha: Scaling numerator (the update is ``alpha / r * B @ A``).
        dropout: Dropout on the adapter input while training.
    """

    r: int = 4
    alpha: float = 4.0
    dropout: float = 0.0


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
    svf: SVFPolicy = field(default_factory=SVFPolicy)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def run_name(self) -> str:
        """The run folder name: explicit ``name`` or one derived from the main choices."""
        if self.name:
            return self.name
        # Full fine-tuning runs keep the folder name svfseg 0.1 gave them ("train"), so that
        # existing stage-1 paths (the bam_base_* runs: ..._train_fold{fold}_...) still resolve.
        regime = {"full": "train"}.get(self.model.regime, self.model.regime)
        return f"{self.data.benchmark}_{self.model.name}_{self.model.backbone}_{regime}_fold{self.fold}_{self.shot}shot"

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name()


_CHOICES = {
    "data.benchmark": ("pascal", "coco", "synthetic"),
    "data.protocol": ("dagger", "pfenet"),
    "data.convention": ("interleaved", "consecutive"),
    "data.query_rule": ("any", "min_pixels"),
    "model.regime": REGIMES,
    "svf.mode": _SVF_MODES,
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
    _merge(cfg, _strip_regime_aliases(_combine({}, data, source, warn=False)), prefix="", source=source)
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
    try:
        cfg.svf = SVFPolicy.from_dict(cfg.svf.to_dict())  # runs its checks; stages become a tuple
    except ValueError as e:
        raise ConfigError(f"config section 'svf': {e}") from None
    if cfg.lora.r < 1 or cfg.lora.alpha <= 0 or not 0 <= cfg.lora.dropout < 1:
        raise ConfigError(f"config section 'lora': expected r >= 1, alpha > 0, 0 <= dropout < 1, found "
                          f"r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout}")
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
    return _combine(merged, data, str(path))


# ---------------------------------------------------------------- svfseg 0.1's regime keys
#
# svfseg 0.1 chose the backbone regime with two keys, ``svf.enabled`` (svf wins when true) and
# ``model.backbone_mode`` (frozen | train). They still work, as deprecated aliases of
# ``model.regime``. While config layers merge (recipe bases, the recipe, the command line, a
# stored config) every layer is rewritten to carry all three keys consistently, so that a later
# layer's old key combines with earlier ones exactly as it did in 0.1; the aliases are dropped
# before the typed config is built.


def _regime_pair(d: dict) -> tuple[bool, str]:
    """(svf enabled, backbone mode) of a merged layer, in svfseg 0.1's terms."""
    model, svf = d.get("model") or {}, d.get("svf") or {}
    regime = model.get("regime", "svf")
    enabled = svf.get("enabled", regime == "svf")
    mode = model.get("backbone_mode", "train" if regime == "full" else "frozen")
    return enabled, mode


def _combine(base: dict, new: dict, source: str, *, warn: bool = True) -> dict:
    """``base`` updated with the layer ``new``, svfseg 0.1's regime keys translated (see above)."""
    model = new.get("model") if isinstance(new.get("model"), dict) else {}
    svf = new.get("svf") if isinstance(new.get("svf"), dict) else {}
    old = [k for k, section in (("svf.enabled", svf), ("model.backbone_mode", model))
           if k.split(".")[1] in section]
    if "regime" in model:
        if old:
            raise ConfigError(f"{source}: 'model.regime' and the deprecated {' and '.join(repr(k) for k in old)} "
                              f"are both set; keep only model.regime (frozen | svf | full)")
        if model["regime"] not in REGIMES:
            raise ConfigError(f"{source}: config key 'model.regime' must be one of {list(REGIMES)}, "
                              f"found {model['regime']!r}")
        enabled, mode = model["regime"] == "svf", "train" if model["regime"] == "full" else "frozen"
    elif old:
        enabled, mode = _regime_pair(base)
        if "enabled" in svf:
            enabled = svf["enabled"]
            if not isinstance(enabled, bool):
                raise ConfigError(f"{source}: 'svf.enabled' expects bool, found {enabled!r}")
        if "backbone_mode" in model:
            mode = model["backbone_mode"]
            if mode not in ("frozen", "train"):
                raise ConfigError(f"{source}: config key 'model.backbone_mode' must be one of ['frozen', 'train'], "
                                  f"found {mode!r}")
        regime = "svf" if enabled else ("full" if mode == "train" else "frozen")
        if warn:
            logger.warning("%s: %s deprecated; use model.regime=%s (frozen | svf | full)", source,
                           " and ".join(old) + (" is" if len(old) == 1 else " are"), regime)
    else:
        return _deep_update(base, new)
    # An explicit model.regime wins: the aliases only span frozen | svf | full.
    regime = model.get("regime") or ("svf" if enabled else ("full" if mode == "train" else "frozen"))
    new = {**new, "model": {**model, "regime": regime, "backbone_mode": mode}, "svf": {**svf, "enabled": enabled}}
    return _deep_update(base, new)


def _strip_regime_aliases(merged: dict) -> dict:
    """``merged`` without the alias keys (``model.regime`` carries the regime)."""
    out = dict(merged)
    for section, key in (("model", "backbone_mode"), ("svf", "enabled")):
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


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
    merged = read_yaml(path) if path is not None else {}
    if overrides:
        merged = _combine(merged, parse_dotlist(overrides), "command line")
    cfg = ExperimentConfig()
    _merge(cfg, _strip_regime_aliases(merged), prefix="", source=str(path) if path is not None else "command line")
    validate(cfg)
    return cfg


def config_with_overrides(data: dict, overrides: Sequence[str] = (), source: str = "<dict>") -> ExperimentConfig:
    """Defaults <- ``data`` (e.g. the config stored in a checkpoint) <- dotlist overrides."""
    merged = _combine({}, data, source, warn=False)
    if overrides:
        merged = _combine(merged, parse_dotlist(overrides), "command line")
    cfg = ExperimentConfig()
    _merge(cfg, _strip_regime_aliases(merged), prefix="", source=source)
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
