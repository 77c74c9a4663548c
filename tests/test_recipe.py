"""The training recipe's levers: crops, schedule, checkpoint choice, test-time flips, island removal,
warm start, the shipped recipes, per-slice Dice, training on every slice, and training that resumes."""

import re

import numpy as np
import pytest
import torch
from projects import ROOT

from covseg.data import one_hot_to_index, synthesize
from covseg.errors import CovsegError, ParamsError
from covseg.evaluation import confusion_matrix, dice_metrics, per_slice_dice, summary_metrics
from covseg.model import (
    Ensemble,
    Segmenter,
    UNet,
    load_checkpoint,
    members,
    predict_labels,
    predict_logits,
    save_checkpoint,
)
from covseg.names import PATHS
from covseg.params import compose, recipes
from covseg.preprocessing import window
from covseg.training import augmentation, make_loss, make_optimizer, train

TINY_TRAIN = {"model.base_channels": 4, "model.depth": 2, "train.epochs": 3, "train.crop": 32,
              "train.val_every": 2, "train.warmup_epochs": 1, "train.members": 1}


@pytest.fixture(scope="module")
def slices():
    images, masks, _ = synthesize(8, 1, 64, seed=3)
    return window(images[..., 0]), one_hot_to_index(masks)


# ------------------------------------------------------------------------------------------ training


def test_crops_are_the_crop_size_and_centred_on_every_class(params, slices):
    x, y = slices
    t = params.override({"train.crop": 32, "train.crops_per_slice": 8, "train.augment": False}).train
    crops = augmentation(t, 64, seed=0)({"image": torch.from_numpy(x[:1]), "label": torch.from_numpy(y[:1])})
    assert len(crops) == 8 and all(c["image"].shape == (1, 32, 32) for c in crops)
    centres = [int(c["label"][0, 16, 16]) for c in crops]  # RandCropByLabelClasses: centre on a class
    assert len(set(centres)) >= 3, centres


def test_warmup_then_cosine_schedule(params):
    t = params.override({"train.epochs": 10, "train.warmup_epochs": 2, "train.lr": 1.0,
                         "train.optimizer": "adamw"}).train
    optimizer, scheduler = make_optimizer(t, torch.nn.Linear(1, 1))
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.05
    assert isinstance(optimizer, torch.optim.AdamW)


@pytest.mark.parametrize("select,expected_epoch", [("last", 3), ("best", None)])
def test_checkpoint_is_the_last_epoch_or_the_best(params, slices, tmp_path, select, expected_epoch):
    x, y = slices
    p = params.override({**TINY_TRAIN, "train.select": select})
    history = train(p.train, p.model, p.seed, x[:6], y[:6], x[6:], y[6:], tmp_path / "m.pt")
    scored = history.dropna(subset=["val_loss"])
    assert scored["epoch"].tolist() == [2, 3], "validation every val_every epochs and at the last"
    _, ckpt = load_checkpoint(tmp_path / "m.pt")
    best = int(scored.loc[scored["val_kaggle_f1"].idxmax(), "epoch"])
    assert ckpt["epoch"] == (expected_epoch or best)


def test_warm_start_begins_from_the_given_weights(params, slices, tmp_path):
    x, y = slices
    torch.manual_seed(5)
    source = Segmenter(UNet(base_channels=4, depth=2))
    save_checkpoint(source, tmp_path / "init.pt")
    p = params.override({**TINY_TRAIN, "train.lr": 0.0, "train.init": str(tmp_path / "init.pt")})
    train(p.train, p.model, p.seed, x[:6], y[:6], x[6:], y[6:], tmp_path / "m.pt")
    trained, _ = load_checkpoint(tmp_path / "m.pt")
    for name, value in source.unet.state_dict().items():
        if "running" not in name and "num_batches" not in name:  # batch-norm statistics still move
            assert torch.equal(trained.unet.state_dict()[name], value), name


