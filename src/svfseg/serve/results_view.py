"""What the page shows of a request's results and of the served checkpoints, as plain values (no Gradio here)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from svfseg.results import markdown_table, pct
from svfseg.serve.handlers import QueryResult, Request, checkpoint_label
from svfseg.serve.sources import CheckpointRecord

__all__ = ["ERROR_MARK", "status_markdown", "is_error", "result_row", "ResultColumn", "result_column",
           "checkpoint_table"]

ERROR_MARK = "**Error:**"  # how the status line starts when it reports an error (cleared on any input change)


def status_markdown(text: str, ok: bool) -> str:
    """The status line above the results: "Done." and the summary, or the error."""
    return f"**Done.**\n\n{text}" if ok else f"{ERROR_MARK} {text}"


def is_error(status: Optional[str]) -> bool:
    """Whether the status line shows an error (rather than results or nothing)."""
    return bool(status) and status.lstrip().startswith(ERROR_MARK)


def result_row(r: QueryResult) -> list[tuple[str, str]]:
    """One query's row in a checkpoint's result gallery, as (image file, caption) pairs, left to right.

    Today: the overlay (captioned with the query's name, IoU and a no-object notice) and the binary mask. The
    gallery gets as many columns as this row has items, so another mask of the same query (e.g. one made after
    adapting the model to the supports, captioned with the time it took) is one more pair appended here.
    """
    row = _pair(r, "")
    if r.adapted is not None:  # beside it, the same query after adapting to the supports
        row += _pair(r.adapted, "adapted · ")
    return row


def _pair(r: QueryResult, prefix: str) -> list[tuple[str, str]]:
    iou = "" if r.iou is None else f" · IoU {pct(r.iou, digits=1, unit='%')}"
    empty = " · no object found" if r.foreground_fraction == 0 else ""
    return [(str(r.overlay), f"{prefix}{r.name}{iou}{empty}"), (str(r.mask), f"{prefix}{r.name}: mask")]


@dataclass
class ResultColumn:
    """One checkpoint's results on the page: a title, the gallery's rows, the files to download."""

    title: str = ""
    items: list[tuple[str, str]] = field(default_factory=list)  # the rows of :func:`result_row`, one after another
    files: list[str] = field(default_factory=list)
    columns: int = 2  # items per row

    @property
    def shown(self) -> bool:
        return bool(self.title)


def result_column(req: Optional[Request], i: int) -> ResultColumn:
    """Run ``i`` of ``req`` for the page; empty when there is no such run."""
    if req is None or i >= len(req.runs):
        return ResultColumn()
    run = req.runs[i]
    rows = [result_row(r) for r in run.results]
    score = f" · {run.record.score_text}" if run.record else ""
    adapted = f"\n\nright: after adapting {run.adaptation['params']} to the supports ({run.adaptation['seconds']:.1f} s)" \
        if run.adaptation else ""
    return ResultColumn(f"### {run.label}\n`{run.checkpoint}`{score}{adapted}", [item for row in rows for item in row],
                        [str(p) for r in run.results for q in (r, r.adapted) if q is not None
                         for p in (q.mask, q.overlay)],
                        max((len(row) for row in rows), default=2))


def checkpoint_table(checkpoints: Sequence[str], records: Sequence[CheckpointRecord]) -> str:
    """The served checkpoints with what they were trained on and their recorded test score."""
    rows = []
    for ck, rec in zip(checkpoints, records):
        score = rec.score_text + (f" (from `{Path(rec.score_from).name}`)" if rec.score_from else "")
        if rec.problem:
            score += f"; {rec.problem}"
        rows.append([f"**{checkpoint_label(ck)}** `{ck}`", rec.regime or "?", rec.data_text, score])
    return markdown_table(["checkpoint", "regime", "trained on", "recorded test score"], rows)
