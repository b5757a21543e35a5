"""Recipes: YAML files loaded with ``yaml.safe_load`` into typed, validated pydantic models.

A recipe never imports code. Every field has a default, so a recipe only says what differs.
Unknown keys and wrong types are refused with one line that names the key and the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgekd.errors import EdgekdError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(_Strict):
    """Batch augmentation applied on the training device (see ``edgekd.data.augment``)."""

    crop_padding: int = Field(2, ge=0, description="random translation of up to this many pixels")
    hflip: bool = True
    rotation_deg: float = Field(10.0, ge=0, le=180)
    brightness: float = Field(0.2, ge=0, lt=1, description="multiply by U(1-b, 1+b)")


class DataConfig(_Strict):
    dataset: Literal["fashion_mnist", "cifar10", "cifar100", "imagefolder"] = "fashion_mnist"
    root: str | None = Field(None, description="data directory; None = the dataset's default place")
    image_size: int = Field(32, ge=8, le=512)
    train_subset: int | None = Field(None, ge=10, description="use this many training images (seeded)")
    test_subset: int | None = Field(None, ge=10, description="use this many test images (seeded)")
    val_fraction: float = Field(0.1, ge=0, lt=0.5)
    augment: AugmentConfig = AugmentConfig()
    shifted_canvas: float = Field(2.0, ge=1.0, le=4.0, description="shifted test: canvas size / image size")
    num_workers: int = Field(2, ge=0, description="loader workers for ImageFolder trees")


class TeacherConfig(_Strict):
    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet50"
    width: int = Field(64, ge=4, description="channels of the first ResNet stage (64 = torchvision's)")
    pretrained: bool = Field(False, description="start from torchvision ImageNet weights (downloads)")
    checkpoint: str | None = Field(None, description="use this trained teacher instead of training one")
    epochs: int = Field(30, ge=0)
    lr: float | None = Field(None, gt=0, description="teacher learning rate; None = train.lr")


class StudentConfig(_Strict):
    arch: Literal["mobilenet_v2"] = "mobilenet_v2"
    width_mult: float = Field(1.0, gt=0, le=2.0)
    epochs: int = Field(30, ge=1)


class DistillConfig(_Strict):
    method: str = "atkd"
    w_ce: float = Field(1.0, ge=0, description="weight of cross-entropy on the labels")
    alpha: float = Field(0.9, ge=0, description="weight of the KD term (Hinton)")
    temperature: float = Field(4.0, gt=0)
    beta: float = Field(1000.0, ge=0, description="weight of the attention term (Zagoruyko: ~1000)")
    p: float = Field(2.0, gt=0, description="attention map exponent: mean_c |f|^p")
    fitnet_weight: float = Field(1.0, ge=0, description="weight of the FitNet hint term")


class TrainConfig(_Strict):
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class ExportConfig(_Strict):
    """What ``edgekd run`` exports (the flags of ``edgekd export``)."""

    formats: list[Literal["onnx", "tflite", "fp16", "dynamic"]] = ["onnx", "tflite"]
    int8: bool = True
    calib: int = Field(500, ge=1, description="training images to calibrate int8 with")
    max_int8_drop: float = Field(1.0, description="fail when int8 loses more top-1 points than this")
    converter: Literal["onnx2tf", "litert-torch"] = "onnx2tf"


class BenchConfig(_Strict):
    """Where and how ``edgekd run`` benchmarks (the flags of ``edgekd bench``)."""

    device: Literal["local", "rpi4", "rpi5", "generic-arm64"] = "local"
    hosts: list[str] = Field(default_factory=list, description="USER@HOST or ~/.ssh/config aliases")
    port: int | None = Field(None, ge=1, le=65535)
    python: str | None = Field(None, description="the board's Python [default: python3]")
    threads: int | None = Field(None, ge=1, description="default: the device profile's")
    runs: int = Field(200, ge=1)
    warmup: int = Field(20, ge=0)
    samples: int = Field(500, ge=1, description="test images scored on the board")
    timeout: float = Field(300, gt=0, description="seconds per model run")


class GateConfig(_Strict):
    """CI thresholds for ``edgekd gate``; a field left out is not checked."""

    max_size_mb: float | None = Field(None, gt=0, description="student file size, MB (10^6 bytes)")
    max_p50_ms: float | None = Field(None, gt=0)
    max_p90_ms: float | None = Field(None, gt=0)
    min_accuracy: float | None = Field(None, ge=0, le=1, description="student top-1 on the board, 0..1")
    max_latency_ratio: float | None = Field(None, gt=0, description="student p50 / teacher p50, same run")
    max_int8_drop: float | None = Field(None, description="int8 vs fp32 top-1 points, from export.json")


class Recipe(_Strict):
    name: str = "recipe"
    seed: int = 0
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    distill: DistillConfig = DistillConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    bench: BenchConfig = BenchConfig()
    gate: GateConfig = GateConfig()


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"]) or "<top level>"
    if e["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    return f"key '{key}': {e['msg']} (got {e.get('input')!r})"


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``dotted == 'a.b'``, creating sections as needed."""
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise EdgekdError(f"override '{dotted}': '{p}' is not a section")
        node = child
    node[leaf] = value


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a recipe file, apply ``{'dotted.key': value}`` overrides, and validate it."""
    path = Path(path)
    if not path.is_file():
        raise EdgekdError(f"recipe {path}: no such file; the shipped recipes are in recipes/")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise EdgekdError(f"recipe {path}: not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise EdgekdError(f"recipe {path}: expected a mapping of sections, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_dotted(data, dotted, value)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise EdgekdError(f"recipe {path}: {_first_error(e)}; fix it or see recipes/README.md") from None
    from edgekd.distill.methods import METHODS  # the registry is the source of valid names

    if recipe.distill.method not in METHODS:
        raise EdgekdError(
            f"recipe {path}: key 'distill.method': unknown method '{recipe.distill.method}'; "
            f"choose one of {', '.join(METHODS)}"
        )
    return recipe


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Rebuild a recipe stored in a checkpoint or report."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise EdgekdError(f"stored recipe: {_first_error(e)}") from None
