"""Issue 30, item 9: what had not been tried: `report` over a multi-fold compare with a warm start,
`prepare custom` on hostile folders, serve's API with malformed bodies and its login under a brute force."""
import json

import numpy as np
import pytest
from PIL import Image

from svfseg.cli import main


# ---------------------------------------------------------------- report on a multi-fold compare with --warm-start


def _cell(out, fold, name, seed, *, warm=True, warm_steps=2, miou=0.5):
    """A compare cell as `svfseg compare --warm-start` leaves it (paths relative to where compare ran)."""
    folder = out / "runs" / f"fold{fold}_1shot"
    if warm:
        (folder / "warm_start").mkdir(parents=True, exist_ok=True)
        (folder / "warm_start" / "config.yaml").write_text(
            f"fold: {fold}\nseed: 10000\nname: warm_start\noutput_dir: {folder}\nmodel:\n  regime: frozen\n"
            f"train:\n  epochs: 1\n  steps_per_epoch: {warm_steps}\n")
        (folder / "warm_start" / "best.pt").write_bytes(b"")
    run = folder / name
    (run / "test").mkdir(parents=True)
    init = f"{out.name}/runs/fold{fold}_1shot/warm_start/best.pt" if warm else "null"
    (run / "config.yaml").write_text(f"fold: {fold}\nseed: {seed}\nname: {name}\noutput_dir: {folder}\n"
                                     f"model:\n  regime: svf\n  init_head: {init}\n"
                                     f"train:\n  val_episodes_file: {out}/episodes/val_base_fold{fold}_1shot.json\n")
    (run / "test" / "results.json").write_text(json.dumps({
        "checkpoint": str(run / "best.pt"), "benchmark": "pascal", "backbone": "resnet50_deep", "model": "pfenet",
        "regime": "svf", "shot": 1, "fold": fold, "protocol": "hsnet", "train_seed": seed,
        "runs": [{"episodes": 1000, "dataset_fingerprint": "d1"}], "summary": {"miou": {"mean": miou}}}))
    return run / "test" / "results.json"


def test_report_keeps_the_folds_of_a_warm_started_compare_in_one_row(tmp_path, capsys):
    out = tmp_path / "cmp"
    files = [_cell(out, f, f"svf_seed{s}", s, miou=0.4 + 0.1 * s) for f in (0, 1) for s in (0, 1)]
    assert main(["report", *map(str, files)]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| pascal")]
    assert len(rows) == 1, text  # one row: fold 0 and fold 1 of one experiment (each fold its own warm start file)
    assert "| PFENet + SVF | 45.00 ± 7.07 / 69.27 | 45.00 ± 7.07 / 73.55 |" in rows[0], rows[0]
    # a cold start, or a warm start of another length, is another experiment: never averaged as a seed
    other = [_cell(tmp_path / "cold", 0, "svf_seed2", 2, warm=False),
             _cell(tmp_path / "long", 0, "svf_seed3", 3, warm_steps=50)]
    assert main(["report", *map(str, files + other)]) == 0
    text = capsys.readouterr().out
    assert len([line for line in text.splitlines() if line.startswith("| pascal")]) == 3, text
    assert "train.steps_per_epoch': 2" in text and "train.steps_per_epoch': 50" in text


# ---------------------------------------------------------------- serve --auth under a burst of guesses


def test_a_burst_of_guesses_cannot_queue_the_real_user_out(caplog):
    import asyncio

    from svfseg.serve.auth import LoginGuard

    # Measured on a loopback server first: 60 parallel guesses, their clients gone after 3 s, kept the right
    # password waiting over 120 s (each queued guess still held the login for its 8 s).
    guard = LoginGuard("ann", "s3cret", base=0.01, cap=0.02, max_waiting=3)

    async def burst():
        guesses = await asyncio.gather(*(guard.check("ann", f"guess{i}") for i in range(50)))
        checked = guard.failures
        return guesses, checked, await guard.check("ann", "s3cret")

    guesses, checked, ok = asyncio.run(burst())
    assert not any(guesses) and checked == 3  # three checked in turn (rate-limited), 47 refused at once, unchecked
    assert sum("refused unchecked" in r.getMessage() for r in caplog.records) == 47
    assert ok and guard.failures == 0 and guard.waiting == 0


# ---------------------------------------------------------------- prepare custom on hostile folders


def _folders(tmp_path, ids, side=40):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for i, c in enumerate(ids):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(
            images / f"i{i}.png")
        m = np.zeros((side, side), np.uint8)
        m[5:30, 5:30] = c
        Image.fromarray(m).save(masks / f"i{i}.png")
    return images, masks


def test_prepare_custom_names_what_is_wrong_with_hostile_folders(tmp_path):
    from svfseg.data.custom import prepare_custom
    from svfseg.data.io import DataError

    images, masks = _folders(tmp_path, [1, 2, 3, 200] * 6)
    # class ids with a gap: C would be 200, with 196 classes that no mask shows (785 fold problems before)
    with pytest.raises(DataError, match=r"masks: expected class ids 1..C with each id in some mask .* found ids "
                                        r"\[1, 2, 3, 200\]: 196 id\(s\) below 200 in no mask"):
        prepare_custom(images, masks, tmp_path / "out", workers=1)
    # more ids than the class-name file names
    (tmp_path / "names.txt").write_text("a\nb\nc\n")
    with pytest.raises(DataError, match=r"i3.png: expected class ids 0..3 or 255 \(the class-name file has 3 names\), "
                                        r"found \[200\]"):
        prepare_custom(images, masks, tmp_path / "out", class_names=tmp_path / "names.txt", workers=1)
    # a folder that is a symbolic link to itself
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(DataError, match="loop: expected a folder of images, found a symbolic link that leads nowhere"):
        prepare_custom(tmp_path / "loop", masks, tmp_path / "out", workers=1)
    # a looping link inside the folder is not an image: skipped, and its mask is then named as unpaired
    (images / "i0.png").unlink()
    (images / "i0.png").symlink_to(images / "i0.png")
    with pytest.raises(DataError, match=r"1 mask\(s\) without an image .*\['i0'\]"):
        prepare_custom(images, masks, tmp_path / "out", workers=1)
    # one class: no novel/base split
    (tmp_path / "one").mkdir()
    one_i, one_m = _folders(tmp_path / "one", [1] * 8)
    with pytest.raises(DataError, match="expected at least 2 classes"):
        prepare_custom(one_i, one_m, tmp_path / "out1", workers=1)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out1").exists()
