"""`svfseg report`: test results of several runs in the paper's table layout, the paper's numbers beside.

``table`` gathers and lays out the results, ``statistic`` says which statistic each number is (and
recomputes the paper's from a run's logs for ``--as-paper``), ``paper`` holds the paper's numbers.
"""
from __future__ import annotations

from svfseg.report.paper import paper_backbone, paper_result
from svfseg.report.table import (METHOD_NAMES, REGIME_SUFFIX, as_paper_table, cell_differences, cell_identity,
                                 find_results, load_entries, report, report_table)

__all__ = ["METHOD_NAMES", "REGIME_SUFFIX", "as_paper_table", "cell_differences", "cell_identity", "find_results",
           "load_entries", "paper_backbone", "paper_result", "report", "report_table"]
