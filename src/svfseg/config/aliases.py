"""svfseg 0.1's regime keys (``svf.enabled``, ``model.backbone_mode``) as deprecated aliases of ``model.regime``."""
from __future__ import annotations

import logging

from svfseg.config.schema import REGIMES, ConfigError
from svfseg.regimes import alias01_of, legacy_modes, regime_from_01

logger = logging.getLogger(__name__)


# svfseg 0.1 chose the backbone regime with two keys, ``svf.enabled`` (svf wins when true) and
# ``model.backbone_mode`` (frozen | train). They still work, as deprecated aliases of
# ``model.regime``. While config layers merge (recipe bases, the recipe, the command line, a
# stored config) every layer is rewritten to carry all three keys consistently, so that a later
# layer's old key combines with earlier ones exactly as it did in 0.1; the aliases are dropped
# before the typed config is built.


def _regime_pair(d: dict) -> tuple[bool, str]:
    """(svf enabled, backbone mode) of a merged layer, in svfseg 0.1's terms."""
    model, svf = d.get("model") or {}, d.get("svf") or {}
    enabled, mode = alias01_of(model.get("regime", "svf"))
    return svf.get("enabled", enabled), model.get("backbone_mode", mode)


def combine_layers(base: dict, new: dict, source: str, *, warn: bool = True) -> dict:
    """``base`` updated with the layer ``new``, svfseg 0.1's regime keys translated (see above)."""
    model = new.get("model") if isinstance(new.get("model"), dict) else {}
    svf = new.get("svf") if isinstance(new.get("svf"), dict) else {}
    old = [k for k, section in (("svf.enabled", svf), ("model.backbone_mode", model))
           if k.split(".")[1] in section]
    if "regime" in model:
        if old:
            raise ConfigError(f"{source}: 'model.regime' and the deprecated {' and '.join(repr(k) for k in old)} "
                              f"are both set; keep only model.regime ({' | '.join(REGIMES)})")
        if model["regime"] not in REGIMES:
            raise ConfigError(f"{source}: config key 'model.regime' must be one of {list(REGIMES)}, "
                              f"found {model['regime']!r}")
        enabled, mode = alias01_of(model["regime"])
    elif old:
        enabled, mode = _regime_pair(base)
        if "enabled" in svf:
            enabled = svf["enabled"]
            if not isinstance(enabled, bool):
                raise ConfigError(f"{source}: 'svf.enabled' expects bool, found {enabled!r}")
        if "backbone_mode" in model:
            mode = model["backbone_mode"]
            if mode not in legacy_modes():
                raise ConfigError(f"{source}: config key 'model.backbone_mode' must be one of {legacy_modes()}, "
                                  f"found {mode!r}")
        regime = regime_from_01(enabled, mode)
        if warn:
            logger.warning("%s: %s deprecated; use model.regime=%s (one of %s)", source,
                           " and ".join(old) + (" is" if len(old) == 1 else " are"), regime,
                           " | ".join(REGIMES))
    else:
        return deep_update(base, new)
    # An explicit model.regime wins: the aliases only span frozen | svf | full.
    regime = model.get("regime") or regime_from_01(enabled, mode)
    new = {**new, "model": {**model, "regime": regime, "backbone_mode": mode}, "svf": {**svf, "enabled": enabled}}
    return deep_update(base, new)


def strip_regime_aliases(merged: dict) -> dict:
    """``merged`` without the alias keys (``model.regime`` carries the regime)."""
    out = dict(merged)
    for section, key in (("model", "backbone_mode"), ("svf", "enabled")):
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


def deep_update(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        # Section mappings merge key by key; a leaf dict such as optim.lr_mult merges too.
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
