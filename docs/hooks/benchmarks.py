"""MkDocs hook: the measurement tables of ``benchmarks/`` (their .md and the .png they show) are
pages of the site as they are, so the docs link them instead of copying their numbers."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]


def on_files(files: Files, config) -> Files:
    for path in sorted((ROOT / "benchmarks").iterdir()):
        if path.suffix in (".md", ".png"):
            files.append(File(f"benchmarks/{path.name}", str(ROOT), config["site_dir"],
                              config["use_directory_urls"]))
    return files
