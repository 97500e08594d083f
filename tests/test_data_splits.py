"""Class split tables: Pascal-5i, COCO-20i (both conventions), synthetic-5i."""
import pytest

from svfseg.data.splits import class_names, class_split, num_classes


@pytest.mark.parametrize("benchmark", ["pascal", "synthetic"])
@pytest.mark.parametrize("fold", range(4))
def test_pascal_like_folds(benchmark, fold):
    sp = class_split(benchmark, fold)
    assert sp.novel == tuple(range(5 * fold + 1, 5 * fold + 6))
    assert sorted(sp.novel + sp.base) == list(range(1, 21))
    assert class_split(benchmark, fold, "consecutive") == sp  # convention only matters for COCO


def test_pascal_table():
    assert class_split("pascal", 0).novel == (1, 2, 3, 4, 5)
    assert class_split("pascal", 3).novel == (16, 17, 18, 19, 20)
    assert class_names("pascal")[0] == "aeroplane" and class_names("pascal")[19] == "tvmonitor"
    assert num_classes("pascal") == 20 and num_classes("coco") == 80 and num_classes("synthetic") == 20


def test_coco_interleaved_table():
    assert class_split("coco", 0).novel == tuple(range(1, 80, 4))
    assert class_split("coco", 1).novel[:3] == (2, 6, 10)
    assert class_split("coco", 3).novel[-1] == 80
    assert class_split("coco", 2).novel == tuple(3 + 4 * k for k in range(20))


def test_coco_consecutive_table():
    for f in range(4):
        assert class_split("coco", f, "consecutive").novel == tuple(range(20 * f + 1, 20 * f + 21))


@pytest.mark.parametrize("convention", ["interleaved", "consecutive"])
def test_coco_folds_partition_classes(convention):
    novel = [c for f in range(4) for c in class_split("coco", f, convention).novel]
    assert sorted(novel) == list(range(1, 81))
    for f in range(4):
        sp = class_split("coco", f, convention)
        assert len(sp.novel) == 20 and len(sp.base) == 60 and not set(sp.novel) & set(sp.base)


def test_names():
    assert class_names("coco")[0] == "person" and class_names("coco")[-1] == "toothbrush"
    assert len(set(class_names("synthetic"))) == 20


@pytest.mark.parametrize("args,match", [
    (("voc", 0), "unknown benchmark"), (("pascal", 4), "fold"), (("pascal", -1), "fold"),
    (("coco", 0, "random"), "convention"),
])
def test_bad_split_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        class_split(*args)
