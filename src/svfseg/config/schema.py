"""The experiment config's schema: typed sections with their defaults, allowed values and cross-field checks."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from svfseg.policies import SVF_MODES, AdaptSettings, LoRAConfig, SVFPolicy
from svfseg.regimes import REGIME_NAMES, REGISTRY, adapt_name, run_folder_word

#: How the backbone trains (``model.regime``): the names of ``svfseg.regimes`` (what each trains is declared there).
REGIMES = REGIME_NAMES


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and where it came from."""


@dataclass
class DataConfig:
    """Where the benchmark lives and how episodes are made (see svfseg.data.build_dataset)."""

    benchmark: str = "pascal"          # pascal | coco | synthetic | custom (classes, folds: root/dataset.yaml)
    root: str = "data/pascal"          # prepared Pascal-layout root (`svfseg prepare ...`)
    protocol: str = "dagger"           # training pool: dagger (drop images with novel classes) | pfenet
    convention: str = "interleaved"    # COCO fold convention: interleaved | consecutive
    query_rule: str = "any"            # query classes: any (any size, as PFENet/BAM) | min_pixels (>= 2,048 px)
    train_crop: int = 473
    train_scale: tuple[float, float] = (0.9, 1.1)
    test_size: int = 473               # longer side of the test image (473 Pascal, 641 COCO)
    min_pixels: Optional[int] = None   # small-object rule, px at label size (None: 2,048 pascal/coco, else 0.9%)
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
    init_head: Optional[str] = None    # warm start: a checkpoint whose head (all but the backbone) starts this run
    # start from every weight of a model file (`svfseg convert` / `svfseg merge` output, a run's best.pt of a
    # plain-backbone regime): its backbone goes in before model.regime decomposes it; no model.weights or
    # base_checkpoint is read
    init_from: Optional[str] = None


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
    # NHWC tensors for the convolutions, in training and in test/predict/serve (oneDNN on CPUs runs them faster;
    # benchmarks/bench_step.py and bench_eval.py measure it)
    channels_last: bool = False
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
    # BAM's schedule options (its COCO recipes): validate also in the middle of every epoch but the
    # first when the run has at most this many epochs (0 = never), and stop once the best
    # validation score is this many epochs old (0 = never).
    half_epoch_val_max_epochs: int = 0
    early_stop_epochs: int = 0


@dataclass
class EvalConfig:
    """`svfseg test` defaults."""

    protocol: str = "hsnet"            # pfenet | bam | hsnet | pfenet_permuted | bam_permuted (count, seeds, order)
    episodes: Optional[str] = None     # fixed episode file (overrides protocol)
    num_episodes: Optional[int] = None  # override the protocol's count
    seeds: Optional[list[int]] = None  # override the protocol's seeds
    batch_size: int = 1
    save_vis: int = 0
    # PFENet/BAM's test-time geometry: sides floored to multiples of 8, raw-zero (black) padding,
    # the whole square output upsampled (align_corners) to the label's longer-side square.
    # Default: mean-colour padding, the valid region cropped and resized to the label size.
    upstream_padding: bool = False


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
    threads: Optional[int] = None      # torch intra-op threads (None: torch's default, one per core); `--threads`
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    svf: SVFPolicy = field(default_factory=SVFPolicy)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    adapt: AdaptSettings = field(default_factory=AdaptSettings)  # test-time adaptation on each episode's supports

    def run_name(self) -> str:
        """The run folder name: explicit ``name`` or one derived from the main choices."""
        if self.name:
            return self.name
        # Full fine-tuning runs keep the folder name svfseg 0.1 gave them ("train"), so that
        # existing stage-1 paths (the bam_base_* runs: ..._train_fold{fold}_...) still resolve.
        regime = run_folder_word(self.model.regime)
        return f"{self.data.benchmark}_{self.model.name}_{self.model.backbone}_{regime}_fold{self.fold}_{self.shot}shot"

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name()


