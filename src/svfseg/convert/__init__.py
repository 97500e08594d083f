"""`svfseg convert`: published PFENet / BAM checkpoints as svfseg model files (key maps, manifests, CLI)."""
from __future__ import annotations

from svfseg.convert.cli import add_convert_arguments, run_convert_cli
from svfseg.convert.converter import FORMATS, Converted, convert_checkpoint
from svfseg.convert.keymap import KeyMap, KeyMapError
from svfseg.convert.manifest import Manifest

__all__ = ["FORMATS", "Converted", "KeyMap", "KeyMapError", "Manifest", "add_convert_arguments",
           "convert_checkpoint", "run_convert_cli"]
