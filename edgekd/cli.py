"""The ``edgekd`` command: maps commands to stage functions, parses and prints, nothing else."""

from __future__ import annotations

import errno
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from edgekd.errors import EdgekdError
from edgekd.recipe import BenchConfig, ExportConfig, QatConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distil an image classifier to a small student for Raspberry-Pi-class boards.")
console = Console()
err_console = Console(stderr=True)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="log what the library does")) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False)])
    if not verbose:  # torchao's deprecation notice on torch 2.14, which a user cannot act on
        logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def _fail(e: Exception, code: int = 2) -> typer.Exit:
    from rich.markup import escape

    # escaped: a message's own brackets (pip install 'edgekd[export]') are text, not markup
    err_console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


@contextmanager
def _user_errors(interrupted: str) -> Iterator[None]:
    """What a user may cause becomes one line on stderr: exit 2 for bad input (an EdgekdError, or
    a file system that refuses a write), 130 for Ctrl-C with ``interrupted`` saying what was kept."""
    try:
        yield
    except EdgekdError as e:
        raise _fail(e) from None
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        raise _fail(EdgekdError(f"cannot write {e.filename or 'a file'}: {e.strerror}; free disk space or "
                                "choose another output folder")) from None
    except KeyboardInterrupt:
        raise _fail(EdgekdError(f"interrupted; {interrupted}"), 130) from None


_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                 errno.EEXIST}


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise EdgekdError(f"{flag} {text!r}: expected comma-separated whole numbers such as 0,2,4,8") from None


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


def _help(model: type, name: str) -> str:
    return model.model_fields[name].description or ""


def _option(model: type, name: str, *decls: str, help: str | None = None) -> Any:  # noqa: A002 - typer's word
    """A flag whose default and help text are the recipe field's: declared once, in edgekd.recipe."""
    field = model.model_fields[name]
    return typer.Option(field.get_default(call_default_factory=True), *decls, help=help or field.description)


_RECIPE = typer.Argument(..., help="a shipped recipe's name (edgekd recipes), e.g. fashion_mnist_quick, or a "
                         "recipe YAML file")
_OUT = typer.Option(None, "--out", "-o", help="run directory [default: runs/<recipe name>]")


