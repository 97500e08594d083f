"""`svfseg convert`'s key maps against the upstream state-dict manifests (tests/fixtures/upstream/*.json).

The manifests hold every key, shape and dtype of PFENet's and BAM's models as upstream builds them
(the command and script that dumped them are in each file's header); a stand-in checkpoint made from
one has upstream's exact names, so a rename the key map gets wrong fails here without upstream code.
"""
from pathlib import Path

import pytest
import torch

from svfseg.cli import main
from svfseg.convert import FORMATS, Manifest, convert_checkpoint
from svfseg.convert.converter import target_config
from svfseg.engine import checkpoint as ckpt
from svfseg.engine.model import MERGED_FORMAT, build_model
from svfseg.engine.resolved import resolve_run

FIXTURES = Path(__file__).parent / "fixtures" / "upstream"

#: manifest -> (format, backbone, shot): PFENet on ResNet-50 (deep stem) and VGG16-BN, BAM's meta
#: learner 1- and 5-shot, BAM's stage-1 PSPNet.
CASES = {
    "pfenet_resnet50_deep": ("pfenet", "resnet50_deep", 1),
    "pfenet_vgg16_bn": ("pfenet", "vgg16_bn", 1),
    "bam_resnet50_deep_pascal_1shot": ("bam", "resnet50_deep", 1),
    "bam_resnet50_deep_pascal_5shot": ("bam", "resnet50_deep", 5),
    "bam_base_resnet50_deep_pascal": ("bam_base", "resnet50_deep", 1),
}


@pytest.fixture(scope="module")
def targets():
    """svfseg's model of each case (frozen regime, random weights), built once."""
    cache = {}

    def get(name):
        if name not in cache:
            fmt, backbone, shot = CASES[name]
            head = {"kshot_dim": 2} if fmt == "bam" and shot > 1 else {}
            cache[name] = build_model(resolve_run(target_config(fmt, backbone, "pascal", 0, shot, head)), pretrained=False)
        return cache[name]

    return get


def _manifest(name):
    return Manifest.load(FIXTURES / f"{name}.json")


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_upstream_key_lands_with_its_shape(name, targets):
    manifest, (fmt, _, _) = _manifest(name), CASES[name]
    keymap = FORMATS[fmt]
    upstream = manifest.fake_state(seed=1, keymap=keymap)
    own = targets(name).state_dict()
    mapped = keymap.to_svfseg(upstream, own, name)  # raises on a missing, unused or mis-shaped key
    assert set(mapped) == set(own)
    for key, value in mapped.items():
        assert value.shape == own[key].shape and value.dtype == own[key].dtype, key
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, upstream[keymap.upstream_key(key)]), key
    assert len({keymap.upstream_key(k) for k in own}) <= len(manifest.keys)


@pytest.mark.parametrize("name", sorted(CASES))
def test_svfseg_to_upstream_to_svfseg_round_trips_bitwise(name, targets):
    manifest, (fmt, _, _) = _manifest(name), CASES[name]
    keymap = FORMATS[fmt]
    own = {k: v.clone() for k, v in targets(name).state_dict().items()}
    up = keymap.to_upstream(own)
    assert [(k, tuple(up[k].shape), str(up[k].dtype).removeprefix("torch.")) for k, _, _ in manifest.keys] \
        == [(k, s, d) for k, s, d in manifest.keys]
    assert set(up) == {k for k, _, _ in manifest.keys}
    back = keymap.to_svfseg(up, own, name)
    assert set(back) == set(own) and all(torch.equal(back[k], own[k]) for k in own)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_upstream_module_keeps_its_order(name, targets):
    # Names and shapes cannot tell two equal-shaped convs of one block apart (beta_conv.i.0 / .2, the ASPP's
    # 3x3 branches); the order can: both sides register a Sequential's layers in the order they run, so within
    # every upstream module the mapped svfseg keys must come in the manifest's order.
    manifest, (fmt, _, _) = _manifest(name), CASES[name]
    keymap = FORMATS[fmt]
    mapped = list(dict.fromkeys(keymap.upstream_key(k) for k in targets(name).state_dict()))
    for top in {k.split(".")[0] for k, _, _ in manifest.keys}:
        ours = [k for k in mapped if k.split(".")[0] == top]
        theirs = [k for k, _, _ in manifest.keys if k.split(".")[0] == top and k in set(mapped)]
        assert ours == theirs, top


def test_bam_aspp_branches_keep_their_rates(targets):
    # chunbolang/BAM model/ASPP.py: layer6_0 the image pooling 1x1, layer6_1 a 1x1, layer6_2/3/4 3x3 at 6/12/18
    model = targets("bam_resnet50_deep_pascal_1shot")
    rates = {"ASPP_meta.layer6_1.0.weight": 1, "ASPP_meta.layer6_2.0.weight": 6,
             "ASPP_meta.layer6_3.0.weight": 12, "ASPP_meta.layer6_4.0.weight": 18}
    by_upstream = {FORMATS["bam"].upstream_key(k): k for k in model.state_dict()}
    for up, rate in rates.items():
        conv = model.get_submodule(by_upstream[up].rsplit(".", 1)[0])
        assert conv.dilation == (rate, rate), up
    assert by_upstream["ASPP_meta.layer6_0.0.weight"] == "aspp.image_pool.0.weight"


