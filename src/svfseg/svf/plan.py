"""The forms plan: per SVD layer geometry and input, the forward form measured fastest for a training step.

A plan is measured once (`svfseg.svf.plan_forms`, or a layer in mode "auto" timing both forms on its
first training call for a geometry), then frozen: saved as JSON, read back and installed into a model
(`svfseg.svf.use_plan`), so that a run, its resume and every DDP rank compute with the same forms and
so round the same way. The cost model (`forms.estimate_form`) decides only where nothing was measured
and no timing is allowed: a frozen plan meeting a shape it lacks, or a torch.compile trace.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from typing import Any, Mapping

import torch
from torch import nn

from svfseg.svf.forms import estimate_form, form_key
from svfseg.svf.tune import FORMS, time_forms

logger = logging.getLogger(__name__)

FORMAT_NAME = "svfseg-svf-forms"
FORMAT_VERSION = 1
#: Geometries one plan measures at most (many input sizes, e.g. multi-scale training: the rest is estimated).
MAX_MEASURED = 512


class FormsPlan:
    """Layer geometry and input (`forms.form_key`) -> the forward form measured fastest, with its timings.

    Open (``frozen=False``), a geometry it lacks is measured on its first training call (both forms
    timed, forward + backward to S and to the input) and kept; frozen, it is never timed again and a
    geometry it lacks is decided by the cost model (said once in the log, remembered in
    ``estimated``). One plan is shared by the layers of one `apply_svf` call, so equal layers (a
    ResNet stage's repeated blocks) are measured once.

    Attributes:
        forms: key -> "reparam" | "factorized".
        seconds: key -> {form: median seconds of one forward + backward}, where measured here.
        frozen: no further timing.
        measured_on: where it was measured (torch version, device, threads), for the reader.
        estimated: keys the cost model decided (not saved: the same model decides them again).
        reps: timed calls per form when measuring.
    """

    def __init__(
        self,
        forms: Mapping[str, str] | None = None,
        seconds: Mapping[str, Mapping[str, float]] | None = None,
        *,
        frozen: bool = False,
        measured_on: Mapping[str, Any] | None = None,
        reps: int = 3,
    ) -> None:
        forms = dict(forms or {})
        wrong = {k: v for k, v in forms.items() if v not in FORMS}
        if wrong:
            key, value = next(iter(wrong.items()))
            raise ValueError(f"FormsPlan: expected a form in {FORMS} for every key, found {value!r} for {key!r}")
        self.forms: dict[str, str] = forms
        self.seconds: dict[str, dict[str, float]] = {k: dict(v) for k, v in (seconds or {}).items()}
        self.frozen = frozen
        self.measured_on: dict[str, Any] = dict(measured_on or {})
        self.estimated: dict[str, str] = {}
        self.reps = reps

    def __len__(self) -> int:
        return len(self.forms)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FormsPlan) and self.forms == other.forms

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        counts = ", ".join(f"{form} {n}" for form, n in sorted(self.counts().items()))
        return f"FormsPlan({len(self)} geometries{': ' + counts if counts else ''}, frozen={self.frozen})"

    def counts(self) -> dict[str, int]:
        """How many geometries each form won."""
        return dict(collections.Counter(self.forms.values()))

    def freeze(self) -> "FormsPlan":
        """Stops all further timing (returns the plan)."""
        self.frozen = True
        return self

    def form_for(self, layer: nn.Module, x: torch.Tensor) -> str:
        """The form for a training call of ``layer`` on ``x``: recorded, else measured (open plan), else estimated."""
        key = form_key(layer, x)
        form = self.forms.get(key) or self.estimated.get(key)
        if form is not None:
            return form
        if self.frozen:
            return self._estimate(key, layer, x, "the plan is frozen")
        if len(self.forms) >= MAX_MEASURED:
            return self._estimate(key, layer, x, f"the plan has measured {MAX_MEASURED} shapes already")
        entry = time_forms(layer, x, reps=self.reps)
        self.forms[key], self.seconds[key] = entry["plan"], entry["seconds"]
        if not self.measured_on:
            self.measured_on = _machine(x.device)
        return entry["plan"]

    def _estimate(self, key: str, layer: nn.Module, x: torch.Tensor, why: str) -> str:
        form = estimate_form(layer, x)
        if not self.estimated:  # one line per plan: the cost model stands in for a measurement
            logger.info("svf forms: no measured form for %s (%s); the cost model chooses %s, and decides every "
                        "other shape this plan lacks", key, why, form)
        self.estimated[key] = form
        return form

    # --- saving and loading ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable plan (format, where it was measured, every key's form and timings)."""
        forms = {}
        for key in sorted(self.forms):
            entry: dict[str, Any] = {"form": self.forms[key]}
            if key in self.seconds:
                entry["seconds"] = self.seconds[key]
            forms[key] = entry
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "measured_on": self.measured_on,
                "forms": forms}  # fmt: skip

    def to_json(self) -> str:
        """The plan as JSON text (`to_dict`)."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str = "forms plan") -> "FormsPlan":
        """A frozen plan from `to_dict` output; ``where`` names the source in errors (one line each)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{where}: expected a forms plan (format {FORMAT_NAME!r}), found {found!r}")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"{where}: format_version {version!r} is not one this svfseg reads "
                             f"(<= {FORMAT_VERSION})")  # fmt: skip
        entries = data.get("forms")
        if not isinstance(entries, dict):
            raise ValueError(f"{where}: expected 'forms' to map layer keys to entries, found {type(entries).__name__}")
        forms, seconds = {}, {}
        for key, entry in entries.items():
            form = entry.get("form") if isinstance(entry, dict) else None
            if form not in FORMS:
                raise ValueError(f"{where}: expected a form in {FORMS} for {key!r}, found {entry!r}")
            forms[key] = form
            if isinstance(entry.get("seconds"), dict):
                seconds[key] = entry["seconds"]
        return cls(forms, seconds, frozen=True, measured_on=data.get("measured_on") or {})

    def save(self, path: str | os.PathLike) -> None:
        """Writes the plan as JSON (a temporary file renamed over ``path``: never half a file)."""
        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                f.write(self.to_json())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FormsPlan":
        """Reads a plan written by `save` (frozen: no timing).

        Raises:
            FileNotFoundError: no such file.
            ValueError: not JSON, or not a forms plan (the message names the file and what was found).
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"forms plan {path!r}: no such file")
        try:
            with open(path) as f:
                data = json.load(f)
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"forms plan {path!r}: expected JSON, found unreadable text ({err})") from None
        return cls.from_dict(data, where=f"forms plan {path!r}")


def _machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": str(torch.__version__), "device": device.type, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