@app.command()
def distill(
    recipe: Path = _RECIPE,
    out: Optional[Path] = _OUT,
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
    augment: Optional[str] = typer.Option(None, help="HARD augmentor trained against the student: hard-affine, "
                                          "hard-mix, hard-vae"),
    baseline: Optional[bool] = typer.Option(None, "--baseline/--no-baseline",
                                            help="also train the same student alone and report the gain over it"),
    nproc: Optional[int] = typer.Option(None, help="run this command under torchrun with N processes on this "
                                        "machine (DDP: NCCL on GPUs, gloo on CPUs)"),
    qat_epochs: Optional[float] = typer.Option(None, min=0, help=_help(QatConfig, "epochs")),
) -> None:
    """Train (or load) the teacher and distil the student; writes checkpoints, metrics.json and plots."""
    import sys

    from edgekd.distill.stage import distill as run_distill
    from edgekd.distributed import launch, world_from_env
    from edgekd.recipe import load_recipe

    if nproc is not None:  # the same command, minus --nproc, once per process under torchrun
        argv = sys.argv[1:]
        i = argv.index("--nproc") if "--nproc" in argv else None
        argv = argv[:i] + argv[i + 2:] if i is not None else [a for a in argv if not a.startswith("--nproc=")]
        with _user_errors("finished epochs are saved, continue with --resume"):
            raise typer.Exit(launch(nproc, argv))
    world = world_from_env()
    with _user_errors("finished epochs are saved, continue with --resume"):
        overrides = {
            "distill.method": method, "student.epochs": epochs,
            "teacher.epochs": teacher_epochs if teacher_epochs is not None else epochs,
            "teacher.checkpoint": str(teacher) if teacher else None, "train.device": device,
            "data.root": str(data) if data else None, "seed": seed, "train.batch_size": batch_size, "train.lr": lr,
            "distill.baseline": baseline, "distill.augment": augment, "distill.qat.epochs": qat_epochs,
            **_parse_sets(set_),
        }
        rec = load_recipe(recipe, overrides)
        out_dir = out or Path("runs") / rec.name
        with _RichProgress() as progress:
            result = run_distill(rec, out_dir, resume=resume, progress=progress if world.main else None)
    if not world.main:
        return  # rank 0 reports
    m = result.metrics
    table = Table(title=f"edgekd distill: {rec.name} ({m['method']}) on {m['dataset']['name']}")
    for col in ("model", "arch", "params", "test top-1 %", "shifted top-1 %"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for role, label in (("teacher", "teacher"), ("student", "student"), ("baseline", "student alone (ce)")):
        s = m.get(role)
        if s:
            table.add_row(label, s["arch"], f"{s['params']:,}", f"{s['test_top1']:.2f}", f"{s['shifted_top1']:.2f}")
    console.print(table)
    qat = m["student"].get("qat")
    if qat:
        console.print(f"QAT ({qat['epochs']:g} epochs, {qat['wall_s']:.0f} s): fake-quant student test top-1 "
                      f"{qat['test_top1']:.2f}%, into {qat['checkpoint']}", highlight=False)
    if m["agreement_top1"] is not None:
        console.print(f"teacher-student top-1 agreement: {m['agreement_top1']:.2f}%")
    gain = m.get("gain_over_baseline")
    if gain:
        console.print(f"{m['method']}: {gain['test_top1']:+.1f} pt over the same student alone "
                      f"(shifted test {gain['shifted_top1']:+.1f} pt; baseline {m['baseline']['source']})",
                      highlight=False)
    console.print(f"run directory: {result.run_dir}  (metrics.json, log.csv, *_best.pt, *.png)")


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="a run directory written by 'edgekd distill'"),
    formats: str = typer.Option(",".join(ExportConfig().formats), help="comma-separated: onnx, tflite (fp32), fp16, "
                                "dynamic; " + _help(ExportConfig, "formats")),
    int8: bool = _option(ExportConfig, "int8", "--int8/--no-int8"),
    calib: int = _option(ExportConfig, "calib"),
    max_int8_drop: float = _option(ExportConfig, "max_int8_drop", help="exit 1 when int8 loses more top-1 points "
                                   "than this vs fp32"),
    dynamic_batch: bool = typer.Option(False, help="also write ONNX files with a dynamic batch axis"),
    converter: str = typer.Option(ExportConfig().converter, help="TFLite converter: onnx2tf (TensorFlow, NHWC input) or "
                                  "litert-torch (no TensorFlow, NCHW input); auto: litert-torch for ViT students"),
    samples: int = _option(ExportConfig, "samples"),
    tome_r: Optional[str] = typer.Option(None, help="ViT: also export the student with ToMe merging R tokens per "
                                         "block (fixed shapes); auto: the schedule measured fastest on this host "
                                         "within --tome-max-drop of r = 0 on validation (or none)"),
    tome_max_drop: float = typer.Option(0.5, help="--tome-r auto: validation top-1 points a schedule may lose"),
    tome_threads: int = typer.Option(1, help="--tome-r auto: LiteRT threads to time with, as the deployment "
                                     "will run (merging can pay at 1 thread and cost at 2)"),
    tome_sweep: str = typer.Option("", help="ViT: comma-separated r values to export, e.g. 0,2,4,8"),
    tome_matcher: str = typer.Option("exact", help="ToMe matcher(s), comma-separated: exact, lsh, bucketed "
                                     "(cosine within LSH buckets; ONNX only)"),
    tome_bits: int = typer.Option(16, help="bits of the lsh matcher's hash codes (bucketed: hyperplanes, "
                                  "2 x bits buckets)"),
) -> None:
    """Write ONNX and TFLite (fp32, int8, ...) artifacts into RUN_DIR/export and score each on the test set."""
    from edgekd.export import export as run_export

    with _user_errors("finished artifacts are kept; export.json is written when all are done"):
        auto = tome_r is not None and tome_r.strip() == "auto"
        fixed = () if auto or tome_r is None else _int_list(tome_r, "--tome-r")
        with console.status("exporting and scoring artifacts..."):
            result = run_export(run_dir, formats=tuple(f.strip() for f in formats.split(",") if f.strip()),
                                int8=int8, calib=calib, max_int8_drop=max_int8_drop, dynamic_batch=dynamic_batch,
                                converter=converter, samples=samples,
                                tome_r=_int_list(tome_sweep, "--tome-sweep") + fixed,
                                tome_matchers=tuple(m.strip() for m in tome_matcher.split(",") if m.strip()),
                                tome_bits=tome_bits, tome_auto=auto, tome_max_drop=tome_max_drop,
                                tome_threads=tome_threads)
    table = Table(title=f"edgekd export: {result.export_dir}", box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1),
                  pad_edge=False)  # a ToMe file's name is 30 characters: the numbers still fit 80 columns
    table.add_column("artifact", no_wrap=True)
    for col in ("size\nKB", "convert\ns", "max\n|dlogit|", "agree\n%", "test\ntop-1 %"):
        table.add_column(col, justify="right", no_wrap=True)
    for name, a in result.report["artifacts"].items():
        p = a["parity"]
        table.add_row(name, f"{a['size_bytes'] / 1024:,.0f}", f"{a['convert_s']:.1f}", f"{p['max_abs_logit_diff']:.2e}",
                      f"{p['top1_agreement']:.2f}", f"{a['test_top1']:.2f}")
    console.print(table)
    auto_choice = result.report.get("tome_auto")
    if auto_choice:
        console.print(f"--tome-r auto ({auto_choice['threads']} thread(s)): {auto_choice['reason']}; schedule "
                      f"{auto_choice['schedule']}", highlight=False)
    if result.int8_drop is not None:
        console.print(f"int8 vs fp32 top-1 drop: {result.int8_drop:+.2f} pt (limit {max_int8_drop} pt)")
    if result.refused:  # after the table: what was written is shown, then why the rest was not
        raise _fail(EdgekdError("; ".join(result.refused.values()) + " (every other file and export.json are "
                                "written)"), 1)
    if result.int8_drop_exceeded:
        raise _fail(EdgekdError(f"int8 student loses {result.int8_drop:.2f} pt top-1 against fp32, more than "
                                f"--max-int8-drop {max_int8_drop}"), 1)


