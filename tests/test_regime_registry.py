"""The regime registry: one declared spec + behaviour per ``model.regime`` value, asked by everyone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from svfseg.config import REGIMES, load_config
from svfseg.models.regimes import get_regime
from svfseg.regimes import REGISTRY, names_where, regime_from_01, regime_label, regime_spec
from svfseg.report import REGIME_SUFFIX, report_table

SRC = Path(__file__).resolve().parents[1] / "src" / "svfseg"
# The registry's own modules may compare regime names; nobody else does.
REGISTRY_MODULES = {"regimes.py", "models/regimes.py"}


def test_every_declared_regime_has_behaviour_and_the_config_offers_exactly_them():
    assert tuple(REGISTRY) == REGIMES == ("frozen", "svf", "full", "bitfit", "bn", "last_stage", "lora")
    for name in REGIMES:
        assert get_regime(name).spec is regime_spec(name)
    assert names_where(staged=True) == ("svf", "bitfit", "bn", "last_stage", "lora")
    assert names_where(mergeable=True) == ("svf", "lora")
    assert names_where(backbone_grad=False) == ("frozen",)
    with pytest.raises(ValueError, match=r"somewhere: regime must be one of \['frozen'"):
        regime_spec("finetune", where="somewhere")


def test_0_1_aliases_are_declared_in_the_specs():
    assert regime_from_01(True, "train") == "svf"  # svf.enabled won in 0.1
    assert regime_from_01(False, "train") == "full"
    assert regime_from_01(False, "frozen") == "frozen"
    assert load_config(None, ["model.backbone_mode=train", "svf.enabled=false"]).model.regime == "full"


def test_a_model_built_from_the_0_1_config_key_has_the_full_regime():
    from test_models import build

    cfg = load_config(None, ["model.backbone_mode=train", "svf.enabled=false"])
    model = build("pfenet", regime=cfg.model.regime)
    assert model.regime == "full" and all(p.requires_grad for p in model.backbone.parameters())


def _entry(regime: str, seed: int, miou: float) -> dict:
    return {"benchmark": "pascal", "backbone": "resnet50_deep", "model": "pfenet", "regime": regime, "shot": 1,
            "fold": 0, "miou": miou, "fb_iou": None, "file": f"{regime}{seed}.json", "train_seed": seed,
            "num_folds": 4}


def test_report_labels_full_fine_tuning_rows():
    # Results record model.regime ("full"); the label table was keyed "train" (svfseg 0.1's
    # backbone_mode), so full fine-tuning rows were shown as "PFENet (full)".
    assert REGIME_SUFFIX["full"] == regime_label("full") == " (full fine-tune)"
    table = report_table([_entry("full", 0, 50.0), _entry("svf", 0, 52.0), _entry("frozen", 0, 49.0)])
    methods = {line.split("|")[3].strip() for line in table.splitlines()[2:] if line.startswith("|")}
    assert methods == {"PFENet (full fine-tune)", "PFENet + SVF", "PFENet"}


def test_no_module_outside_the_registry_compares_regime_names():
    pattern = re.compile(r'regime *==|regime in|== *"svf"|== *"lora"|regime *!= *"|[!=]= *"(frozen|full)"')
    hits = [f"{p.relative_to(SRC)}:{i}" for p in sorted(SRC.rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line) and str(p.relative_to(SRC)) not in REGISTRY_MODULES]
    assert hits == []
