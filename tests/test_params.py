"""params.yaml is loaded once and checked: a bad key or value is one error naming it, before any work."""
import pytest
import yaml

from covseg.cli import main
from covseg.errors import ParamsError
from covseg.params import apply_overrides, check, load_params, read_tree


def test_project_params_are_valid(params):
    assert params.train.epochs >= 1 and params.validate_.hu_min < params.validate_.hu_max
    assert params.flat()["train.class_weights"] == str(list(params.train.class_weights))


@pytest.mark.parametrize("key,value,message", [
    ("train.loss", "foo", r"train\.loss = 'foo' is not allowed: Input should be 'ce' or 'dice_ce'"),
    ("split.fold", 7, r"split\.fold = 7 is not allowed: must be in 0\.\.4 \(split\.folds is 5\)"),
    ("train.class_weights", [1, 2], r"train\.class_weights = \[1, 2\] is not allowed"),
    ("model.class_bias", [0, 0, 0], r"model\.class_bias = \[0, 0, 0\] is not allowed"),
    ("model.class_bias", [0, 99, 0, 0], r"model\.class_bias\.1 = 99 is not allowed: .*less than or equal to 10"),
    ("train.epochs", "3", r"train\.epochs = '3' is not allowed: Input should be a valid integer"),
    ("train.epochs", 0, r"train\.epochs = 0 is not allowed: Input should be greater than or equal to 1"),
    ("train.scale", 1.5, r"train\.scale = 1\.5 is not allowed"),
    ("train.pseudo_confidence", 1.0, r"train\.pseudo_confidence = 1\.0 is not allowed: .*less than 1"),
    ("train.pseudo_epochs", -1, r"train\.pseudo_epochs = -1 is not allowed"),
    ("model.norm", "layer", r"model\.norm = 'layer' is not allowed"),
    ("window.hu_max", -2000, r"window\.hu_max = -2000 is not allowed: must be greater than window\.hu_min"),
    ("train.device", "cuda; rm -rf /", r"train\.device = 'cuda; rm -rf /' is not allowed"),
    ("registry.model_name", "x' or name='y", r"registry\.model_name = .* is not allowed"),
    ("registry.promotion_metric", "loss", r"registry\.promotion_metric = 'loss' is not allowed"),
    ("train.lr", float("inf"), r"train\.lr = inf is not allowed: Input should be a finite number"),
    ("validate.body_hu", float("nan"), r"validate\.body_hu = nan is not allowed"),
])
def test_bad_value_is_one_error_naming_key_value_and_rule(key, value, message):
    with pytest.raises(ParamsError, match=message) as info:
        apply_overrides(read_tree(), {key: value})
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("key", ["train.lrr", "dvc.yaml:stages.train.cmd", "train", "nosuch.key", 3])
def test_unknown_override_key_is_refused(key):
    with pytest.raises(ParamsError, match="unknown key"):
        apply_overrides(read_tree(), {key: 1})


def test_unknown_and_missing_keys_in_the_file(tmp_path):
    tree = read_tree()
    tree["train"]["lrr"] = 0.1
    del tree["model"]["depth"]
    with pytest.raises(ParamsError) as info:
        check(tree, "p.yaml")
    assert str(info.value).splitlines() == [
        "p.yaml: model.depth is missing",
        "p.yaml: unknown key train.lrr (a typo, or a key this version of covseg does not have)"]


def test_override_returns_a_checked_copy(params):
    changed = params.override({"train.epochs": 3, "train.augment": False})
    assert changed.train.epochs == 3 and not changed.train.augment
    assert params.train.epochs != 3, "the original is unchanged"


def test_cli_refuses_bad_params_before_any_work(tmp_path, tiny_raw, capsys):
    tree = read_tree()
    tree["split"]["fold"] = 9
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))
    assert main(["validate", "--raw", str(tiny_raw), "--report", str(tmp_path / "report.json")]) == 0
    assert main(["--params", str(tmp_path / "params.yaml"), "preprocess", "--raw", str(tiny_raw),
                 "--report", str(tmp_path / "report.json"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "covseg preprocess: error:" in err and "split.fold = 9 is not allowed" in err
    assert not (tmp_path / "out").exists()


def test_missing_params_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match=r"nope\.yaml: params file is missing"):
        load_params(tmp_path / "nope.yaml")


def test_set_overrides_are_read_as_yaml_and_a_bad_one_is_one_error():
    from covseg.params import parse_overrides

    assert parse_overrides(["train.epochs=3", "model.class_bias=[0, 1.5, 0, 0]", "train.init="]) == {
        "train.epochs": 3, "model.class_bias": [0, 1.5, 0, 0], "train.init": None}
    with pytest.raises(ParamsError, match="-S 'train.epochs': expected KEY=VALUE"):
        parse_overrides(["train.epochs"])
    with pytest.raises(ParamsError, match="not valid YAML"):
        parse_overrides(["model.class_bias=[0, 1"])
