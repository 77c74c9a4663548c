"""params.yaml is composed from the recipes in conf/ (as DVC does), loaded once and checked: a bad key or value
is one error naming it, before any work; a `-S` override is data, never an interpolation or another file."""
import shutil
import subprocess

import pytest
import yaml
from projects import ROOT

from covseg.cli import main
from covseg.errors import ParamsError
from covseg.names import PATHS
from covseg.params import apply_overrides, check, compose, load_params, read_tree, recipes


def test_project_params_are_valid(params):
    assert params.train.epochs >= 1 and params.validate_.hu_min < params.validate_.hu_max
    assert params.flat()["train.class_weights"] == str(list(params.train.class_weights))


@pytest.mark.parametrize("key,value,message", [
    ("train.loss", "foo", r"train\.loss = 'foo' is not allowed: Input should be 'ce' or 'dice_ce'"),
    ("split.fold", 7, r"split\.fold = 7 is not allowed: must be all or in 0\.\.4 \(split\.folds is 5\)"),
    ("split.fold", "some", r"split\.fold = 'some' is not allowed: must be all or in 0\.\.4"),
    ("train.class_weights", [1, 2], r"train\.class_weights = \[1, 2\] is not allowed"),
    ("calibrate.offset_grid", [0, 99], r"calibrate\.offset_grid\.1 = 99 is not allowed: .*less than or equal to 10"),
    ("calibrate.offsets", ["lungs_other"], r"calibrate\.offsets\.0 = 'lungs_other' is not allowed"),
    ("calibrate.tta", [], r"calibrate\.tta = \[\] is not allowed"),
    ("train.epochs", "3", r"train\.epochs = '3' is not allowed: Input should be a valid integer"),
    ("train.epochs", 0, r"train\.epochs = 0 is not allowed: Input should be greater than or equal to 1"),
    ("train.scale", 1.5, r"train\.scale = 1\.5 is not allowed"),
    ("train.aug_gamma", 1.0, r"train\.aug_gamma = 1\.0 is not allowed: .*less than 1"),
    ("train.members", 0, r"train\.members = 0 is not allowed"),
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


def test_committed_params_yaml_is_the_composed_default():
    """`dvc repro` runs params.yaml as it is, `dvc exp run` composes it from conf/: the two must agree."""
    tree, params = compose([], ROOT / PATHS.conf)
    # HEAD's params.yaml: a `dvc exp run` leaves its experiment's params.yaml in the workspace
    committed = subprocess.run(["git", "show", f"HEAD:{PATHS.params}"], cwd=ROOT, capture_output=True, text=True)
    head = yaml.safe_load(committed.stdout) if committed.returncode == 0 else read_tree(ROOT / PATHS.params)
    assert tree == head, "the committed params.yaml is not the composed default: compose conf/ and commit it"
    assert params.recipe == "default"


def test_every_recipe_composes_to_valid_params_that_differ_from_the_default():
    names = recipes(ROOT / PATHS.conf)
    assert {"default", "seed", "fast", "gpu"} <= set(names)
    default = compose([], ROOT / PATHS.conf)[0]
    for name in names:
        tree, params = compose([f"recipe={name}"], ROOT / PATHS.conf)
        assert params.recipe == name
        assert name == "default" or {k: v for k, v in tree.items() if k != "recipe"} != {
            k: v for k, v in default.items() if k != "recipe"}, f"recipe {name} changes nothing"
    seed = compose(["recipe=seed"], ROOT / PATHS.conf)[1]
    assert (seed.model.base_channels, seed.train.epochs, seed.train.lr, seed.train.loss) == (64, 130, 0.0001, "ce")


def test_overrides_compose_on_top_of_a_recipe_with_yaml_values():
    _, p = compose(["recipe=gpu", "train.epochs=3", "calibrate.offset_grid=[0, 1.5]", "train.init=",
                    "split.fold=2"], ROOT / PATHS.conf)
    assert (p.recipe, p.model.depth, p.train.epochs, p.calibrate.offset_grid, p.train.init, p.split.fold) == (
        "gpu", 5, 3, [0.0, 1.5], "", 2)


@pytest.mark.parametrize("item,message", [
    ("recipe=nope", r"no such recipe .* \(there are: default, fast, gpu, seed\)"),
    ("train.lrr=1", "unknown key 'train.lrr'"),
    ("defaults=[]", "unknown key 'defaults'"),
    ("+train.extra=1", "no \\+, ~ or FILE: prefixes"),
    ("~train.lr", "no \\+, ~ or FILE: prefixes"),
    ("dvc.yaml:stages.train.cmd=touch /tmp/pwned", "no \\+, ~ or FILE: prefixes"),
    ("train.init=${oc.env:AWS_SECRET_ACCESS_KEY}", "may not hold"),
    ("tracking.experiment=x${oc.env:HOME}", "may not hold"),
    (r"tracking.experiment=$\{oc.env:AWS_SECRET_ACCESS_KEY\}", "may not hold"),  # Hydra unescapes \{ to {
    (r"train.init=$\{oc.env:AWS_SECRET_ACCESS_KEY\}.pt", "may not hold"),
    (r"train.epochs=$\{oc.env:AWS_SECRET_ACCESS_KEY\}", "may not hold"),
    (r"train.class_weights=[$\{oc.env:AWS_SECRET_ACCESS_KEY\},1,1,1]", "may not hold"),
    (r"tracking.experiment=a$\{now:%Y\}", "may not hold"),
    ("train.class_weights=shuffle([4,3,2,1])", "may not hold"),  # checked on one draw, DVC would make another
    ("predict.severity_thresholds=sort([75,50,25,5])", "may not hold"),
    ("recipe=gpu recipe=seed", "no such recipe"),
    ("train.epochs", "expected KEY=VALUE"),
    ("train.epochs=0", r"train\.epochs = 0 is not allowed"),
    ("train.init='$(touch /tmp/pwned).pt'", "may not hold"),
    ("train.init='~/.aws/credentials.pt'", r"train\.init = .* is not allowed: must be empty, a registry model"),
    ("train.init=\"models:/x' or '1\"", r"train\.init = .* is not allowed"),
    ("train.lr=1,2", "Ambiguous value"),
    ("train={epochs: 3}", "unknown key 'train'"),  # a nested override: a section is not a key
    ("train.class_weights=[1, 2, 3, {lrr: 1}]", r"train\.class_weights\.3 = \{'lrr': 1\} is not allowed"),
    ("calibrate.offset_grid={a: 1}", "Error merging override calibrate.offset_grid"),
])
def test_a_bad_override_is_one_error_before_anything_is_composed(item, message, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    with pytest.raises(ParamsError, match=message) as info:
        compose([item], ROOT / PATHS.conf)
    assert "s3cr3t" not in str(info.value) and "/root" not in str(info.value).replace(str(ROOT), "")


@pytest.mark.parametrize("init", ["", "models:/covseg-unet@champion", "models:/covseg-unet/3", "models/init.pt",
                                  "/abs/path/to/init.pt"])
def test_a_warm_start_names_a_registry_model_or_a_checkpoint(init):
    assert compose([f"train.init={init}"], ROOT / PATHS.conf)[1].train.init == init


def test_a_key_given_twice_is_refused():
    with pytest.raises(ParamsError, match="given twice"):
        compose(["recipe=gpu", "train.epochs=3", "recipe=seed"], ROOT / PATHS.conf)


def test_cv_composes_its_recipe_like_dvc_exp_run(tmp_path, monkeypatch):
    """`covseg cv -S recipe=... -S key=...` runs what `dvc exp run` with the same -S would."""
    from covseg import crossval

    seen = {}
    monkeypatch.setattr(crossval, "cross_validate",
                        lambda raw, params, out, folds, folds_file: seen.update(params=params, out=out) or {})
    monkeypatch.setattr(crossval, "describe", lambda summary: "")
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / PATHS.conf, conf)
    assert main(["cv", "--conf", str(conf), "-S", "recipe=seed", "-S", "train.epochs=2", "--folds", "0"]) == 0
    assert (seen["params"].recipe, seen["params"].train.epochs) == ("seed", 2)
    assert seen["out"] == f"{PATHS.cv}/seed"
    assert main(["cv", "--conf", str(conf), "-S", "train.init=${oc.env:HOME}"]) == 1
