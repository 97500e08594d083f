"""Issue 30, items 3, 4 and 6: masks with an alpha channel, empty and non-image files, recipes that loop,
non-UTF-8 names and files, an S file as a checkpoint; each through the one reader every command uses."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import error_line
from svfseg.cli import main
from svfseg.data.io import DataError, read_image, read_mask

SIDE = 40


def _square(value=1):
    m = np.zeros((SIDE, SIDE), np.uint8)
    m[10:20, 10:20] = value  # 100 px of 1,600: 6.25%
    return m


# ---------------------------------------------------------------- item 3: alpha masks


def _alpha_masks(tmp_path):
    """The object in the alpha channel over one colour, as drawing tools save it: RGBA, LA, palette + tRNS."""
    obj = _square(255)
    white = np.full((SIDE, SIDE), 255, np.uint8)
    paths = {}
    paths["rgba"] = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([white, white, white, obj]), "RGBA").save(paths["rgba"])
    paths["la"] = tmp_path / "la.png"
    Image.fromarray(np.dstack([white, obj]), "LA").save(paths["la"])
    paths["palette"] = tmp_path / "palette.png"
    pal = Image.fromarray(_square(1), "P")
    pal.putpalette([255, 255, 255] * 2)  # both entries white; entry 0 transparent
    pal.save(paths["palette"], transparency=0)
    return paths


def test_a_mask_in_the_alpha_channel_is_read_from_the_alpha_channel(tmp_path):
    from svfseg.predict import read_binary_mask
    from svfseg.serve.inputs import read_mask_upload

    for kind, path in _alpha_masks(tmp_path).items():
        values = read_mask(path)
        assert set(np.unique(values).tolist()) == {0, 255}, kind
        assert (values > 0).sum() == 100, kind
        for fg in (read_binary_mask(path, (SIDE, SIDE)),
                   read_mask_upload(str(path), "support 1 mask", (SIDE, SIDE), max_pixels=10**6)):
            assert fg.sum() == 100 and fg[10:20, 10:20].all(), kind  # 6.25%, not 100%


def test_alpha_that_agrees_with_the_colour_is_read_as_before_and_one_that_disagrees_is_refused(tmp_path):
    obj = _square(255)
    opaque = np.full((SIDE, SIDE), 255, np.uint8)
    # an opaque colour mask (alpha constant): the colour, as always
    Image.fromarray(np.dstack([obj, obj, obj, opaque]), "RGBA").save(tmp_path / "opaque.png")
    assert (read_mask(tmp_path / "opaque.png") > 0).sum() == 100
    # transparent black background, opaque white object: both say the same
    Image.fromarray(np.dstack([obj, obj, obj, obj]), "RGBA").save(tmp_path / "agree.png")
    assert (read_mask(tmp_path / "agree.png") > 0).sum() == 100
    # the object drawn black and opaque on transparent white: read by colour it would be the background
    inverse = 255 - obj
    Image.fromarray(np.dstack([inverse, inverse, inverse, obj]), "RGBA").save(tmp_path / "inverse.png")
    with pytest.raises(DataError, match=r"inverse.png: expected a mask whose alpha channel agrees with its colour"):
        read_mask(tmp_path / "inverse.png")
    # a palette mask whose transparent entry is not the background
    pal = Image.fromarray(_square(1), "P")
    pal.putpalette([0, 0, 0, 255, 255, 255])
    pal.save(tmp_path / "pal_inverse.png", transparency=1)
    with pytest.raises(DataError, match="found 1,600 pixel"):
        read_mask(tmp_path / "pal_inverse.png")


def test_predict_refuses_a_disagreeing_alpha_mask_in_one_line(tmp_path, capsys):
    obj = _square(255)
    inverse = 255 - obj
    Image.fromarray(np.dstack([inverse, inverse, inverse, obj]), "RGBA").save(tmp_path / "m.png")
    Image.fromarray(np.zeros((SIDE, SIDE, 3), np.uint8)).save(tmp_path / "s.png")
    assert main(["predict", "--checkpoint", str(tmp_path / "c.pt"), "--support", str(tmp_path / "s.png"),
                 str(tmp_path / "m.png"), "--query", str(tmp_path / "s.png"), "--out", str(tmp_path / "o")]) == 1
    assert "alpha channel agrees with its colour" in error_line(capsys, "predict")


# ---------------------------------------------------------------- item 4: empty and non-image files


def test_an_empty_or_non_image_file_is_one_line_naming_it_in_every_reader(tmp_path, capsys):
    from svfseg.data.io import image_size, read_label
    from svfseg.serve.inputs import ServeError, read_mask_upload, read_rgb_upload

    empty, text = tmp_path / "empty.jpg", tmp_path / "text.png"
    empty.write_bytes(b"")
    text.write_text("not an image\n")
    for reader in (read_image, read_mask, read_label):
        with pytest.raises(DataError, match=r"empty.jpg: expected .*, found an empty file \(0 bytes\)"):
            reader(empty)
        with pytest.raises(DataError, match="text.png: expected"):
            reader(text)
    with pytest.raises(OSError, match=r"an empty file \(0 bytes\)"):
        image_size(empty)
    with pytest.raises(ServeError, match=r"query 1 \(empty.jpg\): cannot read it: expected .*an empty file"):
        read_rgb_upload(str(empty), "query 1")
    with pytest.raises(ServeError, match=r"support 1 mask \(empty.jpg\).*an empty file"):
        read_mask_upload(str(empty), "support 1 mask", None, max_pixels=10**6)
    ok = tmp_path / "ok.png"
    Image.fromarray(np.zeros((SIDE, SIDE, 3), np.uint8)).save(ok)
    for query in (empty, text):
        assert main(["predict", "--checkpoint", str(tmp_path / "c.pt"), "--support", str(ok), str(ok), "--query",
                     str(query), "--out", str(tmp_path / "o"), "--mask-class", "0"]) == 1
        assert str(query) in error_line(capsys, "predict")


def test_an_empty_image_in_a_dataset_is_named_by_training_prepare_and_check(data_root, tmp_path, capsys, caplog):
    import shutil

    from svfseg.data.custom import prepare_custom

    root = shutil.copytree(data_root, tmp_path / "root", symlinks=True)
    image = (root / "val.txt").read_text().split()[0]
    (root / image).write_bytes(b"")
    # prepare --check decodes every image with the reader training uses
    assert main(["prepare", "synthetic", "--check", str(root), "--workers", "1"]) == 1
    assert f"{root / image}: expected an RGB image file, found an empty file (0 bytes)" in caplog.text
    # the class index every command builds first (train, test, episodes)
    assert main(["episodes", "--config", str(RECIPE), f"data.root={root}", "--out", str(tmp_path / "e.json")]) == 1
    assert f"{root / image}: expected a readable image, found an empty file" in capsys.readouterr().err
    # prepare custom
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    (images / "a.jpg").write_bytes(b"")
    Image.fromarray(_square(1)).save(masks / "a.png")
    with pytest.raises(DataError, match=r"a.jpg: expected a readable image, found an empty file"):
        prepare_custom(images, masks, tmp_path / "out", workers=1)


RECIPE = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "pfenet_efficientnet_lite0.yaml"


@pytest.mark.parametrize("recipes, expected", [
    ({"a.yaml": "_base_: a.yaml\nfold: 1\n"}, "found the loop a.yaml -> a.yaml"),
    ({"a.yaml": "_base_: b.yaml\n", "b.yaml": "_base_: [a.yaml]\n"}, "found the loop a.yaml -> b.yaml -> a.yaml"),
    ({"a.yaml": "_base_: [b.yaml, 5]\n", "b.yaml": "fold: 1\n"}, "expected _base_ to be a recipe file name or a "
                                                               "list of them, found ['b.yaml', 5]"),
    ({"a.yaml": "fold: 1\nshot: 1\nfold: 2\n"}, "expected each key once per section, found 'fold' at line 1 and "
                                                "again at line 3; keep one"),
    ({"a.yaml": "train:\n  epochs: 1\n  epochs: 2\n"}, "found 'epochs' at line 2 and again at line 3"),
    ({"a.yaml": b"name: caf\xe9\n"}, "expected UTF-8 text (a YAML recipe), found byte 0xe9 at line 1"),
])
def test_recipes_that_loop_repeat_a_key_or_are_not_utf8_are_one_line(tmp_path, capsys, recipes, expected):
    for name, text in recipes.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["episodes", "--config", str(tmp_path / "a.yaml"), "--out", str(tmp_path / "e.json")]) == 2
    line = error_line(capsys, "episodes")
    assert expected in line and "a.yaml" in line, line


# ---------------------------------------------------------------- item 6: names, S files, a full disk


def test_a_file_name_that_is_not_utf8_is_named(tmp_path):
    import os

    from svfseg.cli import error_line as cli_error_line
    from svfseg.data.custom import prepare_custom

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    name = os.fsdecode(b"caf\xe9")  # a Latin-1 name on a UTF-8 file system
    for folder, suffix in ((images, ".png"), (masks, ".png")):
        Image.fromarray(_square(1)).save(folder / f"{name}{suffix}")
    with pytest.raises(DataError, match=r"caf\\xe9.png: expected a UTF-8 file name"):
        prepare_custom(images, masks, tmp_path / "out", workers=1)
    # any other text write that meets such a name: the CLI's line names it instead of "surrogates not allowed"
    e = UnicodeEncodeError("utf-8", f"a b\nJPEGImages/{name}.jpg x\nc", 16, 17, "surrogates not allowed")
    assert cli_error_line(e) == ("expected UTF-8 names, found one that is not UTF-8 in 'JPEGImages/caf\\xe9.jpg x'; "
                                 "rename that file or folder")


@pytest.fixture(scope="module")
def svf_run(data_root, tmp_path_factory):
    from conftest import tiny_run_args

    out = tmp_path_factory.mktemp("runs")
    assert main(["train", *tiny_run_args(data_root, out, "svf", "model.regime=svf", "svf.stages=[layer2]",
                                         "train.epochs=1", "train.val_every=0", "train.tensorboard=false")]) == 0
    return out / "svf"


def test_an_s_file_given_as_a_checkpoint_says_what_it_is(svf_run, tmp_path, capsys):
    s_file = svf_run / "trained_backbone.safetensors"
    image = tmp_path / "i.png"
    Image.fromarray(np.zeros((SIDE, SIDE, 3), np.uint8)).save(image)
    Image.fromarray(_square(255)).save(tmp_path / "m.png")
    for command, args in (("test", ["--checkpoint", str(s_file)]),
                          ("merge", ["--checkpoint", str(s_file), "--out", str(tmp_path / "m.pt")]),
                          ("predict", ["--checkpoint", str(s_file), "--support", str(image), str(tmp_path / "m.png"),
                                       "--query", str(image), "--out", str(tmp_path / "o")]),
                          ("serve", ["--checkpoint", str(s_file), "--port", "1"])):
        assert main([command, *args]) == 1, command
        line = error_line(capsys, command)
        assert f"{s_file}: expected an svfseg checkpoint" in line and "an S file" in line, line
        assert "svfseg.load_svf" in line and "unknown model" not in line


def test_merge_onto_a_full_disk_says_to_run_it_again_not_to_resume(svf_run, tmp_path, capsys, monkeypatch):
    from collections import namedtuple

    from svfseg.engine import checkpoint

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 0))
    assert main(["merge", "--checkpoint", str(svf_run / "best.pt"), "--out", str(tmp_path / "m.pt")]) == 1
    line = error_line(capsys, "merge")
    assert "free some space and run the merge again (nothing was written)" in line and "resume" not in line
    assert not (tmp_path / "m.pt").exists()
