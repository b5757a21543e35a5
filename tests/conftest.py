"""Shared fixtures: tiny recipes on a few hundred real Fashion-MNIST images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from edgekd.data.sources import DEBIAN_FASHION_MNIST

REPO = Path(__file__).resolve().parents[1]


def tiny_recipe_dict(**sections: Any) -> dict[str, Any]:
    """A recipe that trains in seconds: 16 px, narrow models, a few hundred images."""
    rec: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "data": {"dataset": "fashion_mnist", "image_size": 16, "train_subset": 400, "test_subset": 200,
                 "val_fraction": 0.25},
        "teacher": {"arch": "resnet18", "width": 8, "epochs": 1},
        "student": {"arch": "mobilenet_v2", "width_mult": 0.25, "epochs": 1},
        "distill": {"method": "atkd"},
        "train": {"batch_size": 50, "eval_batch_size": 200, "lr": 0.05, "device": "cpu"},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            rec.setdefault(name, {}).update(values)
        else:
            rec[name] = values
    return rec


def write_recipe(path: Path, **sections: Any) -> Path:
    path.write_text(yaml.safe_dump(tiny_recipe_dict(**sections)))
    return path


@pytest.fixture(scope="session", autouse=True)
def _needs_fashion_mnist() -> None:
    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail("real Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (.ci/run does this)")


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher trained for one epoch on real images, shared by the distillation tests."""
    from edgekd.distill.stage import distill
    from edgekd.recipe import load_recipe

    d = tmp_path_factory.mktemp("teacher")
    recipe = load_recipe(write_recipe(d / "r.yaml", distill={"method": "kd"}, teacher={"epochs": 2}))
    result = distill(recipe, d / "run")
    assert result.teacher_checkpoint is not None and result.teacher_checkpoint.is_file()
    return result.teacher_checkpoint
