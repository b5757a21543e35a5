"""Quantization-aware distillation (``edgekd.qat``, ``distill.qat``): the fake-quant graph trained is
the one deployed, its checkpoints load with ``weights_only``, and a killed QAT run resumes exactly."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgekd.checkpoint import load_checkpoint

from conftest import sigkill_after, write_recipe


def _tiny_data():
    from edgekd.data import gather, load_dataset
    from edgekd.recipe import DataConfig
    from edgekd.train import prepare_batch

    data = load_dataset(DataConfig(image_size=16, train_subset=400, test_subset=200), 0)
    mean, std = torch.tensor(data.mean), torch.tensor(data.std)
    (tx, ty), (ex, ey) = gather(data.train), gather(data.test)
    return prepare_batch(tx, mean, std), ty, prepare_batch(ex, mean, std), ey


def _steps(model, tx, ty, steps, lr):
    opt = torch.optim.SGD(model.parameters(), lr, momentum=0.9)
    model.train()
    for k in range(steps):
        i = (k * 50) % len(tx)
        loss = torch.nn.functional.cross_entropy(model(tx[i:i + 50]), ty[i:i + 50])
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.e2e
def test_qat_tiny_model_trains_converts_and_the_int8_file_agrees_with_its_fake_quant(tmp_path):
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize

    from edgekd.export.score import tflite_io_details, tflite_runner, tied_top1_agreement, torch_logits
    from edgekd.export.stage import QAT_LSB_TOLERANCE, QAT_MIN_AGREEMENT
    from edgekd.models import build_model
    from edgekd.qat import export_int8, prepare_qat

    torch.manual_seed(0)
    tx, ty, ex, ey = _tiny_data()
    model = build_model("mobilenet_v2", 10, 1, 16, width_mult=0.25)
    _steps(model, tx, ty, 300, 0.05)  # a float student that has learnt something first (~70 %)
    student = prepare_qat(model, [], ex[:1], freeze_bn_step=6, freeze_observer_step=9)
    _steps(student, tx, ty, 12, 0.005)
    assert int(student.steps) == 12 and student.bn_frozen

    # The fake-quant modules compute the scales convert_pt2e (and so the file) will use.
    fake_quants = [m for m in student.graph.modules() if isinstance(m, FakeQuantize)]
    assert fake_quants
    for fq in fake_quants:
        scale, zero_point = fq.calculate_qparams()
        assert torch.equal(fq.scale, scale) and torch.equal(fq.zero_point, zero_point)

    x = ex.numpy()
    reference = torch_logits(student.eval(), x)
    again = torch_logits(student, x)  # an evaluation pass observes nothing: the graph is unchanged
    np.testing.assert_array_equal(reference, again)
    path = tmp_path / "student_int8.tflite"
    export_int8(student, ex[:1], path)
    io = tflite_io_details(path)
    assert io["input_dtype"] == "int8" and io["output_dtype"] == "int8"
    assert io["float_ops"] == {}  # the residual adds too: a non-strict export left them float
    got = tflite_runner(path)(x)
    assert got.shape == reference.shape == (200, 10)
    # The export's rule: top-1 agreement >= 99 %, a class within QAT_LSB_TOLERANCE int8 output steps
    # of the fake-quant top one agreeing. LiteRT's kernels requantise each op in fixed point, the
    # fake-quant in float: a logit moves by a few steps, never by a wrong graph's tens.
    lsb = io["output_quantization"]["scale"]
    assert tied_top1_agreement(got, reference, QAT_LSB_TOLERANCE * lsb) >= QAT_MIN_AGREEMENT
    assert np.percentile(np.abs(got - reference), 99) <= 8 * lsb * 1.0001  # measured: 3 steps
    assert (reference.argmax(1) == ey.numpy()).mean() > 0.4  # a model that answers, not a constant class

    # A checkpoint of it is plain tensors: weights_only loads it into a rebuilt graph exactly.
    torch.save({"state_dict": student.state_dict()}, tmp_path / "qat.pt")
    state = torch.load(tmp_path / "qat.pt", weights_only=True)
    model2 = build_model("mobilenet_v2", 10, 1, 16, width_mult=0.25)
    rebuilt = prepare_qat(model2, [], ex[:1], freeze_bn_step=6, freeze_observer_step=9)
    rebuilt.load_state_dict(state["state_dict"])
    np.testing.assert_array_equal(torch_logits(rebuilt.eval(), x), reference)


class _TinyMobileNetV3(torch.nn.Module):
    """The MobileNetV3 ops litert-torch's quantizer leaves float: hard-swish, the squeeze-excite
    mean after it, and its hard-sigmoid gate."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.se = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 1), nn.Hardsigmoid())
        self.head = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        x = self.dw(self.stem(x))
        return self.head(x * self.se(x.mean((2, 3), keepdim=True)))


