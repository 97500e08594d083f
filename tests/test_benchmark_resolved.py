"""The benchmark resolved once (svfseg.data.benchmark): its splits are the splits module's, and one trip reads a
custom root's dataset.yaml once."""
from pathlib import Path

import pytest

from svfseg.cli import main
from svfseg.config import load_config
from svfseg.data import DataError, build_dataset
from svfseg.data.benchmark import Benchmark, DataSettings
from svfseg.data.build import build_episodic
from svfseg.data.check import check_dataset
from svfseg.data.generalized import build_generalized
from svfseg.data.meta import META_FILE, load_dataset_meta, write_dataset_meta
from svfseg.data.splits import class_names, class_split, num_classes, num_folds
from svfseg.engine.distributed import DistInfo
from svfseg.engine.model import build_model, describe
from svfseg.engine.resolved import ResolvedRun, resolve_benchmark, resolve_run
from svfseg.engine.runfolder import RunFolder
from svfseg.engine import tasks
from test_custom_dataset import _tiny, custom_root  # noqa: F401 - custom_root: the module fixture

BUILT_IN = [("pascal", "interleaved"), ("coco", "interleaved"), ("coco", "consecutive"), ("synthetic", "interleaved")]


@pytest.mark.parametrize("name,convention", BUILT_IN)
def test_built_in_benchmark_is_the_splits_module(tmp_path, name, convention):
    bench = Benchmark.resolve(name, tmp_path / "absent", convention)  # the built-ins never touch the root
    assert bench.meta is None and bench.classes is None
    assert bench.num_classes == num_classes(name) and bench.num_folds == num_folds(name) == 4
    assert bench.class_names == class_names(name)
    for fold in range(4):
        assert bench.split(fold) == class_split(name, fold, convention)
    with pytest.raises(ValueError, match="0..3"):
        bench.split(4)


def test_custom_benchmark_reads_its_dataset_yaml(tmp_path):
    write_dataset_meta(tmp_path, ["a", "b", "c", "d", "e"], [[1, 3], ["b"], [5]], image_size=40)
    bench = Benchmark.resolve("custom", tmp_path)
    meta = load_dataset_meta(tmp_path)
    assert bench.meta == meta and bench.classes == meta.classes
    assert bench.num_classes == num_classes("custom", meta.classes) == 5
    assert bench.num_folds == num_folds("custom", meta.classes) == 3
    assert bench.class_names == ("a", "b", "c", "d", "e")
    for fold in range(3):
        assert bench.split(fold) == class_split("custom", fold, meta=meta.classes)
    assert bench.split(0).novel == (1, 3) and bench.split(0).base == (2, 4, 5)
    with pytest.raises(ValueError, match="0..2"):
        bench.split(3)


def test_bad_benchmarks_are_refused_with_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'voc'"):
        Benchmark.resolve("voc", tmp_path)
    with pytest.raises(ValueError, match="unknown COCO fold convention 'random'"):
        Benchmark.resolve("coco", tmp_path, "random")
    with pytest.raises(DataError, match="expected a dataset root folder, found none"):
        Benchmark.resolve("custom", tmp_path / "absent")
    with pytest.raises(DataError, match="dataset.yaml: expected the dataset description"):
        Benchmark.resolve("custom", tmp_path)
    with pytest.raises(ValueError, match="dataset.yaml"):
        Benchmark("custom", tmp_path)  # custom without its metadata


@pytest.fixture
def yaml_reads(monkeypatch):
    """Every read of a dataset.yaml from now on (whoever reads it), as a list of paths."""
    reads = []
    read_text = Path.read_text

    def counting(self, *args, **kwargs):
        if self.name == META_FILE:
            reads.append(self)
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    return reads


def _cfg(root, out, *extra):
    args = _tiny(root, out, "trip", "train.select_on=base_heldout", "eval.seeds=[0]", "eval.num_episodes=2", *extra)
    return load_config(args[1], args[2:])


def _trip(run, run_dir: Path):
    """Train set, validation set, model description and test scores of one run, as the engine makes them."""
    task, info = tasks.FewShotTask(), DistInfo()
    train = task.train_data(run)
    val = task.eval_set(run, RunFolder(run_dir), info)
    model = build_model(run, pretrained=False)
    desc = describe(model, run)
    scores = task.score("trip.pt", model, run, {}, tasks.TestOptions(), run_dir / "test", info)
    return train, val, desc, scores