def _bench_table(report: dict[str, Any]) -> None:
    from edgekd.bench import board_name, ok_hosts

    for host, h in ok_hosts(report).items():
        m = h["machine"]
        table = Table(title=f"edgekd bench: {host} ({board_name(m)}, {m.get('arch')}, "
                            f"{report['threads']} threads, {report['runs']} runs)",
                      box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False)  # fits 80 columns
        table.add_column("model", no_wrap=True)
        for col in ("KB", "p50\nms", "p90\nms", "p99\nms", "RSS\nMB", "top-1\n%", "p50\nratio", "size\nratio",
                    "RSS\nratio"):
            table.add_column(col, justify="right", no_wrap=True)
        for name, r in h["models"].items():
            lat, c = r["latency_ms"], h["comparisons"].get(name)
            ratios = ([f"{c['latency_p50_ratio']:.3f}", f"{c['size_ratio']:.3f}", f"{c['peak_rss_ratio']:.2f}"]
                      if c else ["", "", ""])
            acc = "" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}"
            table.add_row(name.removesuffix(".tflite"), f"{r['size_bytes'] / 1024:,.0f}", f"{lat['p50']:.3f}",
                          f"{lat['p90']:.3f}", f"{lat['p99']:.3f}", f"{r['memory_kb']['peak_rss'] / 1024:.1f}", acc,
                          *ratios)
        console.print(table)
        c = h["comparison"]
        if c and c["accuracy_diff"] is not None:
            console.print(f"{h['student']} on {host}: {c['speedup']:.2f}x the speed of teacher_fp32.tflite (p50), "
                          f"accuracy {100 * c['accuracy_diff']:+.2f} pt", highlight=False)
        for w in h["warnings"]:
            err_console.print(f"[yellow]warning:[/] {host}: {w}", highlight=False)
    for host, rows in report.get("tome", {}).items():
        base = {row["format"]: row["p50_ms"] for row in rows if row["r"] == 0}
        table = Table(title=f"ToMe on {host}", box=box.SIMPLE_HEAD)
        for col in ("r", "matcher", "format", "p50 ms", "vs r=0", "top-1 %"):
            table.add_column(col, justify="right")
        for row in rows:
            speed = f"{base[row['format']] / row['p50_ms']:.2f}x" if row["format"] in base else ""
            table.add_row(str(row["r"]), row["matcher"], row["format"], f"{row['p50_ms']:.3f}", speed,
                          f"{100 * row['accuracy']:.2f}")
        console.print(table)


