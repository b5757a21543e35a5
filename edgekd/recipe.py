"""Recipes: YAML files loaded with ``yaml.safe_load`` into typed, validated pydantic models.

A recipe never imports code. Every field has a default, so a recipe only says what differs.
Unknown keys and wrong types are refused with one line that names the key and the file.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgekd.augment import AUGMENTORS  # the registries are the source of valid names
from edgekd.losses.methods import METHODS
from edgekd.errors import EdgekdError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(_Strict):
    """Batch augmentation applied on the training device (see ``edgekd.data.augment``)."""

    crop_padding: int = Field(2, ge=0, description="random translation of up to this many pixels")
    hflip: bool = Field(True, description="random horizontal flip")
    rotation_deg: float = Field(10.0, ge=0, le=180, description="random rotation in [-deg, deg]")
    brightness: float = Field(0.2, ge=0, lt=1, description="multiply by U(1-b, 1+b)")


class DataConfig(_Strict):
    """The data set, its size and split; nothing is ever downloaded."""

    dataset: Literal["fashion_mnist", "cifar10", "cifar100", "imagefolder"] = Field(
        "fashion_mnist", description="imagefolder: ROOT/train/<class>/ and ROOT/val/<class>/ (or test/)")
    root: str | None = Field(None, description="data directory; None = the dataset's default place")
    image_size: int = Field(32, ge=8, le=512, description="images are resized to this square size, pixels")
    train_subset: int | None = Field(None, ge=10, description="use this many training images (seeded)")
    test_subset: int | None = Field(None, ge=10, description="use this many test images (seeded)")
    val_fraction: float = Field(0.1, ge=0, lt=0.5, description="share of the training images held out for "
                                "validation (best-epoch choice)")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    shifted_canvas: float = Field(2.0, ge=1.0, le=4.0, description="shifted test: canvas size / image size")
    shifted_mode: Literal["canvas", "translate"] = Field(
        "canvas", description="shifted test: canvas pastes each image at a random place on the larger canvas and "
        "resizes back (smaller and moved); translate moves it by up to (canvas - 1) / 2 of its size, same scale")
    num_workers: int = Field(2, ge=0, description="loader workers for ImageFolder trees")
    skip_unreadable: bool = Field(False, description="ImageFolder: skip files that are not readable images "
                                  "(counted in metrics.json) instead of stopping")


class TeacherConfig(_Strict):
    """The teacher: trained here, loaded from a checkpoint, or torchvision's ImageNet weights."""

    arch: str = Field(
        "resnet50", description="resnet18, resnet34, resnet50, cnn (a small 4-layer CNN, width = its first "
        "channels), or any classifier of the zoos as timm/<name> or torchvision/<name> (`edgekd models`)")
    width: int = Field(64, ge=4, description="channels of the first ResNet stage (64 = torchvision's)")
    pretrained: bool = Field(False, description="start from the zoo's ImageNet weights (downloads)")
    weights: str | None = Field(None, description="your own weights for teacher.arch: a state dict (.pt/.pth), "
                                ".safetensors, or a checkpoint holding one; epochs 0 uses them as they are, "
                                "epochs > 0 fine-tunes them (a head of another class count is then replaced)")
    weights_key: str | None = Field(None, description="the checkpoint key of the state dict to load from "
                                    "teacher.weights when the file holds several, e.g. state_dict_ema (timm's EMA) "
                                    "or model_ema; None = state_dict / model / model_state_dict / module")
    checkpoint: str | None = Field(None, description="use this trained teacher instead of training one")
    epochs: int = Field(30, ge=0, description="teacher training epochs (0 with pretrained or weights: use as is)")
    lr: float | None = Field(None, gt=0, description="teacher learning rate; None = train.lr")

    @field_validator("arch")
    @classmethod
    def _known(cls, v: str) -> str:
        return _check_arch(v, ("resnet18", "resnet34", "resnet50", "cnn"))


def _check_arch(v: str, short: tuple[str, ...]) -> str:
    if v in short or (v.split("/", 1)[0] in ("timm", "torchvision") and len(v.split("/", 1)) == 2 and v.split("/")[1]):
        return v
    raise ValueError(f"'{v}' is not one of {', '.join(short)}, timm/<name> or torchvision/<name>")


