"""`svfseg compare`: several backbone regimes x seeds x folds x shots on identical episodes, with paired intervals.

Every cell (regime, seed, fold, shot) is an ordinary run folder under ``OUT/runs``; all cells of
a (fold, shot) are scored on one saved test episode file, and select/validate on one saved
file of base-class validation episodes (``train.select_on=base_heldout``), so the test fold
is looked at only once, after training.

The short-budget rule (``--backbone-lr``): the learning-rate multiplier of whatever a regime
trains in the backbone (the ``svf`` and ``backbone`` parameter groups) is chosen per regime
from a small grid on the base-class validation episodes of the first seed; the chosen value
is then used for every seed. The same grid and the same choice rule apply to every regime. A
tie goes to the earlier grid value (list the grid ascending: a tie keeps the smaller lr), and a
diverged trial counts as failed.
"""
from __future__ import annotations

from svfseg.compare.cells import (CellInterrupted, CellSettingsChanged, cell_settings, run_cell,
                                  settings_differences)
from svfseg.compare.cli import add_compare_arguments, run_compare_cli
from svfseg.compare.plan import WARM_START_SEED, ComparePlan, cell_config, check_plan_lists, lr_overrides, \
    warm_start_checkpoint, warm_start_config
from svfseg.compare.render import compare_markdown, verdict_sentence
from svfseg.compare.run import compare_lock, run_compare, run_warm_start, test_episode_file
from svfseg.compare.summary import summarize

__all__ = ["CellInterrupted", "CellSettingsChanged", "ComparePlan", "WARM_START_SEED", "add_compare_arguments",
           "cell_config", "compare_lock", "cell_settings", "check_plan_lists", "compare_markdown", "lr_overrides", "run_cell",
           "run_compare", "run_compare_cli", "run_warm_start", "settings_differences", "summarize",
           "test_episode_file", "verdict_sentence", "warm_start_checkpoint", "warm_start_config"]
