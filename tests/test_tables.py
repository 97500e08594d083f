"""Shared result tables (report / compare) and the config keys of issue 13."""
import math

import pytest

from svfseg.config import ConfigError, load_config
from svfseg.results import format_stats, group_by_seed, markdown_table, seed_stats


def test_seed_stats_and_format():
    s = seed_stats([60.0, 62.0, 64.0, None, math.nan])
    assert (s.mean, s.std, s.n) == (62.0, 2.0, 3)  # sample std (n-1); None and NaN left out
    assert format_stats(s) == "62.00 ± 2.00" and format_stats(s, 1, with_n=True) == "62.0 ± 2.0 (n=3)"
    assert seed_stats([60.0, 64.0]).std == pytest.approx(math.sqrt(8))  # n-1, not the population std (2.0)
    assert format_stats(seed_stats([61.5])) == "61.50" and format_stats(seed_stats([None])) == "–"


def test_group_by_seed_keeps_the_later_duplicate(caplog):
    entries = [{"k": "a", "s": 1, "v": 1, "file": "x"}, {"k": "a", "s": 2, "v": 2}, {"k": "a", "s": 1, "v": 3}]
    g = group_by_seed(entries, key=lambda e: e["k"], seed=lambda e: e["s"])
    assert {s: e["v"] for s, e in g["a"].items()} == {1: 3, 2: 2} and "training seed 1" in caplog.text


def test_markdown_table_checks_row_width():
    assert markdown_table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"
    with pytest.raises(ValueError, match="expected 2 cells"):
        markdown_table(["a", "b"], [["1"]])


@pytest.mark.parametrize("item,key", [("data.min_pixels=0", "data.min_pixels"), ("threads=0", "threads")])
def test_new_config_keys_name_themselves_in_errors(item, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [item])
    cfg = load_config(None, ["data.min_pixels=100", "threads=2", "data.benchmark=custom", "fold=5"])
    assert (cfg.data.min_pixels, cfg.threads, cfg.fold) == (100, 2, 5)  # a custom root may have more folds