def test_warm_start_from_another_network_is_one_clear_error(params, slices, tmp_path):
    x, y = slices
    save_checkpoint(Segmenter(UNet(base_channels=8, depth=2)), tmp_path / "other.pt")
    p = params.override({**TINY_TRAIN, "train.init": str(tmp_path / "other.pt")})
    with pytest.raises(CovsegError, match=r"train\.init = .*other\.pt.*does not match params\.yaml:model"):
        train(p.train, p.model, p.seed, x[:6], y[:6], x[6:], y[6:], tmp_path / "m.pt")


def test_the_loss_is_monais_dice_ce_or_the_seeds_cross_entropy(params):
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 16, 16), torch.randint(0, 4, (2, 16, 16))
    for loss in ("dice_ce", "ce"):
        t = params.override({"train.loss": loss}).train
        fn = make_loss(t, torch.device("cpu"))
        weight = torch.tensor(t.class_weights)
        reference = (DiceCELoss(to_onehot_y=True, softmax=True, weight=weight)(logits, target[:, None])
                     if loss == "dice_ce" else torch.nn.functional.cross_entropy(logits, target, weight=weight))
        assert fn(logits, target) == pytest.approx(float(reference), rel=1e-6), loss


# ------------------------------------------------------------------------------------------ inference


def test_flip_tta_makes_the_model_mirror_symmetric(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 40)
    plain, tta = Segmenter(UNet(base_channels=4, depth=2)).eval(), None
    tta = Segmenter(plain.unet, tta=True).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(x.flip(-1)), plain(x).flip(-1), atol=1e-4)
        assert torch.allclose(tta(x.flip(-1)), tta(x).flip(-1), atol=1e-5)
    save_checkpoint(Segmenter(plain.unet, 0.5, tta=True, min_island=7, class_bias=[1, -2, 0, 0]), tmp_path / "m.pt")
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    assert (loaded.scale, loaded.tta, loaded.min_island, loaded.class_bias) == (0.5, True, 7, [1, -2, 0, 0])


def test_class_bias_is_added_to_the_models_logits():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16)
    plain = Segmenter(UNet(base_channels=2, depth=1)).eval()
    biased = Segmenter(plain.unet, class_bias=[0.5, 0.0, 0.0, -3.0]).eval()
    with torch.no_grad():
        diff = biased(x) - plain(x)
    assert torch.allclose(diff, torch.tensor([0.5, 0.0, 0.0, -3.0])[:, None, None].expand_as(diff))
    assert plain.class_bias == [0.0] * 4


def test_small_findings_take_the_next_most_likely_class():
    logits = torch.zeros(1, 4, 20, 20)
    logits[0, 3] = 1.0                      # background everywhere ...
    logits[0, 2, :, 10:] = 2.0              # ... lung on the right half
    logits[0, 0, 2:4, 2:4] = 3.0            # a 4-pixel ground-glass speck in the background
    logits[0, 1, 10:18, 12:18] = 3.0        # a 48-pixel consolidation in the lung
    labels = Segmenter(UNet(base_channels=2, depth=1), min_island=10).postprocess(logits)[0]
    assert (labels[2:4, 2:4] == 3).all(), "the speck becomes background, its next most likely class"
    assert (labels[10:18, 12:18] == 1).all(), "a finding at least min_island pixels is kept"
    assert torch.equal(Segmenter(UNet(base_channels=2, depth=1)).postprocess(logits)[0], logits[0].argmax(0).byte())


def test_per_slice_dice_is_monais_with_empty_slices_ignored():
    from monai.metrics import compute_dice

    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 4, (5, 16, 16)), rng.integers(0, 4, (5, 16, 16))
    labels[1][labels[1] == 1] = 2           # slice 1 has no consolidation

    def one_hot(a):
        return torch.nn.functional.one_hot(torch.from_numpy(a), 4).permute(0, 3, 1, 2)

    monai = compute_dice(one_hot(preds), one_hot(labels), include_background=True, ignore_empty=True)[:, :2]
    np.testing.assert_allclose(per_slice_dice(labels, preds), monai.numpy(), rtol=1e-6)
    assert np.isnan(per_slice_dice(labels, preds)[1, 1])