class StudentConfig(_Strict):
    """The small model that goes to the board."""

    arch: str = Field("mobilenet_v2", description="mobilenet_v2, mlp (no convolutions: HARD's invariance "
                      "experiment), vit (timm's VisionTransformer, ToMe's target), or any classifier of the zoos as "
                      "timm/<name> or torchvision/<name> (`edgekd models`)")
    weights: str | None = Field(None, description="warm start: your own weights for student.arch (as teacher.weights; "
                                "a head of another class count is replaced)")
    weights_key: str | None = Field(None, description="as teacher.weights_key, for student.weights")
    width_mult: float = Field(1.0, gt=0, le=2.0, description="MobileNetV2 channel multiplier")
    epochs: int = Field(30, ge=1, description="student training epochs")
    embed_dim: int = Field(64, ge=8, description="vit: token width")
    depth: int = Field(4, ge=1, description="vit: transformer blocks")
    num_heads: int = Field(2, ge=1, description="vit: attention heads")
    patch_size: int = Field(4, ge=1, description="vit: patch side in pixels (28 px / 4 = 49 patch tokens)")
    tome_r: int = Field(0, ge=0, description="vit: ToMe tokens merged per block while training (0 = off); "
                        "export and bench can apply another r")

    @field_validator("arch")
    @classmethod
    def _known(cls, v: str) -> str:
        return _check_arch(v, ("mobilenet_v2", "mlp", "vit"))

    def model_kwargs(self) -> dict[str, float | int]:
        """The architecture's own keyword arguments (what a checkpoint records to rebuild it)."""
        if "/" in self.arch:  # a zoo model is its name
            return {}
        if self.arch == "vit":
            return {"embed_dim": self.embed_dim, "depth": self.depth, "num_heads": self.num_heads,
                    "patch_size": self.patch_size, "tome_r": self.tome_r}
        return {"width_mult": self.width_mult}


class HardConfig(_Strict):
    """HARD's settings (Nix et al. 2023); thresholds and learning rate default to the augmentor's own."""

    lambda_s: float = Field(1.0, ge=0, description="augmentor: weight of student-teacher disagreement D(s(x~), t(x~))")
    lambda_t: float = Field(1.0, ge=0, description="augmentor: weight of teacher-teacher change D(t(x~), t(x))")
    weight: float = Field(1.0, ge=0, description="student: weight of D(s(x~), t(x~)) beside the method's terms")
    l_min: float | None = Field(None, ge=0, le=100, description="student -> augmentor below this top-1 "
                                "disagreement (percent, on augmented batches); None = the augmentor's")
    l_max: float | None = Field(None, ge=0, le=100, description="augmentor -> student above this disagreement "
                                "(percent); None = the augmentor's")
    consecutive: int = Field(5, ge=1, description="iterations in a row a threshold must hold before a switch")
    threshold: Literal["absolute", "relative"] = Field(
        "absolute", description="what l_min/l_max compare with: the disagreement on augmented batches, or that "
        "minus the student's disagreement on the same batch un-augmented (what the augmentation adds)")
    lr: float | None = Field(None, gt=0, description="augmentor learning rate (Adam); None = the augmentor's")
    max_phase: int | None = Field(None, ge=1, description="an augmentor phase that has not pushed the "
                                  "disagreement above l_max within this many iterations ends anyway: its "
                                  "augmentor is saved and the student trains (None: the paper's rule, no cap)")


class QatConfig(_Strict):
    """Quantization-aware fine-tuning of the converged student against the same teacher and
    method, with the int8 converter's own fake quantisation (PT2E, litert-torch's quantizer)."""

    epochs: float = Field(0.0, ge=0, description="QAT epochs after the float student (fractions allowed); 0 = off, "
                          "the int8 file is post-training quantised")
    lr: float | None = Field(None, gt=0, description="QAT peak learning rate (cosine to 0); None = train.lr / 100")
    freeze_bn_after: float = Field(0.5, ge=0, le=1, description="share of the QAT steps after which BatchNorm "
                                   "statistics are frozen (and dropout is off)")
    freeze_observers_after: float = Field(0.75, ge=0, le=1, description="share of the QAT steps after which the "
                                          "quantisation ranges are frozen")