def test_one_trip_reads_a_custom_root_once(custom_root, tmp_path, yaml_reads):
    cfg = _cfg(custom_root, tmp_path)
    run_dir = tmp_path / "resolved"
    run_dir.mkdir()
    train, val, desc, scores = _trip(resolve_run(cfg), run_dir)
    # Before the benchmark was resolved once, this trip read dataset.yaml 16 times (train set 2,
    # validation set 6, describe 1, scoring 7): every layer re-derived the class split.
    assert yaml_reads == [custom_root / META_FILE]
    assert val.on == "base_heldout" and val.class_ids == (2,)  # fold 1's novel class: a base class of fold 0
    assert desc["num_benchmark_classes"] == 4 and scores["num_folds"] == 4
    assert scores["novel_classes"] == [1] and scores["class_names"] == {"1": "cat"}

    # Resolved again (another command), the run reads it once more and makes the same data. (When each
    # entry point could still resolve its own benchmark, this trip read it 4 times: one each.)
    yaml_reads.clear()
    again_dir = tmp_path / "unresolved"
    again_dir.mkdir()
    train2, val2, desc2, scores2 = _trip(resolve_run(cfg), again_dir)
    assert len(yaml_reads) == 1
    assert len(train2) == len(train) and desc2 == desc
    assert val2.dataset.episodes.fingerprint == val.dataset.episodes.fingerprint
    assert [r["episode_fingerprint"] for r in scores2["runs"]] == [r["episode_fingerprint"] for r in scores["runs"]]


def test_keyword_and_object_forms_make_the_same_episodes(custom_root, yaml_reads):
    kw = dict(fold=2, split="val", shot=1, seed=4, num_episodes=6)
    by_keywords = build_dataset(root=custom_root, benchmark="custom", test_size=48, **kw)
    assert len(yaml_reads) == 1  # the class split and the small-object default from one read
    bench = Benchmark.resolve("custom", custom_root)
    by_object = build_episodic(bench, DataSettings(test_size=48), **kw)
    assert len(yaml_reads) == 2
    assert by_object.episodes.fingerprint == by_keywords.episodes.fingerprint
    assert {e.class_id for e in by_object.episodes} == {3}


def test_a_benchmark_of_another_config_is_refused(custom_root, tmp_path):
    cfg = _cfg(custom_root, tmp_path)
    assert resolve_run(cfg).bench == resolve_benchmark(cfg)
    other = Benchmark.resolve("pascal", custom_root)
    with pytest.raises(ValueError, match="resolved for another config: expected data.benchmark=custom"):
        ResolvedRun.of(cfg, other)


def test_semantic_generalized_and_check_read_it_once(custom_root, tmp_path, yaml_reads):
    cfg = _cfg(custom_root, tmp_path)
    run = resolve_run(cfg)
    semantic = tasks.SemanticTask()
    train = semantic.train_data(run)
    val = semantic.eval_set(run, RunFolder(tmp_path), DistInfo())
    generalized = build_generalized(run.bench, fold=0, shot=1, test_size=48)
    # Before: 1 per semantic set and 3 for the generalized episodes (split, episodes, small-object rule).
    assert yaml_reads == [custom_root / META_FILE]
    assert train.base_classes == val.dataset.base_classes == generalized.base_classes == (2, 3, 4)
    assert generalized.novel_classes == (1,) and {e.class_id for e in generalized.episodes} == {1}
    yaml_reads.clear()
    assert check_dataset(custom_root, "custom", workers=1, progress=False) == []
    assert len(yaml_reads) == 1  # before: 2 (the class split, then the small-object rule)


def test_svfseg_train_and_test_each_read_a_custom_root_once(custom_root, tmp_path, yaml_reads):
    """The commands themselves: `train` resolves the benchmark once for its data, model and checks, `test` once
    for its model and scoring (they read it 8 times each before the resolved benchmark was passed down)."""
    args = _tiny(custom_root, tmp_path, "cli", "train.select_on=base_heldout", "eval.seeds=[0]", "eval.num_episodes=2")
    assert main(["train", *args]) == 0
    assert yaml_reads == [custom_root / META_FILE]
    yaml_reads.clear()
    assert main(["test", "--checkpoint", str(tmp_path / "cli" / "best.pt")]) == 0
    assert yaml_reads == [custom_root / META_FILE]
