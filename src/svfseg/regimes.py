"""The backbone regimes as declared data (torch-free): one `RegimeSpec` per ``model.regime`` value.

Everything that needs to know a fact about a regime (the config checks and 0.1 aliases, the
models, the engine, compare, report) asks this table; the behaviour of each regime (configure
a backbone, merge it, its train/eval mode) is registered against the same names in
``svfseg.models.regimes``. Adding a regime = one entry here + one behaviour there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RegimeSpec:
    """What a backbone regime is, without torch.

    Attributes:
        name: the ``model.regime`` value.
        label: suffix of a method's name in result tables ("" for the frozen baseline).
        trains: what of the backbone trains, in words (for help and errors).
        staged: it trains part of ``svf.stages`` (the ``svf:`` policy is passed to the model).
        backbone_grad: the backbone needs a graph (False: it runs under ``no_grad``).
        whole_backbone: every backbone parameter trains and the backbone follows ``model.train()``
            (BatchNorm aside).
        singular_values: what trains are the singular values of SVD layers (``save_svf`` keeps them as a file).
        mergeable: merging folds its extra backbone structure (SVD layers, adapters) into plain convs.
        section: the config section holding its own settings (None: no section of its own).
        model_kwarg: the model constructor's keyword that takes that section, when not ``svf_policy``
            (which every staged regime gets, for its stages).
        alias01: svfseg 0.1's (``svf.enabled``, ``model.backbone_mode``) that meant it, or None
            when 0.1 had no such regime.
        paper_svf: which rows of the SVF paper's tables it compares with: False the methods as
            published (frozen backbone), True their "+ SVF" rows, None: the paper has no such rows.
        folder: the word of a run's default folder name when it is not ``name`` (svfseg 0.1's, kept so
            existing run paths still resolve).
    """

    name: str
    label: str
    trains: str
    staged: bool = False
    backbone_grad: bool = True
    whole_backbone: bool = False
    singular_values: bool = False
    mergeable: bool = False
    section: str | None = None
    model_kwarg: str | None = None
    alias01: tuple[bool, str] | None = None
    paper_svf: bool | None = None
    folder: str | None = None


_SPECS = (
    RegimeSpec("frozen", "", "nothing (the backbone runs under no_grad)", backbone_grad=False,
               alias01=(False, "frozen"), paper_svf=False),
    RegimeSpec("svf", " + SVF", "the singular values of svf.stages (+ BN affine / biases as the svf: section says)",
               staged=True, singular_values=True, mergeable=True, section="svf", alias01=(True, "frozen"),
               paper_svf=True),
    RegimeSpec("full", " (full fine-tune)", "every backbone parameter (BN statistics stay frozen)",
               whole_backbone=True, alias01=(False, "train"), folder="train"),
    RegimeSpec("bitfit", " (bitfit)", "the biases of svf.stages (the BN shift where a conv has none)", staged=True),
    RegimeSpec("bn", " (bn)", "the BN affine parameters of svf.stages", staged=True),
    RegimeSpec("last_stage", " (last_stage)", "everything of the last of svf.stages", staged=True),
    RegimeSpec("lora", " (lora)", "LoRA adapters on the ungrouped convs of svf.stages (the lora: section)",
               staged=True, mergeable=True, section="lora", model_kwarg="lora"),
)

#: name -> spec, in declaration order.
REGISTRY: dict[str, RegimeSpec] = {s.name: s for s in _SPECS}
#: The ``model.regime`` values.
REGIME_NAMES: tuple[str, ...] = tuple(REGISTRY)
#: The regime of a merged export: the plain architecture, whose backbone has nothing left to train.
PLAIN_REGIME: str = next(s.name for s in _SPECS if not s.backbone_grad)
#: The regime that fine-tunes every backbone parameter (BAM's stage-1 base learner by default).
WHOLE_BACKBONE_REGIME: str = next(s.name for s in _SPECS if s.whole_backbone)


def regime_spec(name: str, *, where: str = "model.regime") -> RegimeSpec:
    """The spec of regime ``name``.

    Raises:
        ValueError: an unknown name (the message lists the valid ones and says where).
    """
    spec = REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"{where}: regime must be one of {list(REGIME_NAMES)}, got {name!r}")
    return spec


def names_where(**facts: object) -> tuple[str, ...]:
    """The regimes whose spec has every given attribute value, e.g. ``names_where(staged=True)``."""
    return tuple(s.name for s in _SPECS if all(getattr(s, k) == v for k, v in facts.items()))


def regime_label(name: str) -> str:
    """The table suffix of ``name`` (`RegimeSpec.label`); an unknown name is shown in parentheses."""
    spec = REGISTRY.get(name)
    return spec.label if spec is not None else f" ({name})"


def regime_from_01(svf_enabled: bool, backbone_mode: str) -> str:
    """The regime svfseg 0.1's (``svf.enabled``, ``model.backbone_mode``) meant: svf wins when enabled."""
    wanted = [s for s in _SPECS if s.alias01 is not None and s.alias01[0]] if svf_enabled else \
        [s for s in _SPECS if s.alias01 == (False, backbone_mode)]
    if wanted:
        return wanted[0].name
    raise ValueError(f"model.backbone_mode: expected one of {legacy_modes()}, found {backbone_mode!r}")