def _gate_report(result: Any) -> int:
    """Print the gate table, append it to $GITHUB_STEP_SUMMARY; 0 when it passed, 1 when not."""
    import os

    from edgekd.gate import render_markdown

    table = Table(title=f"edgekd gate: {'PASS' if result.passed else 'FAIL'}")
    for col in ("check", "host", "value", "limit", "result"):
        table.add_column(col, justify="right" if col in ("value", "limit") else "left")
    for c in result.checks:
        table.add_row(c.name, c.host, "missing" if c.value is None else f"{c.value:.4g}",
                      f"{'<=' if c.kind == 'max' else '>='} {c.limit:g}",
                      "[green]pass[/]" if c.passed else "[bold red]FAIL[/]")
    console.print(table)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as f:  # appended, as GitHub Actions expects
            f.write(render_markdown(result))
    return 0 if result.passed else 1


def _ssh_options(port: Optional[int], identity: Optional[Path], known_hosts: Optional[Path],
                 accept_new_host_key: bool) -> Any:
    from edgekd.bench import SSHOptions

    return SSHOptions(port=port, identity=identity, known_hosts=known_hosts, accept_new_host_key=accept_new_host_key)


_HOST_HELP = "USER@BOARD or an ~/.ssh/config alias; repeat for several boards (benched concurrently)"
_PORT = typer.Option(None, help="SSH port [default: 22 or ~/.ssh/config]")
_IDENTITY = typer.Option(None, help="SSH private key file")
_KNOWN_HOSTS = typer.Option(None, help="known_hosts file to verify host keys against [default: OpenSSH's]")
_ACCEPT_NEW = typer.Option(False, help="trust and record the host key of a board never seen before")


@app.command()
def bench(
    export_dir: Path = typer.Argument(..., help="an export directory written by 'edgekd export', e.g. runs/x/export"),
    device: str = _option(BenchConfig, "device", help="device profile: local, rpi4, rpi5, generic-arm64"),
    host: list[str] = typer.Option([], help=_HOST_HELP),
    port: Optional[int] = _PORT,
    identity: Optional[Path] = _IDENTITY,
    known_hosts: Optional[Path] = _KNOWN_HOSTS,
    accept_new_host_key: bool = _ACCEPT_NEW,
    python: Optional[str] = _option(BenchConfig, "python"),
    threads: Optional[int] = _option(BenchConfig, "threads", help="interpreter threads [default: the profile's]"),
    runs: int = _option(BenchConfig, "runs"),
    warmup: int = _option(BenchConfig, "warmup"),
    samples: int = _option(BenchConfig, "samples"),
    timeout: float = _option(BenchConfig, "timeout"),
    remote_tmp: str = typer.Option("/tmp", help="folder on the board for the temporary bundle"),
    tome_sweep: str = typer.Option("", help="ViT: also bench the ToMe files for these r, e.g. 0,2,4,8 "
                                   "(written by 'edgekd export --tome-sweep'); auto: time every int8 ToMe file "
                                   "on each target and pick the fastest within --tome-max-drop of r = 0"),
    tome_max_drop: float = typer.Option(0.5, help="--tome-sweep auto: validation top-1 points a schedule may lose"),
) -> None:
    """Time and score the student (int8, fp32) against the teacher on boards over SSH, or here."""
    from edgekd.bench import bench as run_bench

    tome_auto = tome_sweep.strip() == "auto"

    with _user_errors("the remote temp dirs were removed"):
        with console.status(f"benchmarking on {', '.join(host) or 'this machine'}..."):
            result = run_bench(export_dir, device, tuple(host),
                               ssh=_ssh_options(port, identity, known_hosts, accept_new_host_key), python=python,
                               threads=threads, runs=runs, warmup=warmup, samples=samples, timeout=timeout,
                               remote_tmp=remote_tmp,
                               tome_sweep=() if tome_auto else _int_list(tome_sweep, "--tome-sweep"),
                               tome_auto=tome_auto, tome_max_drop=tome_max_drop)
    _bench_table(result.report)
    for host_name, choice in result.report.get("tome_auto", {}).items():
        console.print(f"ToMe auto on {host_name}: {choice['file']} (schedule {choice['schedule']}): {choice['reason']}")
    console.print(f"wrote {', '.join(str(f) for f in result.files)}")


