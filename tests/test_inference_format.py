"""A checkpoint loads for test/predict/serve in its recipe's memory format (``train.channels_last``)."""
import torch

from svfseg.cli import main
from conftest import tiny_run_args


def test_a_checkpoint_loads_for_inference_in_its_recipes_memory_format(data_root, tmp_path):
    """`train.channels_last` (the demo recipe's) holds at test/predict/serve time too, with the same scores."""
    from svfseg.engine.model import load_for_inference

    assert main(["train", *tiny_run_args(data_root, tmp_path, "nhwc", "model.regime=svf", "train.val_every=0")]) == 0
    model, cfg, _ = load_for_inference(tmp_path / "nhwc" / "best.pt")
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.dim() == 4]
    assert cfg.train.channels_last and convs
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    plain, _, _ = load_for_inference(tmp_path / "nhwc" / "best.pt")
    plain.to(memory_format=torch.contiguous_format)
    x = torch.rand(2, 3, 40, 40)
    masks = (torch.rand(2, 1, 40, 40) > 0.5).float()
    with torch.no_grad():
        a, b = model(x, x.unsqueeze(1), masks), plain(x, x.unsqueeze(1), masks)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
