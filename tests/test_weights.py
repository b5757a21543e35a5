"""Checkpoints as the common trainers write them, loaded into edgekd's models without a
conversion script: Lightning ``.ckpt`` (a ``model.`` prefix), timm ``train.py`` (an ``args``
Namespace, an EMA copy), torchvision's reference scripts; and one line for files that are not a
state dict (TorchScript, a whole pickled model, ONNX), never running what a pickle carries.

The files are written here in each trainer's layout (Lightning and timm's scripts are not
installed); the models are tiny and randomly initialised."""

import argparse
import os

import pytest
import torch

from edgekd.errors import EdgekdError
from edgekd.models import build_model
from edgekd.models.weights import load_weights

ARCH = "mobilenet_v2"


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ARCH, 10, 1, 16, width_mult=0.25)


def _optimizer_state(model: torch.nn.Module) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    opt.step()
    return opt.state_dict()


def _same(model: torch.nn.Module, state: dict) -> bool:
    return all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_lightning_checkpoint_loads_with_its_model_prefix_stripped(tmp_path):
    src = _model(1)
    path = tmp_path / "epoch=3-step=120.ckpt"
    torch.save({  # what Lightning 2.x writes: the LightningModule's state dict, its attribute as prefix
        "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
        "state_dict": {**{f"model.{k}": v for k, v in src.state_dict().items()},
                       "criterion.weight": torch.ones(10)},  # a loss module's buffer beside the model
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_acc', 'mode': 'max'}": {
            "best_model_score": torch.tensor(0.91), "best_model_path": "/ckpts/best.ckpt"}},
        "optimizer_states": [_optimizer_state(_model(2))], "lr_schedulers": [{"last_epoch": 3}],
        "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.1, "arch": ARCH},
    }, path)
    dst = _model(0)
    report = load_weights(dst, path, role="teacher", arch=ARCH, new_head_ok=False)
    assert _same(dst, src.state_dict())
    assert report.key == "state_dict" and report.prefix_stripped == "model." and report.ignored == 1


def _timm_style(tmp_path, src: torch.nn.Module, ema: torch.nn.Module) -> str:
    path = tmp_path / "model_best.pth.tar"
    args = argparse.Namespace(model="mobilenetv2_035", lr=0.05, epochs=30, model_ema=True, aa=None,
                              mean=(0.5,), std=(0.5,), output="./output/train")
    torch.save({"epoch": 29, "arch": "mobilenetv2_035", "state_dict": src.state_dict(),
                "optimizer": _optimizer_state(_model(3)), "version": 2, "args": args, "metric": 91.2,
                "state_dict_ema": ema.state_dict()}, path)
    return str(path)


def test_timm_train_checkpoint_with_args_namespace_loads(tmp_path):
    src, ema = _model(1), _model(2)
    path = _timm_style(tmp_path, src, ema)
    dst = _model(0)
    report = load_weights(dst, path, role="teacher", arch=ARCH, new_head_ok=False)
    assert _same(dst, src.state_dict()) and report.key == "state_dict"


def test_ema_weights_are_used_only_when_asked_for(tmp_path):
    src, ema = _model(1), _model(2)
    path = _timm_style(tmp_path, src, ema)
    dst = _model(0)
    report = load_weights(dst, path, role="student", arch=ARCH, new_head_ok=True, key="state_dict_ema")
    assert _same(dst, ema.state_dict()) and not _same(dst, src.state_dict())
    assert report.as_dict()["key"] == "state_dict_ema"
    with pytest.raises(EdgekdError, match=r"no state dict under key 'model_ema'.*state_dict, optimizer"):
        load_weights(_model(0), path, role="student", arch=ARCH, new_head_ok=True, key="model_ema")


def test_torchvision_reference_checkpoint_loads(tmp_path):
    src, ema = _model(1), _model(2)
    model = _model(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 30)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": src.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                "epoch": 89, "args": argparse.Namespace(model="mobilenet_v2", lr=0.1, data_path="/data/imagenet"),
                "model_ema": {f"module.{k}": v for k, v in ema.state_dict().items()}}, path)
    dst = _model(0)
    assert load_weights(dst, path, role="teacher", arch=ARCH, new_head_ok=False).key == "model"
    assert _same(dst, src.state_dict())
    load_weights(dst, path, role="teacher", arch=ARCH, new_head_ok=False, key="model_ema")
    assert _same(dst, ema.state_dict())


def test_another_model_under_the_prefix_names_the_prefix(tmp_path):
    path = tmp_path / "other.ckpt"
    other = build_model("resnet18", 10, 1, 16, width=8)
    theirs = {f"net.{k}": v for k, v in _model(1).state_dict().items()}
    theirs.pop(next(iter(theirs)))  # one tensor short of the model
    torch.save({"state_dict": {**theirs, **{f"aux.{k}": v for k, v in other.state_dict().items()}}}, path)
    with pytest.raises(EdgekdError, match=r"under the prefix 'net\.'.* set teacher\.arch"):
        load_weights(_model(0), path, role="teacher", arch=ARCH, new_head_ok=False)


def test_torchscript_archive_is_one_line_with_the_fix(tmp_path):
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.trace(_model(1).eval(), torch.randn(1, 1, 16, 16)), str(path))
    with pytest.raises(EdgekdError, match=r"TorchScript archive .*torch\.jit\.load\(FILE\)\.state_dict\(\)"):
        load_weights(_model(0), path, role="teacher", arch=ARCH, new_head_ok=False)


class _Booby(torch.nn.Module):
    """A whole model whose pickle runs a command when loaded (``torch.save(model)`` of it)."""

    def __init__(self, mark: str):
        super().__init__()
        self.mark, self.fc = mark, torch.nn.Linear(2, 2)

    def __reduce__(self):
        return (os.system, (f"touch {self.mark}",))


def test_whole_pickled_model_with_a_payload_is_refused_and_never_runs(tmp_path):
    mark = tmp_path / "ran"
    path = tmp_path / "model.pth"
    torch.save(_Booby(str(mark)), path)
    with pytest.raises(EdgekdError, match=r"pickle payload that would run code \((os|posix)\.system\).*refused"):
        load_weights(_model(0), path, role="teacher", arch=ARCH, new_head_ok=False)
    assert not mark.exists()


def test_whole_pickled_model_says_save_the_state_dict(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(_model(1), path)
    with pytest.raises(EdgekdError, match=r"whole pickled model .*MobileNetV2.*save model\.state_dict\(\)"):
        load_weights(_model(0), path, role="teacher", arch=ARCH, new_head_ok=False)


def test_onnx_file_given_as_weights_is_one_line(tmp_path):
    path = tmp_path / "teacher.onnx"
    torch.onnx.export(_model(1).eval(), (torch.randn(1, 1, 16, 16),), str(path), dynamo=False)
    with pytest.raises(EdgekdError, match=r"ONNX model, not PyTorch weights"):
        load_weights(_model(0), path, role="teacher", arch=ARCH, new_head_ok=False)


def test_keras_and_tflite_files_are_named(tmp_path):
    h5, tfl = tmp_path / "model.h5", tmp_path / "model.tflite"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))  # the HDF5 signature Keras .h5 files start with
    tfl.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))  # a flatbuffer with TFLite's file identifier
    with pytest.raises(EdgekdError, match=r"Keras/HDF5 file"):
        load_weights(_model(0), h5, role="teacher", arch=ARCH, new_head_ok=False)
    with pytest.raises(EdgekdError, match=r"TFLite model"):
        load_weights(_model(0), tfl, role="teacher", arch=ARCH, new_head_ok=False)