def test_per_slice_dice_ignores_slices_without_the_class():
    labels = np.full((3, 4, 4), 3, dtype=np.uint8)
    preds = labels.copy()
    labels[0, :2, :2] = 0                   # slice 0: 4 pixels of ground glass, half found
    preds[0, :2, :1] = 0
    preds[1, 0, 0] = 0                      # slice 1: no ground glass, one false pixel
    labels[2, :2, :] = 1                    # slice 2: consolidation, all found
    preds[2, :2, :] = 1
    dice = per_slice_dice(labels, preds)
    assert dice[0, 0] == pytest.approx(2 * 2 / (4 + 2)) and np.isnan(dice[1, 0]) and np.isnan(dice[2, 0])
    assert dice[2, 1] == pytest.approx(1.0) and np.isnan(dice[0, 1])
    assert dice_metrics(labels, preds) == pytest.approx({"dice_ggo": 2 / 3, "dice_consolidation": 1.0})


# ------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("name", recipes(ROOT / PATHS.conf))
def test_every_shipped_recipe_trains(slices, tmp_path, name):
    """Each recipe's own data path (no augmentation, crops, whole slices), shrunk to a tiny network."""
    _, p = compose([f"recipe={name}", "model.base_channels=4", "model.depth=2", "train.epochs=1", "train.members=1",
                    "train.device=cpu"], ROOT / PATHS.conf)
    x, y = slices
    history = train(p.train, p.model, p.seed, x[:6], y[:6], x[6:], y[6:], tmp_path / "m.pt")
    assert len(history) == 1 and np.isfinite(history["train_loss"]).all()


def test_the_shipped_model_trains_on_every_slice_without_validation(params, slices, tmp_path):
    x, y = slices
    p = params.override({**TINY_TRAIN, "train.epochs": 2})
    empty = (x[:0], y[:0])
    history = train(p.train, p.model, p.seed, x, y, *empty, tmp_path / "m.pt")
    assert list(history["epoch"]) == [1, 2] and "val_loss" not in history.columns
    model, ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt["epoch"] == 2 and ckpt["val_kaggle_f1"] is None
    assert (model.class_bias, model.tta, model.min_island) == ([0.0] * 4, False, 0), "saved without choices"
    with pytest.raises(ParamsError, match="train.select: best .* no slice is held out"):
        train(p.override({"train.select": "best"}).train, p.model, p.seed, x, y, *empty, tmp_path / "b.pt")


class Killed(Exception):
    pass


@pytest.mark.parametrize("select,killed_after", [("last", 2), ("best", 2)])
def test_a_killed_training_resumes_to_the_same_result(params, slices, tmp_path, select, killed_after):
    x, y = slices
    p = params.override({**TINY_TRAIN, "train.epochs": 4, "train.val_every": 1, "train.select": select})
    data = (x[:5], y[:5], x[5:6], y[5:6])
    whole = train(p.train, p.model, p.seed, *data, tmp_path / "whole.pt", state=tmp_path / "whole.state")

    def kill(row):
        if row["epoch"] == killed_after:
            raise Killed

    with pytest.raises(Killed):
        train(p.train, p.model, p.seed, *data, tmp_path / "m.pt", on_epoch=kill, state=tmp_path / "m.state")
    (tmp_path / "m.pt").unlink(missing_ok=True)  # DVC removes a stage's outputs before it runs again
    seen = []
    resumed = train(p.train, p.model, p.seed, *data, tmp_path / "m.pt", on_epoch=seen.append,
                    state=tmp_path / "m.state")
    assert [r["epoch"] for r in seen] == [1, 2, 3, 4], "the earlier epochs are reported again (MLflow)"
    columns = [c for c in whole.columns if c != "seconds"]
    pd_whole, pd_resumed = whole[columns].to_numpy(), resumed[columns].to_numpy()
    assert np.allclose(pd_whole, pd_resumed, atol=1e-6, equal_nan=True)
    a, ca = load_checkpoint(tmp_path / "whole.pt")
    b, cb = load_checkpoint(tmp_path / "m.pt")
    assert ca["epoch"] == cb["epoch"]
    assert all(torch.allclose(v, b.unet.state_dict()[k], atol=1e-6) for k, v in a.unet.state_dict().items()
               if v.is_floating_point())