def regime_from_01_description(mode: str) -> str:
    """The regime of an svfseg 0.1 model description's ``backbone_mode`` ("svf", or a config's backbone_mode);
    an unknown value is kept as it is (the description check then names it)."""
    try:
        return regime_from_01(mode == "svf", mode)
    except ValueError:
        return mode


def run_folder_word(name: str) -> str:
    """The word of regime ``name`` in a run's default folder name (`RegimeSpec.folder`, else the name)."""
    spec = REGISTRY.get(name)
    return spec.folder if spec is not None and spec.folder else name


def alias01_of(name: str) -> tuple[bool, str]:
    """svfseg 0.1's (``svf.enabled``, ``model.backbone_mode``) for regime ``name`` (new regimes: (False, "frozen"))."""
    spec = REGISTRY.get(name)
    return spec.alias01 if spec is not None and spec.alias01 is not None else (False, "frozen")


def legacy_modes() -> list[str]:
    """The values svfseg 0.1's ``model.backbone_mode`` took in configs."""
    return sorted({s.alias01[1] for s in _SPECS if s.alias01 is not None})


# -- test-time adaptation: what `adapt.params` fine-tunes on an episode's own supports ----------------------


@dataclass(frozen=True)
class AdaptSpec:
    """One choice of ``adapt.params``: what is fine-tuned on a test episode's supports before its query is predicted.

    Choices combine with ``+`` (``svf+head``). The behaviour (preparing a model, collecting what trains)
    is registered against the same names in ``svfseg.engine.adapt.targets``.

    Attributes:
        name: the ``adapt.params`` value (one part of a combination).
        trains: what trains, in words (for help, errors and tables).
        backbone: it trains something in the backbone (which then runs with a graph).
        head: it trains the few-shot head (every parameter outside the backbone that trained as the head).
        whole_backbone: it trains every backbone weight (no other backbone part can be added to it).
    """

    name: str
    trains: str
    backbone: bool = False
    head: bool = False
    whole_backbone: bool = False


_ADAPT_SPECS = (
    AdaptSpec("none", "nothing (the plain test)"),
    AdaptSpec("svf", "the singular values of svf.stages (the model's own, or decomposed once when it trained "
                     "another regime)", backbone=True),
    AdaptSpec("bn", "the BN affine parameters of svf.stages (statistics frozen)", backbone=True),
    AdaptSpec("bitfit", "the biases of svf.stages (the BN shift where a conv has none)", backbone=True),
    AdaptSpec("lora", "LoRA adapters on the ungrouped convs of svf.stages (the lora: section)", backbone=True),
    AdaptSpec("head", "the few-shot head", head=True),
    AdaptSpec("full", "every backbone weight (BN statistics frozen)", backbone=True, whole_backbone=True),
)

#: ``adapt.params`` part -> spec, in declaration order.
ADAPT_REGISTRY: dict[str, AdaptSpec] = {s.name: s for s in _ADAPT_SPECS}
#: The single ``adapt.params`` values (combinations join them with ``+``).
ADAPT_NAMES: tuple[str, ...] = tuple(ADAPT_REGISTRY)


def adapt_parts(text: str, *, where: str = "adapt.params") -> tuple[AdaptSpec, ...]:
    """The specs of an ``adapt.params`` value such as ``"svf"`` or ``"svf+head"``, in declaration order.

    Raises:
        ValueError: an unknown part, a repeated part, ``none`` combined with another, or ``full`` combined
            with another backbone part (it already trains every backbone weight); the message says where.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: expected one of {list(ADAPT_NAMES)} or a '+' combination such as 'svf+head', "
                         f"found {text!r}")
    names = [p.strip() for p in text.split("+")]
    unknown = [n for n in names if n not in ADAPT_REGISTRY]
    if unknown:
        raise ValueError(f"{where}: {unknown[0]!r} is not one of {list(ADAPT_NAMES)} (found {text!r})")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: a part is repeated in {text!r}")
    specs = tuple(s for s in _ADAPT_SPECS if s.name in names)
    if len(specs) > 1 and any(s.name == "none" for s in specs):
        raise ValueError(f"{where}: 'none' cannot be combined with other parts (found {text!r})")
    if any(s.whole_backbone for s in specs) and sum(s.backbone for s in specs) > 1:
        raise ValueError(f"{where}: 'full' already trains every backbone weight; combine it only with 'head' "
                         f"(found {text!r})")
    return specs


def adapt_name(text: str) -> str:
    """The canonical spelling of an ``adapt.params`` value (parts in declaration order): ``head+svf`` -> ``svf+head``."""
    return "+".join(s.name for s in adapt_parts(text))


#: The ``adapt.params`` value that adapts nothing (the plain test).
NO_ADAPTATION = _ADAPT_SPECS[0].name


def adapt_trains(text: str) -> bool:
    """Whether an ``adapt.params`` value fine-tunes anything (``none`` does not)."""
    return any(s.backbone or s.head for s in adapt_parts(text))