class DistillConfig(_Strict):
    """How the student learns from the teacher: the method and its loss weights."""

    method: str = Field("atkd", description="ce, kd, at, atkd, atkd-sa or fitnet (see the README)")
    w_ce: float = Field(1.0, ge=0, description="weight of cross-entropy on the labels")
    alpha: float = Field(0.9, ge=0, description="weight of the KD term (Hinton)")
    temperature: float = Field(4.0, gt=0, description="softmax temperature T of the KD term")
    beta: float = Field(1000.0, ge=0, description="weight of the attention term (Zagoruyko: ~1000)")
    p: float = Field(2.0, gt=0, description="attention map exponent: mean_c |f|^p")
    fitnet_weight: float = Field(1.0, ge=0, description="weight of the FitNet hint term")
    warmup_epochs: float = Field(0.0, ge=0, description="ramp the teacher's terms (kd, at, fitnet) linearly from 0 "
                                 "to full weight over this many epochs; cross-entropy is never ramped")
    baseline: bool = Field(False, description="also train the same student alone (ce) and report the method's "
                           "gain over it; cached across runs")
    augment: str | None = Field(None, description="HARD augmentor trained against the student: hard-affine, "
                                "hard-mix, hard-vae; None = no HARD")
    hard: HardConfig = Field(default_factory=HardConfig)
    qat: QatConfig = Field(default_factory=QatConfig)


class TrainConfig(_Strict):
    """The optimiser and the loop, shared by teacher and student."""

    batch_size: int = Field(128, ge=1, description="training batch size")
    eval_batch_size: int = Field(512, ge=1, description="batch size for evaluation")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd is SGD with Nesterov momentum")
    lr: float = Field(0.1, gt=0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="L2 weight decay")
    schedule: Literal["cosine", "onecycle", "constant"] = Field("cosine", description="learning-rate schedule")
    clip_grad_norm: float | None = Field(None, gt=0, description="clip the gradients' global L2 norm to this "
                                         "before each step (timm's --clip-grad); None = off")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the cross-entropy")
    patience: int | None = Field(None, ge=1, description="early stopping: stop when validation top-1 has not "
                                 "improved for this many epochs (the epochs are then a maximum); None = off")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when visible, else cpu")
    compile: bool = Field(False, description="torch.compile the training step (student, teacher forward, loss "
                          "terms): pays on a GPU after a one-off compile of a minute or two; on a CPU rarely")
    compile_backend: str = Field("inductor", description="torch.compile backend; aot_eager checks the capture "
                                 "without code generation (the tests use it)")


class ExportConfig(_Strict):
    """What ``edgekd run`` exports (the flags of ``edgekd export``)."""

    formats: list[Literal["onnx", "tflite", "fp16", "dynamic"]] = Field(
        default_factory=lambda: ["onnx", "tflite"], description="tflite is fp32; fp16 and dynamic are weight-only")
    int8: bool = Field(True, description="also write the full-integer int8 student")
    calib: int = Field(500, ge=1, description="training images to calibrate int8 with")
    max_int8_drop: float = Field(1.0, description="fail when int8 loses more top-1 points than this")
    converter: Literal["auto", "onnx2tf", "litert-torch"] = Field(
        "auto", description="TFLite converter; auto: onnx2tf, litert-torch for a vit student")
    samples: int = Field(1000, ge=1, description="test images (with labels) stored in the export dir for the bench")


class BenchConfig(_Strict):
    """Where and how ``edgekd run`` benchmarks (the flags of ``edgekd bench``)."""

    device: Literal["local", "rpi4", "rpi5", "generic-arm64"] = Field("local", description="device profile")
    hosts: list[str] = Field(default_factory=list, description="USER@HOST or ~/.ssh/config aliases")
    port: int | None = Field(None, ge=1, le=65535, description="SSH port; None = 22 or ~/.ssh/config")
    python: str | None = Field(None, description="the board's Python [default: python3]")
    threads: int | None = Field(None, ge=1, description="default: the device profile's")
    runs: int = Field(200, ge=1, description="timed invokes per model")
    warmup: int = Field(20, ge=0, description="untimed invokes first")
    samples: int = Field(500, ge=1, description="test images scored on the board (at most export.samples)")
    timeout: float = Field(300, gt=0, description="seconds per model run")