_CHOICES = {
    "data.benchmark": ("pascal", "coco", "synthetic", "custom"),
    "data.protocol": ("dagger", "pfenet"),
    "data.convention": ("interleaved", "consecutive"),
    "data.query_rule": ("any", "min_pixels"),
    "model.regime": REGIMES,
    "svf.mode": SVF_MODES,
    "svf.decay_to": ("pretrained", "zero"),
    "train.amp": ("auto", "bf16", "fp16", "off"),
    "train.select_on": ("test_fold", "base_heldout", "last"),
    # the names of svfseg.data.episodes.PROTOCOLS (config/ imports nothing of svfseg; a test keeps them equal)
    "eval.protocol": ("pfenet", "bam", "hsnet", "pfenet_permuted", "bam_permuted"),
}


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


def flat_keys(d: dict, prefix: str = "") -> dict:
    """A nested config dict as ``{"section.key": value}`` (empty dicts stay values), to compare two configs key by key."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def validate(cfg: ExperimentConfig) -> None:
    """Cross-field checks; each error names the offending key."""
    flat = {k: _get(cfg, k) for k in _CHOICES}
    for k, allowed in _CHOICES.items():
        if flat[k] not in allowed:
            raise ConfigError(f"config key '{k}' must be one of {list(allowed)}, found {flat[k]!r}")
    if cfg.fold not in (0, 1, 2, 3) and not (cfg.data.benchmark == "custom" and cfg.fold >= 0):
        # a custom benchmark's fold count is in its dataset.yaml: the data layer checks the upper bound
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
    for k, v in {"data.min_pixels": cfg.data.min_pixels, "threads": cfg.threads}.items():
        if v is not None and v < 1:
            raise ConfigError(f"config key '{k}' must be >= 1 (or null for the default), found {v}")
    lo, hi = cfg.data.train_scale
    if not 0 < lo <= hi:
        raise ConfigError(f"config key 'data.train_scale' must be (min, max) with 0 < min <= max, found {(lo, hi)}")
    for k, v in cfg.optim.lr_mult.items():
        if isinstance(v, str):  # YAML 1.1 reads "1e-05" (no dot) as a string; the float keys take it too
            try:
                v = cfg.optim.lr_mult[k] = float(v)
            except ValueError:
                pass
        if not isinstance(v, (int, float)) or not v >= 0:  # NaN too
            raise ConfigError(f"config key 'optim.lr_mult.{k}' must be a number >= 0, found {v!r}")
    try:
        cfg.svf = SVFPolicy.from_dict(cfg.svf.to_dict())  # runs its checks; stages become a tuple
    except ValueError as e:
        raise ConfigError(f"config section 'svf': {e}") from None
    try:
        cfg.adapt = AdaptSettings(**{**cfg.adapt.to_dict(), "params": adapt_name(cfg.adapt.params)})
    except ValueError as e:
        raise ConfigError(f"config section 'adapt': {e}") from None
    if cfg.lora.r < 1 or cfg.lora.alpha <= 0 or not 0 <= cfg.lora.dropout < 1:
        raise ConfigError(f"config section 'lora': expected r >= 1, alpha > 0, 0 <= dropout < 1, found "
                          f"r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout}")
    if cfg.model.init_head and cfg.model.init_from:
        raise ConfigError("config keys 'model.init_head' and 'model.init_from' are both set: init_from already "
                          "gives the head (and the backbone); keep one")
    if cfg.optim.grad_clip is not None and cfg.optim.grad_clip <= 0:
        raise ConfigError(f"config key 'optim.grad_clip' must be > 0 or null, found {cfg.optim.grad_clip}")
    _validate_more(cfg)


#: Parameter groups the models name (``optim.lr_mult`` keys; see ``FewShotModel.parameter_groups``).
LR_GROUPS = ("head", "svf", "backbone")
#: The smallest image side the backbones' five stride-2 stages take (train crop, test size).
MIN_SIDE = 32
#: ``svf:`` options only ``model.regime=svf`` reads; the other staged regimes read only ``svf.stages``.
# svf-section options that change what an SVF run trains: set under another staged regime they would be
# ignored silently, so they are refused. svf.mode and svf.fold_bn only choose how an SVF layer computes (a
# speed setting a recipe may carry for its svf runs), so a recipe that sets them still serves every regime.
_SVF_ONLY = ("skip_1x1", "skip_3x3", "train_bn", "train_bias", "rank_multiple")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _validate_more(cfg: ExperimentConfig) -> None:
    """The checks torch, numpy or the file system would otherwise make later, after a run folder exists."""
    import math

    floats = {"optim.lr": cfg.optim.lr, "optim.momentum": cfg.optim.momentum,
              "optim.weight_decay": cfg.optim.weight_decay, "optim.power": cfg.optim.power,
              "optim.grad_clip": cfg.optim.grad_clip, "train.aux_weight": cfg.train.aux_weight,
              "lora.alpha": cfg.lora.alpha, "lora.dropout": cfg.lora.dropout,
              **{f"data.train_scale[{i}]": v for i, v in enumerate(cfg.data.train_scale)},
              **{f"optim.lr_mult.{k}": v for k, v in cfg.optim.lr_mult.items() if isinstance(v, (int, float))}}
    for k, v in floats.items():
        if v is not None and not math.isfinite(v):
            raise ConfigError(f"config key '{k}' must be a finite number, found {v}")
    unknown = sorted(set(cfg.optim.lr_mult) - set(LR_GROUPS))
    if unknown:
        raise ConfigError(f"config key 'optim.lr_mult.{unknown[0]}' is unknown: the parameter groups are "
                          f"{list(LR_GROUPS)}")
    non_negative = {"optim.momentum": cfg.optim.momentum, "optim.weight_decay": cfg.optim.weight_decay,
                    "optim.power": cfg.optim.power, "optim.warmup_steps": cfg.optim.warmup_steps,
                    "seed": cfg.seed, "data.workers": cfg.data.workers, "train.aux_weight": cfg.train.aux_weight,
                    "train.val_every": cfg.train.val_every, "train.checkpoint_every": cfg.train.checkpoint_every,
                    "train.val_seed": cfg.train.val_seed}
    for k, v in non_negative.items():
        if v < 0:
            raise ConfigError(f"config key '{k}' must be >= 0, found {v}")
    if cfg.seed >= 2**32 or cfg.train.val_seed >= 2**32:
        raise ConfigError(f"config key 'seed' / 'train.val_seed' must be < 2**32, found {cfg.seed} / "
                          f"{cfg.train.val_seed}")
    for k, v in {"data.train_crop": cfg.data.train_crop, "data.test_size": cfg.data.test_size}.items():
        if v < MIN_SIDE:
            raise ConfigError(f"config key '{k}' must be >= {MIN_SIDE} px (the backbones halve it five times), "
                              f"found {v}")
    for k, v in {"train.steps_per_epoch": cfg.train.steps_per_epoch,
                 "train.stop_after_steps": cfg.train.stop_after_steps}.items():
        if v is not None and v < (1 if k == "train.steps_per_epoch" else 0):
            raise ConfigError(f"config key '{k}' must be >= {1 if k == 'train.steps_per_epoch' else 0} or null "
                              f"(the default), found {v}")
    if not _DEVICE.fullmatch(str(cfg.device)):
        raise ConfigError(f"config key 'device' must be auto, cpu, cuda or cuda:N, found {cfg.device!r}")
    spec = REGISTRY.get(cfg.model.regime)
    if spec is not None and spec.staged and not spec.singular_values:  # bitfit, bn, last_stage, lora
        default = SVFPolicy()
        ignored = [k for k in _SVF_ONLY if getattr(cfg.svf, k) != getattr(default, k)]
        if ignored:
            raise ConfigError(f"config key 'svf.{ignored[0]}' is read only by model.regime=svf; "
                              f"model.regime={cfg.model.regime} would ignore it (it trains only on svf.stages): "
                              f"remove it")
    _validate_counts_and_names(cfg)
    if cfg.name is not None:
        parts = Path(cfg.name).parts
        if not cfg.name.strip() or Path(cfg.name).is_absolute() or ".." in parts or "~" in cfg.name[:1]:
            raise ConfigError(f"config key 'name' must be a folder name inside output_dir (no absolute path, "
                              f"no '..'), found {cfg.name!r}")


#: Most episodes one list may hold (train.val_episodes, eval.num_episodes, `svfseg episodes --count`): 50x the
#: largest protocol's (PFENet's 20,000 on COCO), about 100 MB of JSON. The data layer's own copy
#: (``svfseg.data.episodes.MAX_EPISODES``) is kept equal by a test: config/ imports nothing of the data layer.
MAX_EPISODES = 1_000_000
#: Largest ``lora.r``: the rank of a LoRA update B A is at most min(c_out, c_in k^2) of its conv (2,048 for
#: ResNet's widest), so a larger r adds parameters and memory (a huge r exhausts it) but no capacity.
MAX_LORA_R = 4096


def _validate_counts_and_names(cfg: ExperimentConfig) -> None:
    """Counts, names and paths only some commands read, checked whatever the command (a typo costs no training)."""
    import math

    at_least = {"train.val_episodes": (cfg.train.val_episodes, 1), "eval.num_episodes": (cfg.eval.num_episodes, 1),
                "eval.save_vis": (cfg.eval.save_vis, 0), "train.early_stop_epochs": (cfg.train.early_stop_epochs, 0),
                "train.half_epoch_val_max_epochs": (cfg.train.half_epoch_val_max_epochs, 0)}
    for k, (v, low) in at_least.items():
        if v is not None and v < low:
            raise ConfigError(f"config key '{k}' must be >= {low}" + (" or null" if k == "eval.num_episodes" else "")
                              + f", found {v}")
    for k in ("train.val_episodes", "eval.num_episodes"):
        v = _get(cfg, k)
        if v is not None and v > MAX_EPISODES:
            raise ConfigError(f"config key '{k}' must be <= {MAX_EPISODES:,} episodes, found {v:,}")
    if cfg.lora.r > MAX_LORA_R:
        raise ConfigError(f"config key 'lora.r' must be <= {MAX_LORA_R} (a LoRA update's rank is at most the "
                          f"smallest side of its conv, 2,048 in the widest backbone), found {cfg.lora.r:,}")
    if cfg.eval.seeds is not None:
        if not cfg.eval.seeds:
            raise ConfigError("config key 'eval.seeds' must list at least one seed, or be null for the protocol's "
                              "seeds, found []")
        bad = [x for x in cfg.eval.seeds if not 0 <= x < 2**32]
        if bad:
            raise ConfigError(f"config key 'eval.seeds' must hold seeds in 0 .. 2**32-1, found {bad[0]}")
    # strings that name a model, a backbone, a folder or a file: an empty one is a typo, never a choice
    named = {"model.name": "a registered model (e.g. pfenet)", "model.backbone": "a backbone (e.g. resnet50_deep)",
             "data.root": "a prepared dataset folder (e.g. data/pascal)", "output_dir": "a folder (e.g. runs)",
             "model.weights": "a weight file, imagenet or null", "model.base_checkpoint": "a checkpoint file or null",
             "model.init_head": "a checkpoint file or null", "model.init_from": "a model file or null",
             "train.val_episodes_file": "an episode file or null",
             "eval.episodes": "an episode file or null"}
    for k, what in named.items():
        v = _get(cfg, k)
        if v is not None and not str(v).strip():
            raise ConfigError(f"config key '{k}' must be {what}, found {v!r}")
    for section in ("model.head", "model.backbone_kwargs"):
        for k, v in _numbers(_get(cfg, section), section):
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"config key '{k}' must be a finite number >= 0 (options here are sizes, rates, "
                                  f"scales and probabilities), found {v}")


def _numbers(value: Any, key: str):
    """(dotted key, number) for every number in a nested option mapping (list items as key[i])."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{key}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield key, value


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg
