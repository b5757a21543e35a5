"""Every shipped recipe loads; bad recipes fail with one line naming the key and the file."""

import pytest
from typer.testing import CliRunner

from edgekd.cli import app
from edgekd.errors import EdgekdError
from edgekd.recipe import load_recipe, shipped_recipes

from conftest import REPO, one_line_error, write_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_the_expected_recipes_ship():
    names = {p.stem for p in RECIPES}
    assert {"fashion_mnist_quick", "fashion_mnist", "cifar10", "cifar100", "imagenet"} <= names
    assert set(shipped_recipes()) == names  # the checkout's recipes/ is the package's edgekd/recipes/


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads(path):
    r = load_recipe(path)
    assert r.name == path.stem


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_loads_by_name_and_says_what_it_is(name):
    assert load_recipe(name).name == name and load_recipe(f"{name}.yaml").name == name
    assert 20 < len(shipped_recipes()[name]) <= 110  # one line for `edgekd recipes`


def test_edgekd_recipes_lists_names_with_descriptions():
    r = CliRunner().invoke(app, ["recipes"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "fashion_mnist_quick" in r.stdout and "The default main job" in r.stdout
    shown = CliRunner().invoke(app, ["recipes", "fashion_mnist_quick"])
    assert shown.exit_code == 0 and shown.stdout == (REPO / "recipes" / "fashion_mnist_quick.yaml").read_text()
    assert "no shipped recipe 'nope'" in one_line_error(CliRunner().invoke(app, ["recipes", "nope"]))


def test_a_name_that_is_no_recipe_lists_the_shipped_ones(tmp_path):
    line = one_line_error(CliRunner().invoke(app, ["run", "fashion_mnist_quik", "--out", str(tmp_path / "o")]))
    assert "no shipped recipe of that name" in line and "fashion_mnist_quick" in line
    missing = one_line_error(CliRunner().invoke(app, ["distill", str(tmp_path / "nope.yaml")]))
    assert "nope.yaml: no such file" in missing


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


def test_stage_contract_page_is_generated_from_the_artifacts_module():
    from edgekd.artifacts import contract_markdown

    assert (REPO / "docs" / "reference" / "contract.md").read_text() == contract_markdown() + "\n", (
        "docs/reference/contract.md is stale: python -m edgekd.artifacts > docs/reference/contract.md")