class GateConfig(_Strict):
    """CI thresholds for ``edgekd gate``; a field left out is not checked."""

    max_size_mb: float | None = Field(None, gt=0, description="student file size, MB (10^6 bytes)")
    max_p50_ms: float | None = Field(None, gt=0, description="student median latency on the board, ms")
    max_p90_ms: float | None = Field(None, gt=0, description="student p90 latency on the board, ms")
    min_accuracy: float | None = Field(None, ge=0, le=1, description="student top-1 on the board, 0..1")
    max_latency_ratio: float | None = Field(None, gt=0, description="student p50 / teacher p50, same run")
    max_int8_drop: float | None = Field(None, description="int8 vs fp32 top-1 points, from export.json")


class SearchProxyConfig(_Strict):
    """What one search trial trains: a short budget that ranks candidates (the best are retrained
    at the recipe's own budget)."""

    epochs: int = Field(1, ge=1, description="student epochs of a trial")
    train_subset: int | None = Field(2000, ge=10, description="training images of a trial (seeded; the "
                                     "validation share is held out of them); None = the recipe's data")


class SearchConfig(_Strict):
    """The space ``edgekd search`` looks in and how it looks; every combination is checked on load."""

    students: list[str] = Field(default_factory=lambda: ["mobilenet_v2"], description="student archs: short "
                                "names (mobilenet_v2, mlp, vit) or timm/<name>, torchvision/<name>")
    width_mults: list[float] = Field(default_factory=lambda: [0.35], description="channel multipliers, for the "
                                     "students that have one (mobilenet_v2); zoo names carry their own width")
    image_sizes: list[int] = Field(default_factory=lambda: [28], description="student input sizes, pixels "
                                   "(upscaling keeps a stride-32 family's maps); the teacher keeps its own")
    methods: list[str] = Field(default_factory=lambda: ["atkd"], description="distillation methods (edgekd "
                               "methods)")
    quantization: list[Literal["ptq", "qat"]] = Field(default_factory=lambda: ["ptq"], description="int8 by "
                                                      "post-training calibration, or QAT (distill.qat)")
    qat_epochs: float = Field(1.0, gt=0, description="QAT epochs of a qat candidate")
    tome_r: list[int] = Field(default_factory=lambda: [0], description="ToMe tokens merged per block, for vit "
                              "students")
    proxy: SearchProxyConfig = Field(default_factory=SearchProxyConfig)
    trials: int = Field(12, ge=1, description="trials of the study, all workers together")
    budget: str | None = Field(None, description="the budgets, e.g. 'p90_ms<=20,size_mb<=2,rss_mb<=100' "
                               "(keys: p50_ms, p90_ms, p99_ms, size_mb, rss_mb); --budget overrides")
    best_k: int = Field(3, ge=0, description="the best trials of the Pareto front inside the budgets, retrained "
                        "at the recipe's budget, exported and benched; the winner is the best of them")
    sampler_seed: int = Field(0, description="seeds Optuna's sampler")
    start: Literal["frontier", "sampler"] = Field("frontier", description="how a new study starts. frontier: "
                                                  "every candidate's untrained file is measured first (seconds "
                                                  "each), and the first trials are those that spend the most of "
                                                  "the budget (of each student, method and quantization, the ones "
                                                  "no other inside the budget costs more than); then the sampler. "
                                                  "sampler: the sampler picks from the first trial")
    prune: bool = Field(True, description="stop a trial whose validation top-1 after an epoch is in the bottom "
                        "quarter of the trials' at that epoch (Optuna's PercentilePruner; never at the last epoch)")


class Recipe(_Strict):
    name: str = Field("recipe", description="default run directory: runs/<name>")
    seed: int = Field(0, description="seeds data splits, initialisation, batch order and augmentation")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)


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