def test_bam_copies_must_agree_to_go_upstream(targets):
    own = dict(targets("bam_resnet50_deep_pascal_1shot").state_dict())
    own["base_learner.backbone.layer4.0.conv1.weight"] = own["base_learner.backbone.layer4.0.conv1.weight"] + 1
    with pytest.raises(ValueError, match="layer4.0.conv1.weight.*one tensor"):
        FORMATS["bam"].to_upstream(own)


def test_missing_unexpected_and_misshaped_keys_are_one_error(targets):
    up = _manifest("pfenet_resnet50_deep").fake_state()
    del up["layer2.0.conv1.weight"], up["res2.2.weight"]
    up["extra.weight"] = torch.zeros(3)
    up["cls.3.weight"] = torch.zeros(3, 256, 1, 1)
    with pytest.raises(ckpt.CheckpointMismatch) as e:
        FORMATS["pfenet"].to_svfseg(up, targets("pfenet_resnet50_deep").state_dict(), "f.pth")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("f.pth: expected the pfenet state dict")
    assert "2 missing [layer2.0.conv1.weight, res2.2.weight]" in msg
    assert "1 unexpected [extra.weight]" in msg
    assert "1 of another shape [cls.3.weight (3, 256, 1, 1), expected (2, 256, 1, 1)]" in msg


def test_alias_with_another_value_is_refused(targets):
    up = _manifest("bam_base_resnet50_deep_pascal").fake_state(keymap=FORMATS["bam_base"])
    up["encoder.4.0.conv1.weight"] = up["encoder.4.0.conv1.weight"] + 1
    with pytest.raises(ckpt.CheckpointMismatch, match=r"1 repeated with another value \[encoder.4.0.conv1.weight "
                                                      r"!= layer4.0.conv1.weight\]"):
        FORMATS["bam_base"].to_svfseg(up, targets("bam_base_resnet50_deep_pascal").state_dict(), "f")


def test_missing_batchnorm_counters_convert(targets):
    # files saved before torch 0.4.1 have no num_batches_tracked; eval mode never reads it
    up = {k: v for k, v in _manifest("pfenet_vgg16_bn").fake_state().items() if "num_batches_tracked" not in k}
    own = targets("pfenet_vgg16_bn").state_dict()
    mapped = FORMATS["pfenet"].to_svfseg(up, own, "f")
    assert set(mapped) == set(own)


def _save_upstream(path, state, prefix=""):
    # upstream's train.py: torch.save({'epoch', 'state_dict': model.state_dict(), 'optimizer'}, ...)
    torch.save({"epoch": 107, "state_dict": {prefix + k: v for k, v in state.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0]}]}}, path)
    return path


def test_cli_converts_a_dataparallel_bam_file_and_records_its_source(tmp_path, capsys):
    up = _manifest("bam_resnet50_deep_pascal_5shot").fake_state(seed=3, keymap=FORMATS["bam"])
    src = _save_upstream(tmp_path / "train5_epoch_47_0.6897.pth", up, prefix="module.")
    out = tmp_path / "bam.pt"
    assert main(["convert", "--from", "bam", str(src), "--fold", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bam on resnet50_deep, pascal fold 2, 5-shot (read from the file: backbone, benchmark, shot)" in printed
    blob = torch.load(out, weights_only=True)
    assert blob["format"] == MERGED_FORMAT and blob["config"]["fold"] == 2 and blob["config"]["shot"] == 5
    assert blob["describe"]["regime"] == "frozen" and blob["describe"]["head"]["kshot_dim"] == 2
    record = blob["converted_from"]
    assert record["file"] == src.name and record["format"] == "bam" and record["sha256"] == convert_sha(src)
    assert torch.equal(blob["model"]["aspp.branches.3.0.weight"], up["ASPP_meta.layer6_4.0.weight"])
    assert torch.equal(blob["model"]["base_learner.backbone.layer0.conv2.weight"], up["layer0.3.weight"])

    from svfseg.serve.sources import checkpoint_record

    rec = checkpoint_record(out)
    assert rec.regime == "converted" and "converted from bam `train5_epoch_47_0.6897.pth` (sha256 " in rec.data_text


def convert_sha(path):
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_cli_one_line_for_truncated_foreign_and_misnamed_files(tmp_path, capsys):
    up = _manifest("pfenet_vgg16_bn").fake_state()
    good = _save_upstream(tmp_path / "pfenet.pth", up)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    foreign = tmp_path / "notes.pth"
    foreign.write_text("not a checkpoint\n")
    cases = {truncated: "truncated, corrupt or foreign file", foreign: "expected a weight file of tensors"}
    for path, expected in cases.items():
        assert main(["convert", "--from", "pfenet", str(path), "--out", str(tmp_path / "x.pt")]) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and expected in err and str(path) in err, err
    # a file of another upstream format names the right --from
    assert main(["convert", "--from", "bam", str(good), "--out", str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "found the keys of a pfenet checkpoint; convert it with --from pfenet" in err
    # settings the file contradicts
    assert main(["convert", "--from", "pfenet", str(good), "--backbone", "resnet50_deep",
                 "--out", str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err.strip()
    assert "--backbone resnet50_deep: the file holds a backbone vgg16_bn" in err
    assert not (tmp_path / "x.pt").exists()


def test_existing_out_is_refused(tmp_path):
    src = _save_upstream(tmp_path / "p.pth", _manifest("pfenet_vgg16_bn").fake_state())
    (tmp_path / "out.pt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_checkpoint(src, "pfenet", tmp_path / "out.pt")
    with pytest.raises(FileExistsError):
        convert_checkpoint(src, "pfenet", src, overwrite=True)
    assert (tmp_path / "out.pt").read_text() == "keep me"