@pytest.mark.e2e
def test_a_mobilenetv3s_qat_file_is_full_integer_hard_swish_and_squeeze_excite_included(tmp_path):
    from edgekd.export.score import tflite_io_details, tflite_runner, tied_top1_agreement, torch_logits
    from edgekd.export.stage import QAT_LSB_TOLERANCE, QAT_MIN_AGREEMENT
    from edgekd.qat import export_int8, prepare_qat

    torch.manual_seed(0)
    tx, ty, ex, _ = _tiny_data()
    model = _TinyMobileNetV3()
    _steps(model, tx, ty, 200, 0.05)
    student = prepare_qat(model, [], ex[:1], freeze_bn_step=6, freeze_observer_step=9)
    assert isinstance(model.se[3], torch.nn.Hardsigmoid)  # the float model is given back as it was
    _steps(student, tx, ty, 12, 0.005)
    x = ex.numpy()
    reference = torch_logits(student.eval(), x)
    path = tmp_path / "student_int8.tflite"
    export_int8(student, ex[:1], path)
    io = tflite_io_details(path)
    # without edgekd's annotation and trace, HARD_SWISH, ADD and MUL (the lowered hard-sigmoid) stay float32
    assert io["float_ops"] == {}
    got = tflite_runner(path)(x)
    assert tied_top1_agreement(got, reference, QAT_LSB_TOLERANCE * io["output_quantization"]["scale"]) \
        >= QAT_MIN_AGREEMENT

    # A QAT checkpoint of another fake-quant graph (an older edgekd's, hard-swish float): one line.
    from edgekd.errors import EdgekdError

    state = student.state_dict()
    state.pop(next(k for k in state if "activation_post_process" in k))
    with pytest.raises(EdgekdError, match="older edgekd"):
        student.load_state_dict(state)


def _distill_cmd(recipe, out, *extra):
    return [sys.executable, "-m", "edgekd.cli", "distill", str(recipe), "--out", str(out), *extra]


@pytest.mark.e2e
def test_qat_added_to_a_finished_run_then_killed_mid_epoch_resumes_exactly(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path / "r.yaml", data={"train_subset": 900, "val_fraction": 0.1},
                          distill={"method": "atkd"}, train={"batch_size": 30})
    teacher, qat = ["--teacher", str(tiny_teacher)], ["--qat-epochs", "2"]
    subprocess.run(_distill_cmd(recipe, tmp_path / "full", *teacher, *qat), check=True, capture_output=True)

    # The float run first, finished without QAT; QAT is added to it later with --resume.
    killed = tmp_path / "killed"
    subprocess.run(_distill_cmd(recipe, killed, *teacher), check=True, capture_output=True)
    float_student = (killed / "student_last.pt").stat().st_mtime_ns
    sigkill_after(_distill_cmd(recipe, killed, *teacher, *qat, "--resume"), killed / "student_qat_last.pt",
                  1.0)  # in QAT epoch 2
    assert load_checkpoint(killed / "student_qat_last.pt")["epoch"] == 1
    assert "qat" not in json.loads((killed / "metrics.json").read_text())["student"]  # the float run's, untouched

    r = subprocess.run(_distill_cmd(recipe, killed, *teacher, *qat, "--resume"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (killed / "student_last.pt").stat().st_mtime_ns == float_student  # no float epoch trained again
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())["student"]["qat"]
    resumed = json.loads((killed / "metrics.json").read_text())["student"]["qat"]
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    for a, b in zip(full["history"], resumed["history"]):
        assert (a["val_top1"], a["test_top1"], a["loss"]) == (b["val_top1"], b["test_top1"], b["loss"])
    done, again = (load_checkpoint(d / "student_qat_last.pt")["state_dict"] for d in (tmp_path / "full", killed))
    assert done.keys() == again.keys() and all(torch.equal(done[k], again[k]) for k in done)

    # Another QAT on a run that has one is another recipe: refused, nothing touched.
    before = (killed / "student_qat_last.pt").stat().st_mtime_ns
    r = subprocess.run(_distill_cmd(recipe, killed, *teacher, "--qat-epochs", "3", "--resume"), capture_output=True,
                       text=True)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]  # torch's own log lines aside
    assert r.returncode == 2 and len(errors) == 1 and "distill.qat.epochs" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert (killed / "student_qat_last.pt").stat().st_mtime_ns == before


