"""The ``edgekd`` command: maps commands to stage functions, parses and prints, nothing else."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from edgekd.errors import EdgekdError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distil an image classifier to a small student for Raspberry-Pi-class boards.")
console = Console()
err_console = Console(stderr=True)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="log what the library does")) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False)])


def _fail(e: Exception, code: int = 2) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {e}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def _parse_sets(items: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EdgekdError(f"--set {item!r}: expected KEY=VALUE, e.g. --set distill.beta=500")
        out[key.strip()] = yaml.safe_load(value)
    return out


class _ImgPerSecond(ProgressColumn):
    def render(self, task: Any) -> Text:
        return Text(f"{task.speed:,.0f} img/s" if task.speed else "", style="cyan")


class _RichProgress:
    """Draws the trainer's progress: a bar per epoch, then one line of metrics."""

    def __init__(self) -> None:
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _ImgPerSecond(),
                            TimeElapsedColumn(), console=console, transient=True)
        self.task: Any = None

    def __enter__(self) -> "_RichProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def start(self, label: str, total: int) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(label, total=total)

    def advance(self, n: int) -> None:
        self.bar.advance(self.task, n)

    def end_epoch(self, role: str, row: dict[str, float]) -> None:
        terms = " ".join(f"{k[5:]}={row[k]:.3f}" for k in row if k.startswith("loss_") and row[k])
        console.print(f"{role:7s} epoch {int(row['epoch']):3d}  loss {row['loss']:.3f} ({terms})  "
                      f"train {row['train_top1']:.2f}%  val {row['val_top1']:.2f}%  test {row['test_top1']:.2f}%  "
                      f"{row['img_per_s']:,.0f} img/s", highlight=False)


@app.command()
def distill(
    recipe: Path = typer.Argument(..., help="recipe YAML, e.g. recipes/fashion_mnist_quick.yaml"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory [default: runs/<recipe name>]"),
    method: Optional[str] = typer.Option(None, help="distillation method: ce, kd, at, atkd, atkd-sa, fitnet"),
    epochs: Optional[int] = typer.Option(None, help="student epochs (and teacher epochs unless --teacher-epochs)"),
    teacher_epochs: Optional[int] = typer.Option(None, help="teacher epochs"),
    teacher: Optional[Path] = typer.Option(None, help="use this trained teacher checkpoint"),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda"),
    data: Optional[Path] = typer.Option(None, help="dataset directory (overrides data.root)"),
    seed: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    set_: list[str] = typer.Option([], "--set", help="override any recipe field: --set distill.beta=500"),
    resume: bool = typer.Option(False, help="continue a killed run in --out from its last finished epoch"),
) -> None:
    """Train (or load) the teacher and distil the student; writes checkpoints, metrics.json and plots."""
    from edgekd.distill.stage import distill as run_distill
    from edgekd.recipe import load_recipe

    try:
        overrides = {
            "distill.method": method, "student.epochs": epochs,
            "teacher.epochs": teacher_epochs if teacher_epochs is not None else epochs,
            "teacher.checkpoint": str(teacher) if teacher else None, "train.device": device,
            "data.root": str(data) if data else None, "seed": seed, "train.batch_size": batch_size, "train.lr": lr,
            **_parse_sets(set_),
        }
        rec = load_recipe(recipe, overrides)
        out_dir = out or Path("runs") / rec.name
        with _RichProgress() as progress:
            result = run_distill(rec, out_dir, resume=resume, progress=progress)
    except EdgekdError as e:
        raise _fail(e) from None
    except KeyboardInterrupt:
        raise _fail(EdgekdError("interrupted; finished epochs are saved, continue with --resume"), 130) from None
    m = result.metrics
    table = Table(title=f"edgekd distill: {rec.name} ({m['method']}) on {m['dataset']['name']}")
    for col in ("model", "arch", "params", "test top-1 %", "shifted top-1 %"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for role in ("teacher", "student"):
        s = m[role]
        if s:
            table.add_row(role, s["arch"], f"{s['params']:,}", f"{s['test_top1']:.2f}", f"{s['shifted_top1']:.2f}")
    console.print(table)
    if m["agreement_top1"] is not None:
        console.print(f"teacher-student top-1 agreement: {m['agreement_top1']:.2f}%")
    console.print(f"run directory: {result.run_dir}  (metrics.json, log.csv, *_best.pt, *.png)")


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="a run directory written by 'edgekd distill'"),
    formats: str = typer.Option("onnx,tflite", help="comma-separated: onnx, tflite (fp32), fp16, dynamic"),
    int8: bool = typer.Option(True, "--int8/--no-int8", help="also write the full-integer int8 student TFLite"),
    calib: int = typer.Option(500, help="training images to calibrate int8 with"),
    max_int8_drop: float = typer.Option(1.0, help="exit 1 when int8 loses more top-1 points than this vs fp32"),
    dynamic_batch: bool = typer.Option(False, help="also write ONNX files with a dynamic batch axis"),
    converter: str = typer.Option("onnx2tf", help="TFLite converter: onnx2tf (TensorFlow, NHWC input) or "
                                  "litert-torch (no TensorFlow, NCHW input)"),
) -> None:
    """Write ONNX and TFLite (fp32, int8, ...) artifacts into RUN_DIR/export and score each on the test set."""
    from edgekd.export import export as run_export

    try:
        with console.status("exporting and scoring artifacts..."):
            result = run_export(run_dir, formats=tuple(f.strip() for f in formats.split(",") if f.strip()),
                                int8=int8, calib=calib, max_int8_drop=max_int8_drop, dynamic_batch=dynamic_batch,
                                converter=converter)
    except EdgekdError as e:
        raise _fail(e) from None
    table = Table(title=f"edgekd export: {result.export_dir}")
    table.add_column("artifact", no_wrap=True, min_width=22)
    for col in ("size KB", "convert s", "max |dlogit|", "agree %", "test top-1 %"):
        table.add_column(col, justify="right")
    for name, a in result.report["artifacts"].items():
        p = a["parity"]
        table.add_row(name, f"{a['size_bytes'] / 1024:,.0f}", f"{a['convert_s']:.1f}", f"{p['max_abs_logit_diff']:.2e}",
                      f"{p['top1_agreement']:.2f}", f"{a['test_top1']:.2f}")
    console.print(table)
    if result.int8_drop is not None:
        console.print(f"int8 vs fp32 top-1 drop: {result.int8_drop:+.2f} pt (limit {max_int8_drop} pt)")
    if result.int8_drop_exceeded:
        raise _fail(EdgekdError(f"int8 student loses {result.int8_drop:.2f} pt top-1 against fp32, more than "
                                f"--max-int8-drop {max_int8_drop}"), 1)


if __name__ == "__main__":
    app()