def test_a_finished_or_other_training_is_not_resumed(params, slices, tmp_path):
    x, y = slices
    p = params.override({**TINY_TRAIN, "train.epochs": 2})
    data = (x[:6], y[:6], x[6:], y[6:])
    train(p.train, p.model, p.seed, *data, tmp_path / "m.pt", state=tmp_path / "m.state")
    seen = []
    train(p.train, p.model, p.seed, *data, tmp_path / "m.pt", on_epoch=seen.append, state=tmp_path / "m.state")
    assert len(seen) == 2, "a finished run starts afresh"

    def kill(row):
        raise Killed

    with pytest.raises(Killed):
        train(p.train, p.model, p.seed, *data, tmp_path / "m.pt", on_epoch=kill, state=tmp_path / "m.state")
    seen = []
    q = p.override({"train.lr": 0.01})
    train(q.train, q.model, q.seed, *data, tmp_path / "m.pt", on_epoch=seen.append, state=tmp_path / "m.state")
    assert [r["epoch"] for r in seen] == [1, 2], "a state of other params is not resumed"


def test_a_training_killed_under_other_code_is_not_resumed(params, slices, tmp_path, monkeypatch):
    """Resumed across a code change, the history would mix two codes' epochs (it once did: val_loss)."""
    from covseg import training

    x, y = slices
    p = params.override({**TINY_TRAIN, "train.epochs": 2})
    data = (x[:6], y[:6], x[6:], y[6:])

    def kill(row):
        raise Killed

    with pytest.raises(Killed):
        train(p.train, p.model, p.seed, *data, tmp_path / "m.pt", on_epoch=kill, state=tmp_path / "m.state")
    monkeypatch.setattr(training, "code_version", lambda: "edited")
    seen = []
    train(p.train, p.model, p.seed, *data, tmp_path / "m.pt", on_epoch=seen.append, state=tmp_path / "m.state")
    assert [r["epoch"] for r in seen] == [1, 2], "started afresh"


# ------------------------------------------------------------------------------------------ ensembles, precision


def count_steps(monkeypatch) -> list:
    """The optimizer steps the trainings from here on take (one item each)."""
    from covseg import training

    steps, make_optimizer = [], training.make_optimizer

    def counting(t, net):
        optimizer, scheduler = make_optimizer(t, net)
        step = optimizer.step
        optimizer.step = lambda *a, **k: steps.append(1) or step(*a, **k)
        return optimizer, scheduler

    monkeypatch.setattr(training, "make_optimizer", counting)
    return steps


def test_an_ensemble_is_its_members_each_trained_from_its_own_seed(params, slices, tmp_path):
    x, y = slices
    p = params.override({**TINY_TRAIN, "train.members": 2})
    data = (x[:6], y[:6], x[6:], y[6:])
    history = train(p.train, p.model, p.seed, *data, tmp_path / "ens.pt")
    single = p.override({"train.members": 1})
    train(single.train, single.model, p.seed, *data, tmp_path / "one.pt")
    ens, ckpt = load_checkpoint(tmp_path / "ens.pt")
    one, _ = load_checkpoint(tmp_path / "one.pt")
    first, second = members(ens.unet)
    assert ckpt["members"] == 2 and isinstance(ens.unet, Ensemble)
    assert history["member"].tolist() == [0, 0, 0, 1, 1, 1] and history["epoch"].tolist() == [1, 2, 3, 4, 5, 6]
    for name, value in one.unet.state_dict().items():  # member 0 is the one-network training
        assert torch.equal(first.state_dict()[name], value), name
    assert not torch.equal(first.head.weight, second.head.weight), "member 1 from another seed"
    images = x[6:]
    mean = (predict_logits(Segmenter(first), images) + predict_logits(Segmenter(second), images)) / 2
    np.testing.assert_allclose(predict_logits(Segmenter(ens.unet), images), mean, atol=1e-5)
    facts = ckpt["val_kaggle_f1"]
    assert facts == pytest.approx(summary_metrics(confusion_matrix(y[6:], predict_labels(ens, images)))["kaggle_f1"])