def _thresholds(recipe: Optional[Path], **flags: Optional[float]) -> Any:
    from pydantic import ValidationError

    from edgekd.recipe import GateConfig, load_recipe

    base = load_recipe(recipe).gate.model_dump() if recipe else {}
    try:
        return GateConfig.model_validate({**base, **{k: v for k, v in flags.items() if v is not None}})
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0])
        hint = " (a fraction: 0.85 means 85 %)" if name == "min_accuracy" else ""
        raise EdgekdError(f"--{name.replace('_', '-')}: {err['msg'].lower()}{hint}") from None


@app.command()
def gate(
    bench_json: Path = typer.Argument(..., help="bench.json written by 'edgekd bench' (or its folder)"),
    recipe: Optional[Path] = typer.Option(None, help="take thresholds from this recipe's gate: section"),
    max_size_mb: Optional[float] = typer.Option(None, help="student file size limit, MB"),
    max_p50_ms: Optional[float] = typer.Option(None, help="student median latency limit, ms"),
    max_p90_ms: Optional[float] = typer.Option(None, help="student p90 latency limit, ms"),
    min_accuracy: Optional[float] = typer.Option(None, help="student top-1 on the board, a fraction 0..1"),
    max_latency_ratio: Optional[float] = typer.Option(None, help="student p50 / teacher p50 in the same run"),
    max_int8_drop: Optional[float] = typer.Option(None, help="int8 vs fp32 top-1 drop in points (export.json)"),
) -> None:
    """Pass/fail on size, latency and accuracy: exit 0 pass, 1 fail, 2 bad input."""
    from edgekd.gate import gate as run_gate

    with _user_errors("nothing was written"):
        thresholds = _thresholds(recipe, max_size_mb=max_size_mb, max_p50_ms=max_p50_ms, max_p90_ms=max_p90_ms,
                                 min_accuracy=min_accuracy, max_latency_ratio=max_latency_ratio,
                                 max_int8_drop=max_int8_drop)
        result = run_gate(bench_json, thresholds)
    raise typer.Exit(_gate_report(result))


