"""Loading a config: defaults <- YAML recipe (with ``_base_``) <- command-line dotlist, typed and checked."""
from __future__ import annotations

import dataclasses
import difflib
import os
import subprocess
import types
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from svfseg.config.aliases import combine_layers, deep_update, strip_regime_aliases
from svfseg.config.schema import REGIMES, ConfigError, ExperimentConfig, flat_keys, to_dict, validate


def from_dict(data: dict, source: str = "<dict>") -> ExperimentConfig:
    """Build a validated config from a (partial) nested dict over the defaults."""
    cfg = ExperimentConfig()
    _merge(cfg, strip_regime_aliases(combine_layers({}, data, source, warn=False)), prefix="", source=source)
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


# ---------------------------------------------------------------- loading


def _yaml_problem(e: Exception) -> str:
    """A YAML error in one line: what the parser found and where (line:column, 1-based)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or "a syntax error"
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping (PyYAML keeps the last silently)."""

    source = "<yaml>"

    def construct_mapping(self, node, deep=False):
        lines: dict = {}
        for key_node, _ in node.value:
            try:
                key = self.construct_object(key_node, deep=True)
                first = lines.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class says what is wrong with it
                continue
            if first != key_node.start_mark.line + 1:
                raise ConfigError(f"{self.source}: expected each key once per section, found {key!r} at line "
                                  f"{first} and again at line {key_node.start_mark.line + 1}; keep one")
        return super().construct_mapping(node, deep)


def _load_yaml(text: str, source: str):
    """``yaml.safe_load`` of ``text`` with duplicate keys refused (``source`` names it in errors)."""
    loader = _UniqueKeyLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_text(path: Path) -> str:
    """A recipe's text; a file that is not UTF-8 is refused naming the line of the first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: expected UTF-8 text (a YAML recipe), found byte 0x{data[e.start]:02x} at line "
                          f"{line} that is not UTF-8; save the file as UTF-8") from None


def read_yaml(path: str | Path, _including: tuple[Path, ...] = ()) -> dict:
    """Read a recipe; ``_base_: other.yaml`` (or a list) is merged underneath, relative to the file.

    Raises:
        ConfigError: a missing file, not UTF-8, a YAML error, a key twice in one section, or a
            ``_base_`` that is not a file name or leads back to a recipe that includes it.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = _load_yaml(_read_text(path), str(path)) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: expected valid YAML, found {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, found {type(data).__name__}")
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: expected _base_ to be a recipe file name or a list of them, found {bases!r}")
    chain = (*_including, path.resolve())
    merged: dict = {}
    for base in bases:
        if (path.parent / base).resolve() in chain:
            loop = " -> ".join(str(p.name) for p in chain) + f" -> {base}"
            raise ConfigError(f"{path}: expected _base_ recipes that do not include themselves, found the loop "
                              f"{loop}")
        merged = deep_update(merged, read_yaml(path.parent / base, chain))
    return combine_layers(merged, data, str(path))


def parse_dotlist(items: Sequence[str]) -> dict:
    """``["fold=1", "optim.lr=0.005", "svf.stages=[layer3,layer4]"]`` -> nested dict (YAML values)."""
    out: dict = {}
    for item in items:
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:  # a name the file system gave as bytes: config.yaml could not record it
            shown = os.fsencode(item).decode("utf-8", "backslashreplace")
            raise ConfigError(f"command-line override '{shown}': expected UTF-8 text (the run records it in "
                              f"config.yaml), found a name that is not UTF-8; rename the file or folder") from None
        if "=" not in item:
            raise ConfigError(f"command-line override '{item}' must look like key=value (e.g. fold=1)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"command-line override '{item}' has an empty key")
        try:
            value = _load_yaml(raw, f"command-line override '{item}'") if raw.strip() else None
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


def keys_set_by(overrides: Sequence[str]) -> dict[str, Any]:
    """The dotted keys ``key=value`` overrides set, with their values, as the config reads them.

    ``optim.lr_mult={svf: 2}`` sets ``optim.lr_mult.svf``; svfseg 0.1's ``model.backbone_mode`` and
    ``svf.enabled`` set ``model.regime`` (the aliases' own keys are left out).
    """
    return flat_keys(strip_regime_aliases(combine_layers({}, parse_dotlist(overrides), "command line", warn=False)))


#: A recipe's per-regime layer: ``by_regime: {frozen: {...}, svf: {...}}``.
BY_REGIME = "by_regime"


def regime_layer(recipe: dict, command_line: dict, source: str) -> dict:
    """The recipe with its ``by_regime`` entry for the run's regime layered on top (and the key dropped).

    The run's regime is the one the command line gives, else the recipe's; the layer goes under the
    command line, so ``optim.lr=...`` on the command line still wins. It lets one recipe train each
    regime as a reference code trains it (the SVF authors' frozen baselines and their +SVF runs use
    other schedules), so ``svfseg compare --regimes frozen,svf`` compares them like for like.

    Raises:
        ConfigError: ``by_regime`` is not a mapping of regime names to config sections, sets
            ``model.regime`` itself, or comes from the command line.
    """
    if BY_REGIME in command_line:
        raise ConfigError(f"command line: '{BY_REGIME}' is a recipe key (one config section per regime); set the "
                          f"keys themselves on the command line")
    layers = recipe.get(BY_REGIME)
    if layers is None:
        return recipe
    recipe = {k: v for k, v in recipe.items() if k != BY_REGIME}
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise ConfigError(f"{source}: '{BY_REGIME}' must map regime names to config sections, found {layers!r}")
    unknown = sorted(set(layers) - set(REGIMES))
    if unknown:
        raise ConfigError(f"{source}: '{BY_REGIME}.{unknown[0]}' is not a regime (one of {list(REGIMES)})")
    regime = strip_regime_aliases(combine_layers(recipe, command_line, "command line", warn=False))
    layer = layers.get((regime.get("model") or {}).get("regime", ExperimentConfig().model.regime))
    if not layer:
        return recipe
    if {"regime", "backbone_mode"} & set(layer.get("model") or {}) or "enabled" in (layer.get("svf") or {}):
        raise ConfigError(f"{source}: '{BY_REGIME}' entries apply once the regime is chosen; they cannot set it")
    return combine_layers(recipe, layer, f"{source} {BY_REGIME}")


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Defaults <- YAML recipe (``path``) <- its ``by_regime`` entry for the run's regime <- dotlist overrides.

    Args:
        path: a recipe YAML file, or None for the defaults only.
        overrides: ``key=value`` strings (dotted keys, YAML values).

    Returns:
        The validated config.

    Raises:
        ConfigError: unknown key (with the closest valid one), wrong type or value.
    """
    merged = read_yaml(path) if path is not None else {}
    command_line = parse_dotlist(overrides) if overrides else {}
    merged = regime_layer(merged, command_line, str(path))
    if command_line:
        merged = combine_layers(merged, command_line, "command line")
    cfg = ExperimentConfig()
    _merge(cfg, strip_regime_aliases(merged), prefix="", source=str(path) if path is not None else "command line")
    validate(cfg)
    return cfg


def config_with_overrides(data: dict, overrides: Sequence[str] = (), source: str = "<dict>") -> ExperimentConfig:
    """Defaults <- ``data`` (e.g. the config stored in a checkpoint) <- dotlist overrides."""
    merged = combine_layers({}, data, source, warn=False)
    if overrides:
        merged = combine_layers(merged, parse_dotlist(overrides), "command line")
    cfg = ExperimentConfig()
    _merge(cfg, strip_regime_aliases(merged), prefix="", source=source)
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
