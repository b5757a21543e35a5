"""QAT's wall time as a share of the float student's epochs, measured again on a quiet machine.

A quantization table keeps each QAT cell's wall time, but leaves out those measured while other
jobs ran (its ``walls_under_load``). This adds the table's QAT epochs to a fresh copy of a family's
float student (as the table trained it: the table's own recipe, teacher and ``--set``s, read back
from its first command) and prints the QAT epochs' wall over the float epochs' (both from the
run's log.csv; the float epochs are the table's). Nothing is written to the table. Run it with
nothing else running.

    python benchmarks/qat_wall.py --table benchmarks/quantization_clip --families timm/mobilenetv3_small_100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantization import (DEFAULT_QAT_EPOCHS, base_recipe, command_args, copy_float_student,  # noqa: E402
                          epochs_wall, student_run, with_qat)

from edgekd import artifacts  # noqa: E402
from edgekd.distill.stage import distill  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", default="benchmarks/quantization_clip", help="the table, without .json")
    ap.add_argument("--families", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--qat-epochs", type=float, default=None, help="default: the table's --qat-epochs")
    args = ap.parse_args(argv)
    data = json.loads(Path(f"{args.table}.json").read_text())
    table = command_args(data["commands"][0])  # its recipe, teacher and --sets
    qat_epochs = args.qat_epochs or table.qat_epochs or DEFAULT_QAT_EPOCHS
    cells = data["cells"]
    runs = Path(f"{args.table}_runs")
    for arch in args.families.split(","):
        method = cells.get(f"{arch}|seed={args.seed}|float", {}).get("method")
        recipe, run_dir = student_run(base_recipe(table), arch, args.seed, method or "atkd", runs)
        float_dir = run_dir.with_name(run_dir.name + "_float")
        if method is None or not float_dir.is_dir():
            raise SystemExit(f"{args.table} has no float student of {arch}, seed {args.seed}, on disk ({float_dir})")
        with tempfile.TemporaryDirectory(dir=runs) as tmp:
            copy = Path(tmp) / run_dir.name
            copy_float_student(float_dir, copy)
            load = os.getloadavg()[0]
            distill(with_qat(recipe, qat_epochs), copy, resume=True)
            qat, student = epochs_wall(copy, artifacts.QAT_ROLE), epochs_wall(copy, "student")
        print(f"{arch} seed {args.seed}: {qat_epochs:g} QAT epoch(s) {qat:.2f} s, float epochs {student:.2f} s: "
              f"QAT {100 * qat / student:.1f} % of the student's (load average {load:.2f} before, "
              f"{os.getloadavg()[0]:.2f} after)", flush=True)


if __name__ == "__main__":
    main()