def shipped_recipes() -> dict[str, str]:
    """The recipes that ship inside the package: name -> its first comment line (what it is for)."""
    out = {}
    for entry in sorted(resources.files("edgekd").joinpath("recipes").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            first = next((ln.lstrip("# ").strip() for ln in entry.read_text().splitlines() if ln.startswith("#")), "")
            out[entry.name.removesuffix(".yaml")] = first
    return out


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: ``name_or_path`` itself when it is a file, else the shipped recipe of that
    name (``fashion_mnist_quick``, with or without ``.yaml``); anything else is one line naming them."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.name.removesuffix(".yaml")
    names = shipped_recipes()
    if str(name_or_path).removesuffix(".yaml") == name and name in names:  # a bare name, not a missing path
        with resources.as_file(resources.files("edgekd").joinpath("recipes", f"{name}.yaml")) as shipped:
            return Path(shipped)
    raise EdgekdError(f"recipe {name_or_path}: no such file, and no shipped recipe of that name; "
                      f"give a YAML path or one of {', '.join(names)} (edgekd recipes)")


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a recipe (a file, or a shipped recipe's name), apply ``{'dotted.key': value}``
    overrides, and validate it."""
    path = resolve_recipe(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise EdgekdError(f"recipe {path}: not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise EdgekdError(f"recipe {path}: expected a mapping of sections (data:, teacher:, student:, ...), got "
                          f"{type(data).__name__}; start from a shipped recipe (edgekd recipes)")
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_dotted(data, dotted, value)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise EdgekdError(f"recipe {path}: {_first_error(e)}; fix it (every key: docs/reference/recipe.md)") from None
    for role, arch in (("teacher", recipe.teacher.arch), ("student", recipe.student.arch)):
        if "/" in arch:
            from edgekd.models.zoo import check_zoo_name

            try:
                check_zoo_name(arch)
            except EdgekdError as e:
                raise EdgekdError(f"recipe {path}: key '{role}.arch': {e}") from None
    d = recipe.distill
    if d.method not in METHODS:
        raise EdgekdError(f"recipe {path}: key 'distill.method': unknown method '{d.method}'; "
                          f"choose one of {', '.join(METHODS)}")
    if d.augment is not None:
        if d.augment not in AUGMENTORS:
            raise EdgekdError(f"recipe {path}: key 'distill.augment': unknown augmentor '{d.augment}'; "
                              f"choose one of {', '.join(AUGMENTORS)}")
        if not METHODS[d.method].needs_teacher:
            raise EdgekdError(f"recipe {path}: distill.augment trains against a teacher, and method '{d.method}' "
                              f"has none; choose one of {', '.join(m for m in METHODS if METHODS[m].needs_teacher)}")
    return recipe


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    text = text or str(annotation)
    for noise in ("typing.", "NoneType"):
        text = text.replace(noise, "None" if noise == "NoneType" else "")
    return text.replace("|", "or").replace("Literal", "one of ").replace("'", "")


def reference_markdown() -> str:
    """docs/reference/recipe.md: every recipe key, its type, default and meaning, from the models above
    (``python -m edgekd.recipe > docs/reference/recipe.md``; a test keeps the file equal to this)."""
    lines = ["# Recipe reference", "",
             "Generated from `edgekd/recipe.py` by `python -m edgekd.recipe > docs/reference/recipe.md`; do not edit.",
             "A recipe is YAML read with `yaml.safe_load`; every key has a default, so a recipe only says what",
             "differs. Unknown keys and wrong types stop with one line naming the key. Override any key from the",
             "command line with `--set section.key=value`.", ""]

    def section(title: str, model: type[BaseModel], prefix: str) -> None:
        doc = " ".join((model.__doc__ or "").split()) if model is not Recipe else "Top-level keys."
        lines.extend([f"## `{title}`", "", doc, "", "| key | type | default | meaning |", "|---|---|---|---|"])
        nested = []
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                nested.append((name, ann))
                continue
            default = json.dumps(f.get_default(call_default_factory=True))
            lines.append(f"| `{prefix}{name}` | {_type_name(ann)} | `{default}` | {f.description or ''} |")
        lines.append("")
        for name, sub in nested:
            section(f"{prefix}{name}", sub, f"{prefix}{name}.")

    section("top level", Recipe, "")
    return "\n".join(lines)


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Rebuild a recipe stored in a checkpoint or report."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise EdgekdError(f"stored recipe: {_first_error(e)}") from None


if __name__ == "__main__":
    print(reference_markdown())