def test_a_killed_ensemble_resumes_without_training_its_finished_members_again(params, slices, tmp_path, monkeypatch):
    x, y = slices
    p = params.override({**TINY_TRAIN, "train.members": 2})
    data = (x[:6], y[:6], x[6:], y[6:])
    whole = train(p.train, p.model, p.seed, *data, tmp_path / "whole.pt", state=tmp_path / "w" / "state.pt")

    def kill(row):
        if row["epoch"] == 5:  # member 1's second epoch
            raise Killed

    with pytest.raises(Killed):
        train(p.train, p.model, p.seed, *data, tmp_path / "m.pt", on_epoch=kill, state=tmp_path / "s" / "state.pt")
    steps = count_steps(monkeypatch)
    seen = []
    resumed = train(p.train, p.model, p.seed, *data, tmp_path / "m.pt", on_epoch=seen.append,
                    state=tmp_path / "s" / "state.pt")
    assert len(steps) == 3, "one epoch (3 batches of 2) of member 1 is left; member 0 is not trained again"
    assert [r["epoch"] for r in seen] == [1, 2, 3, 4, 5, 6]
    columns = [c for c in whole.columns if c != "seconds"]
    assert np.allclose(whole[columns].to_numpy(), resumed[columns].to_numpy(), atol=1e-6, equal_nan=True)
    a, _ = load_checkpoint(tmp_path / "whole.pt")
    b, _ = load_checkpoint(tmp_path / "m.pt")
    assert all(torch.allclose(v, b.unet.state_dict()[k], atol=1e-6) for k, v in a.unet.state_dict().items()
               if v.is_floating_point())


@pytest.mark.parametrize("amp,native", [(True, True), (True, False), (False, True)])
def test_amp_trains_in_bfloat16_on_a_cpu_that_has_it_and_says_so_in_the_recipe(params, slices, tmp_path, monkeypatch,
                                                                               amp, native):
    from covseg import training
    from covseg.params import recipe_key

    x, y = slices
    p = params.override({**TINY_TRAIN, "train.epochs": 1, "train.amp": amp, "train.device": "cpu"})
    monkeypatch.setattr(training, "bf16_autocast", lambda device: native)
    used, autocast = [], torch.autocast

    def spy(device_type, dtype=None, enabled=True, **kw):
        used.append((device_type, dtype, enabled))
        return autocast(device_type, dtype, enabled=enabled, **kw)

    monkeypatch.setattr(training.torch, "autocast", spy)
    train(p.train, p.model, p.seed, x[:6], y[:6], x[6:], y[6:], tmp_path / "m.pt")
    assert used and all(u == ("cpu", torch.bfloat16, amp and native) for u in used)
    key, cv_key = training.recipe_key(p.train, p.model, p.seed), recipe_key(p.seed, p.model, p.train, "d")
    monkeypatch.setattr(training, "bf16_autocast", lambda device: not native)  # another machine
    assert (training.recipe_key(p.train, p.model, p.seed) != key) == amp, "a state of the other precision"
    assert recipe_key(p.seed, p.model, p.train, "d") == cv_key, "CV folds and calibrations hold on any machine"