@app.command()
def run(
    recipe: Path = _RECIPE,
    out: Optional[Path] = _OUT,
    host: list[str] = typer.Option([], help=_HOST_HELP + " [default: the recipe's bench.hosts, else local]"),
    port: Optional[int] = _PORT,
    identity: Optional[Path] = _IDENTITY,
    known_hosts: Optional[Path] = _KNOWN_HOSTS,
    accept_new_host_key: bool = _ACCEPT_NEW,
    set_: list[str] = typer.Option([], "--set", help="override any recipe field: --set gate.max_p90_ms=5"),
    qat_epochs: Optional[float] = typer.Option(None, min=0, help=_help(QatConfig, "epochs")),
) -> None:
    """The whole chain: distil, export, bench, gate; finished stages are not redone."""
    from edgekd.pipeline import run as run_chain
    from edgekd.recipe import load_recipe

    with _user_errors("run the same command again to continue where it stopped"):
        rec = load_recipe(recipe, {"distill.qat.epochs": qat_epochs, **_parse_sets(set_)})
        out_dir = out or Path("runs") / rec.name
        ssh = _ssh_options(port or rec.bench.port, identity, known_hosts, accept_new_host_key)
        with _RichProgress() as progress:
            result = run_chain(rec, out_dir, hosts=tuple(host), ssh=ssh, progress=progress)
    s = result.metrics["student"]
    console.print(f"student {s['arch']}: test top-1 {s['test_top1']:.2f}% (PyTorch)", highlight=False)
    for name, a in result.export_report["artifacts"].items():
        console.print(f"  {name}: {a['size_bytes'] / 1024:,.0f} KB, test top-1 {a['test_top1']:.2f}%", highlight=False)
    _bench_table(result.bench_report)
    for stage, what in result.stages.items():
        console.print(f"{stage:8s} {what}", highlight=False)
    code = _gate_report(result.gate_result) if result.gate_result else 0
    if result.int8_drop_exceeded:
        err_console.print(f"[bold red]error:[/] int8 student loses {result.export_report['int8_drop_top1']:.2f} pt "
                          f"top-1 against fp32, more than export.max_int8_drop {rec.export.max_int8_drop}")
        code = 1
    console.print(f"run directory: {result.run_dir}  (report: {result.run_dir / 'export' / 'report.md'})")
    raise typer.Exit(code)


class _SearchLines:
    """The search's progress: a line per trial, with trial n/N and the best so far."""

    def trial_started(self, number: int, done: int, total: int, label: str) -> None:
        console.print(f"[bold]trial {done + 1}/{total}[/] (#{number}) {label}", highlight=False)

    def trial_ended(self, row: dict[str, Any], done: int, total: int, best: dict[str, Any] | None) -> None:
        figures = f"p90 {row['p90_ms']:.3f} ms, {row['size_mb']:.3f} MB" if row["p90_ms"] is not None else ""
        val = f"int8 val {row['val_top1']:.2f}%" if row["val_top1"] is not None else ""
        best_text = f"  best so far: {best['config']} {best['val_top1']:.2f}%" if best else "  no trial inside the budget yet"
        console.print(f"  -> {row['state']}  {val}  {figures}  {row['reason'][:100]}".rstrip() + f"  [{done}/{total}]"
                      + best_text, highlight=False)


