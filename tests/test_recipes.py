"""Every shipped recipe loads; bad recipes fail with one line naming the key and the file."""

import pytest
from typer.testing import CliRunner

from edgekd.cli import app
from edgekd.errors import EdgekdError
from edgekd.recipe import load_recipe

from conftest import REPO, write_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_the_expected_recipes_ship():
    names = {p.stem for p in RECIPES}
    assert {"fashion_mnist_quick", "fashion_mnist", "cifar10", "cifar100", "imagenet"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads(path):
    r = load_recipe(path)
    assert r.name == path.stem


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("student:\n  widht_mult: 0.5\n")
    with pytest.raises(EdgekdError, match=r"typo\.yaml.*unknown key 'student\.widht_mult'"):
        load_recipe(p)


def test_wrong_type_names_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: fast\n")
    with pytest.raises(EdgekdError, match=r"key 'train\.lr'"):
        load_recipe(p)


def test_unknown_method_lists_valid_names(tmp_path):
    with pytest.raises(EdgekdError, match=r"choose one of ce, kd, at, atkd, atkd-sa, fitnet"):
        load_recipe(write_recipe(tmp_path / "r.yaml", distill={"method": "magic"}))


def test_overrides_are_validated_too(tmp_path):
    p = write_recipe(tmp_path / "r.yaml")
    assert load_recipe(p, {"distill.beta": 5.0}).distill.beta == 5.0
    with pytest.raises(EdgekdError, match="distill.beta"):
        load_recipe(p, {"distill.beta": -1})


def test_yaml_cannot_import_code(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(EdgekdError, match="not valid YAML"):
        load_recipe(p)


def test_cli_recipe_typo_is_one_line_exit_2(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("data:\n  datset: cifar10\n")
    result = CliRunner().invoke(app, ["distill", str(p), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert "unknown key 'data.datset'" in err and "typo.yaml" in err and "Traceback" not in result.output
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_help_lists_only_real_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "distill" in result.output