def test_a_warm_started_ensemble_trains_its_finished_members_again(params, slices, tmp_path, monkeypatch):
    """The warm start's source (a registry alias, a file) may have moved since: nothing is reused."""
    x, y = slices
    save_checkpoint(Segmenter(UNet(base_channels=4, depth=2)), tmp_path / "init.pt")
    p = params.override({**TINY_TRAIN, "train.members": 2, "train.init": str(tmp_path / "init.pt")})
    data = (x[:6], y[:6], x[6:], y[6:])
    train(p.train, p.model, p.seed, *data, tmp_path / "m.pt", state=tmp_path / "s" / "state.pt")
    steps = count_steps(monkeypatch)
    train(p.train, p.model, p.seed, *data, tmp_path / "m.pt", state=tmp_path / "s" / "state.pt")
    assert len(steps) == 2 * 3 * 3, "both members, 3 epochs of 3 batches each"


def test_an_ensemble_keeps_the_last_epoch_and_a_checkpoint_names_a_bad_size(params, tmp_path):
    with pytest.raises(ParamsError, match=r"train\.members = 2 is not allowed: .*train\.select: best"):
        params.override({"train.members": 2, "train.select": "best"})
    torch.save({"config": UNet(base_channels=2, depth=1).config, "scale": 1.0, "members": 10 ** 6,
                "state_dict": {}}, tmp_path / "m.pt")
    with pytest.raises(CovsegError, match=r"m\.pt: 'members' = 1000000 is not an ensemble size"):
        load_checkpoint(tmp_path / "m.pt")


def test_an_ensemble_warm_starts_each_member_from_the_sources_own(params, slices, tmp_path):
    x, y = slices
    torch.manual_seed(5)
    source = Ensemble([UNet(base_channels=4, depth=2), UNet(base_channels=4, depth=2)])
    save_checkpoint(Segmenter(source), tmp_path / "init.pt")
    p = params.override({**TINY_TRAIN, "train.lr": 0.0, "train.members": 2, "train.init": str(tmp_path / "init.pt")})
    train(p.train, p.model, p.seed, x[:6], y[:6], x[6:], y[6:], tmp_path / "m.pt")
    trained, _ = load_checkpoint(tmp_path / "m.pt")
    for mine, theirs in zip(members(trained.unet), members(source), strict=True):
        assert torch.equal(mine.head.weight, theirs.head.weight)


def test_training_shows_one_progress_bar_over_every_epoch_of_every_member(params, slices, tmp_path, monkeypatch):
    """The bar's total is members x epochs and it moves once an epoch (its ETA is tqdm's); on_epoch still runs."""
    from covseg import training

    bars = []

    class RecordingTqdm(training.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
            self.ticks = 0
            if kwargs.get("unit") == "epoch":
                bars.append((kwargs["total"], self))

        def update(self, n=1):
            self.ticks += n
            return super().update(n)

    monkeypatch.setattr(training, "tqdm", RecordingTqdm)
    x, y = slices
    p = params.override({**TINY_TRAIN, "train.members": 2, "train.epochs": 2})
    rows = []
    train(p.train, p.model, p.seed, x[:6], y[:6], x[6:], y[6:], tmp_path / "m.pt", on_epoch=rows.append)
    [(total, bar)] = bars
    assert total == 4 and bar.ticks == 4 and len(rows) == 4


@pytest.mark.parametrize("terminal", [True, False])
def test_the_progress_bar_has_an_eta_in_a_terminal_and_is_silent_in_a_log(monkeypatch, terminal):
    import io

    from covseg.training import progress_bar

    class Stderr(io.StringIO):
        def isatty(self):
            return terminal

    err = Stderr()
    monkeypatch.setattr("sys.stderr", err)
    seen = []
    with progress_bar(3, seen.append) as tick:
        for epoch in range(3):
            tick({"epoch": epoch})
    assert len(seen) == 3
    if terminal:
        assert re.search(r"training: 100%.* 3/3 \[\d\d:\d\d<\d\d:\d\d", err.getvalue()), err.getvalue()
    else:
        assert err.getvalue() == "", "a CI log gets the epoch lines only, no bar"