@app.command()
def search(
    recipe: Path = _RECIPE,
    budget: Optional[str] = typer.Option(None, help="limits of the int8 file on the target, e.g. "
                                         "'p90_ms<=20,size_mb<=2,rss_mb<=100' [default: the recipe's search.budget]"),
    target: str = typer.Option("local", help="local: time candidates on this machine; with --host, the board"),
    host: Optional[str] = typer.Option(None, help="USER@BOARD or an ~/.ssh/config alias: time candidates there"),
    device: Optional[str] = typer.Option(None, help="device profile: local, rpi4, rpi5, generic-arm64 "
                                         "[default: local, or generic-arm64 with --host]"),
    trials: Optional[int] = typer.Option(None, min=1, help="trials of the study, all workers together "
                                         "[default: the recipe's search.trials]"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="search directory [default: runs/<name>-search]"),
    study: Optional[str] = typer.Option(None, help="Optuna storage URL shared by several workers, e.g. "
                                        "postgresql://user@db/edgekd [default: sqlite:///DIR/study.db]"),
    port: Optional[int] = _PORT,
    identity: Optional[Path] = _IDENTITY,
    known_hosts: Optional[Path] = _KNOWN_HOSTS,
    accept_new_host_key: bool = _ACCEPT_NEW,
    set_: list[str] = typer.Option([], "--set", help="override any recipe field: --set search.trials=8"),
) -> None:
    """Find the best int8 student for a board under its budgets: every candidate distilled from
    one teacher and measured on the target (Optuna; workers may share one --study)."""
    import optuna

    from edgekd.recipe import load_recipe
    from edgekd.search import SearchTarget, parse_budget, search as run_search

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the trials' lines are printed below
    with _user_errors("run the same command again to continue the study where it stopped"):
        rec = load_recipe(recipe, _parse_sets(set_))
        limits = parse_budget(budget if budget is not None else rec.search.budget)
        if target != "local":
            raise EdgekdError(f"--target {target!r}: use --target local, or --host USER@BOARD for a board")
        dev = device or ("generic-arm64" if host else "local")
        ssh = _ssh_options(port or rec.bench.port, identity, known_hosts, accept_new_host_key)
        where = SearchTarget(dev, host, ssh, rec.bench)
        out_dir = out or Path("runs") / f"{rec.name}-search"
        with _RichProgress() as progress:
            result = run_search(rec, out_dir, budget=limits, target=where, trials=trials, storage=study,
                                progress=_SearchLines(), distill_progress=progress)
    console.print(f"study {result.study_name}: {len(result.trials)} trials, {len(result.front)} on the front "
                  f"({result.storage})", highlight=False)
    w = result.winner
    if w is None:
        err_console.print("[bold red]no winner:[/] no trained candidate stayed inside the budget; loosen --budget "
                          "or add smaller students or input sizes to search:")
        raise typer.Exit(1)
    console.print(f"winner {w['config']}: int8 val top-1 {w['val_top1']:.2f}%, test top-1 {w['test_top1']:.2f}%, "
                  f"p90 {w['remeasured']['p90_ms']:.3f} ms (measured again), {w['remeasured']['size_mb']:.3f} MB",
                  highlight=False)
    console.print(f"export dir: {w['export_dir']}\nreproduce: edgekd run {result.best_recipe}\n"
                  f"report: {out_dir / 'search.md'}", highlight=False)


@app.command()
def recipes(name: Optional[str] = typer.Argument(None, help="print this recipe's YAML, e.g. to start your own "
                                                 "from: edgekd recipes fashion_mnist_quick > my.yaml")) -> None:
    """List the recipes that ship with edgekd (give a name to run or distil one), or print one."""
    from edgekd.recipe import resolve_recipe, shipped_recipes

    if name is not None:
        with _user_errors("nothing was written"):
            if name.removesuffix(".yaml") not in shipped_recipes():
                raise EdgekdError(f"no shipped recipe '{name}'; choose one of {', '.join(shipped_recipes())}")
            text = resolve_recipe(name.removesuffix(".yaml")).read_text()
        typer.echo(text, nl=False)  # plain text, so it can be redirected into a file as it is
        return

    table = Table(title="edgekd recipes (edgekd run NAME, or a YAML file of your own)", box=box.SIMPLE_HEAD)
    table.add_column("name", no_wrap=True)
    table.add_column("what it is")
    for name, text in shipped_recipes().items():
        table.add_row(name, text)
    console.print(table)


@app.command()
def models(
    zoo: Optional[str] = typer.Option(None, help="timm or torchvision [default: both]"),
    filter_: str = typer.Option("", "--filter", help="only names that contain this text, e.g. mobilenet"),
) -> None:
    """List the models teacher.arch and student.arch accept: edgekd's own and the zoos'."""
    from edgekd.models import STUDENTS, TEACHERS
    from edgekd.models.zoo import list_models

    with _user_errors("nothing was written"):
        names = list_models(zoo, filter_)
    own = [n for n in [*TEACHERS, *STUDENTS] if filter_.lower() in n] if zoo is None else []
    for n in own:
        console.print(f"{n}  (edgekd, small-input stem)", highlight=False)
    for n in names:
        console.print(n, highlight=False, soft_wrap=True)
    err_console.print(f"{len(own) + len(names)} models", highlight=False)


if __name__ == "__main__":
    app()