def test_an_export_is_current_only_when_its_int8_file_comes_from_the_qat_student_the_run_has(tmp_path):
    from edgekd import artifacts
    from edgekd.checkpoint import write_json

    run = tmp_path / "run"
    out = run / artifacts.EXPORT_DIR
    out.mkdir(parents=True)
    student = run / artifacts.best_checkpoint("student")
    student.write_bytes(b"float student weights")
    (out / artifacts.SAMPLES).write_bytes(b"samples")
    write_json(out / artifacts.sidecar("student"), {"source_sha256": artifacts.sha256(student)})
    formats = ("onnx", "tflite")
    report = {"converters": {"tflite": "onnx2tf"},
              "artifacts": {name: {} for name in artifacts.wanted_files(formats, True)}}
    int8 = report["artifacts"][artifacts.tflite_file("student", "int8")]
    int8["quantization"] = "ptq"
    write_json(out / artifacts.EXPORT_REPORT, report)
    assert artifacts.current_export(run, formats, True, "onnx2tf") == report

    # QAT added to the finished run: the PTQ export is no longer the run's, the next export makes it anew
    (run / artifacts.best_checkpoint(artifacts.QAT_ROLE)).write_bytes(b"qat student")
    assert artifacts.current_export(run, formats, True, "onnx2tf") is None
    assert artifacts.current_export(run, formats, False, "onnx2tf") == report  # no int8 file wanted
    int8["quantization"] = "qat"
    write_json(out / artifacts.EXPORT_REPORT, report)
    assert artifacts.current_export(run, formats, True, "onnx2tf") == report



def test_dead_and_nearly_dead_batchnorm_channels_become_constants_before_qat_only_the_dead_for_ptq():
    from edgekd.models.dead_channels import QAT_REL_VAR, zero_dead_channels

    def model():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False), torch.nn.BatchNorm2d(3))
        m[1].running_var.copy_(torch.tensor([1e-13, 1e-9, 1e-4]))  # eps 1e-5: dead, nearly dead, live
        m[1].running_mean.zero_()
        m[1].weight.data.fill_(2.0)
        m[1].bias.data.copy_(torch.tensor([0.5, -0.7, 0.1]))
        return m.eval()

    x = torch.randn(4, 3, 8, 8)
    x[:, 0] = 0  # what a dead channel sees: its input never varies (a ReLU upstream that never fires)
    ptq, qat = model(), model()
    before = ptq(x)
    assert zero_dead_channels(ptq) == 1 and zero_dead_channels(qat, rel_var=QAT_REL_VAR) == 2
    assert torch.count_nonzero(ptq[0].weight.flatten(1), dim=1).tolist() == [0, 9, 9]
    assert torch.count_nonzero(qat[0].weight.flatten(1), dim=1).tolist() == [0, 0, 9]
    after = ptq(x)
    assert torch.equal(after[:, 0], torch.full_like(after[:, 0], 0.5))  # the constant it always was: beta
    assert torch.allclose(after, before, atol=1e-6)
    assert torch.equal(qat(x)[:, 1], torch.full_like(after[:, 1], -0.7))  # nearly dead: beta, for QAT to absorb


def test_qat_without_its_packages_is_one_line_before_any_epoch(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", distill={"method": "kd", "qat": {"epochs": 1}})
    hide = "import sys; sys.modules['litert_torch'] = None; from edgekd.cli import app; app()"  # as if not installed
    r = subprocess.run([sys.executable, "-c", hide, "distill", str(recipe), "--out", str(tmp_path / "run")],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "distill.qat needs the 'litert_torch' package: pip install 'edgekd[export]'" in r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert not list((tmp_path / "run").glob("*.pt"))  # refused before the float epochs, not after them
