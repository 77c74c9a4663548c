import numpy as np
import pytest
import torch

from covseg.errors import CovsegError
from covseg.model import Segmenter, UNet, build_model, class_index, load_checkpoint, predict_labels, save_checkpoint


@pytest.mark.parametrize("depth,base", [(1, 4), (3, 8), (4, 16)])
def test_unet_shapes(depth, base):
    model = UNet(base_channels=base, depth=depth)
    out = model(torch.zeros(2, 1, 64, 64))
    assert out.shape == (2, 4, 64, 64)
    assert len(model.down) == depth + 1 and model.down[-1][0].out_channels == base * 2 ** depth


def test_seed_recipe_is_the_plain_unet(params):
    seed = params.override({"model.base_channels": 64, "model.depth": 4, "model.norm": "none"})
    model = build_model(seed.model)
    assert isinstance(model.up[0], torch.nn.ConvTranspose2d)
    assert model.down[0][0].kernel_size == (3, 3)
    assert model.config == {"in_channels": 1, "num_classes": 4, "base_channels": 64, "depth": 4, "norm": "none"}


def test_a_checkpoint_of_a_network_this_version_does_not_build_is_one_error_naming_it(tmp_path):
    """A residual network (a lever removed from covseg) is refused by name, not with a TypeError."""
    save_checkpoint(Segmenter(UNet(base_channels=4, depth=2)), tmp_path / "m.pt")
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], "residual": True}}, tmp_path / "residual.pt")
    with pytest.raises(CovsegError, match=r"residual\.pt: a network config this version of covseg does not "
                                          r"build \(\['residual'\]"):
        load_checkpoint(tmp_path / "residual.pt")


@pytest.mark.parametrize("change, problem", [
    ({"config": {"base_channels": 256, "depth": 7}}, r"weights do not fit .*size mismatch"),  # 2 GB claimed
    ({"config": {"base_channels": 100000}}, r"config base_channels = 100000 is not a whole number in 1\.\.256"),
    ({"config": {"num_classes": 9}}, r"config num_classes = 9 is not a whole number in 4\.\.4"),
    ({"members": True}, r"'members' = True is not an ensemble size"),
    ({"scale": 50.0}, r"'scale' = 50\.0 is not in \(0, 1\]"),
    ({"scale": float("nan")}, r"'scale' = nan is not in"),
    ({"class_bias": [1e9, 0, 0, 0]}, r"inference choices .* are not 4 offsets"),
    ({"min_island": -1}, r"inference choices .* are not 4 offsets"),
    ({"state_dict": None}, r"no state_dict of weights"),
])
def test_a_checkpoint_is_data_checked_before_a_network_is_built(tmp_path, change, problem):
    """A registry version's checkpoint decides no size: its facts are checked, and the network is built on
    meta tensors and takes the file's weights, so a small file cannot claim gigabytes."""
    save_checkpoint(Segmenter(UNet(base_channels=4, depth=2)), tmp_path / "m.pt")
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    if "config" in change:
        change = {**change, "config": {**ckpt["config"], **change["config"]}}
    torch.save({**ckpt, **change}, tmp_path / "bad.pt")
    with pytest.raises(CovsegError, match=problem):
        load_checkpoint(tmp_path / "bad.pt")


def test_predict_at_half_scale_returns_full_size(tmp_path):
    torch.manual_seed(0)
    model = Segmenter(UNet(base_channels=4, depth=2), scale=0.5)
    images = np.random.default_rng(0).random((3, 32, 32), dtype=np.float32)
    labels = predict_labels(model, images, batch_size=2)
    assert labels.shape == (3, 32, 32) and labels.dtype == np.uint8 and labels.max() <= 3
    save_checkpoint(model, tmp_path / "m.pt", epoch=3)
    loaded, ckpt = load_checkpoint(tmp_path / "m.pt")
    assert loaded.scale == 0.5 and ckpt["epoch"] == 3
    assert np.array_equal(predict_labels(loaded, images, 2), labels)


@pytest.mark.parametrize("size,scale", [(30, 1.0), (52, 0.5), (520, 0.5)])
def test_any_slice_size_is_padded_and_cropped_back(size, scale):
    torch.manual_seed(0)
    model = Segmenter(UNet(base_channels=2, depth=4), scale=scale)
    images = np.random.default_rng(0).random((1, size, size + 6), dtype=np.float32)
    assert predict_labels(model, images).shape == (1, size, size + 6)


def test_training_takes_a_size_the_network_does_not_divide(params, tmp_path):
    from covseg.data import one_hot_to_index, synthesize
    from covseg.preprocessing import window
    from covseg.training import train

    images, masks, _ = synthesize(6, 1, 36, seed=2)  # 36 * 0.5 = 18: not a multiple of 2**4
    x, y = window(images[..., 0]), one_hot_to_index(masks)
    p = params.override({"train.epochs": 1, "train.members": 1, "model.base_channels": 2, "model.depth": 4})
    history = train(p.train, p.model, p.seed, x[:4], y[:4], x[4:], y[4:], tmp_path / "m.pt")
    assert len(history) == 1 and (tmp_path / "m.pt").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a CUDA GPU")
def test_a_gpu_device_on_a_machine_without_one_is_one_error():
    """recipe gpu (train.device cuda) on a CPU machine: one line, not torch's AssertionError mid-stage."""
    from covseg.model import pick_device

    with pytest.raises(CovsegError, match="device 'cuda': this machine has no CUDA GPU"):
        pick_device("cuda")
    with pytest.raises(CovsegError, match="device 'cuda:1'"):
        pick_device("cuda:1")
    assert pick_device("cpu").type == "cpu"


def test_class_index_is_argmax_over_the_classes_ties_to_the_lower():
    logits = torch.randn(3, 4, 9, 7)
    logits[0, :, 0, 0] = torch.tensor([1.0, 2.0, 2.0, 0.0])  # a tie between classes 1 and 2
    logits[1, :, 2, 3] = 5.0  # all four tie
    found = class_index(logits)
    assert found.dtype == torch.uint8 and found.shape == (3, 9, 7)
    assert torch.equal(found.long(), logits.argmax(1)) and found[0, 0, 0] == 1 and found[1, 2, 3] == 0
