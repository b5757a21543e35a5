"""PNG plots of a distil run: training curves, confusion matrix, teacher-vs-student attention."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from edgekd.checkpoint import atomic_path
from edgekd.losses.terms import attention_map, match_spatial
from edgekd.models import FeatureTaps, StagePair


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_curves(metrics: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for role, style in (("teacher", "--"), ("student", "-"), ("baseline", ":")):
        section = metrics.get(role) or {}
        hist = section.get("epochs") or []
        if not hist:
            continue
        ep = [h["epoch"] for h in hist]
        ax_loss.plot(ep, [h["loss"] for h in hist], style, label=f"{role if role != 'baseline' else 'student alone'} loss")
        for key in ("train_top1", "val_top1", "test_top1"):
            label = f"{role} {key[:-5]}" if role != "baseline" else f"student alone {key[:-5]}"
            ax_acc.plot(ep, [h[key] for h in hist], style, marker=".", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_confusion(cm: list[list[int]], names: list[str], path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    m = torch.tensor(cm, dtype=torch.float32)
    norm = m / m.sum(1, keepdim=True).clamp_min(1)
    k = len(names)
    size = min(4 + 0.45 * k, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    if k <= 20:
        ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
        for i in range(k):
            for j in range(k):
                if m[i, j] > 0:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


@torch.no_grad()
def plot_attention(teacher: nn.Module, student: nn.Module, pairs: list[StagePair], images_u8: torch.Tensor,
                   x: torch.Tensor, path: Path) -> Path:
    """Rows: test images; columns: the image, then teacher and student attention maps per pair."""
    import matplotlib.pyplot as plt

    t_taps = FeatureTaps(teacher, [p.teacher for p in pairs])
    s_taps = FeatureTaps(student, [p.student for p in pairs])
    teacher.eval()
    student.eval()
    teacher(x)
    student(x)
    maps = []
    for ft, fs in zip(t_taps.features, s_taps.features, strict=True):
        ft, fs = match_spatial(ft.float(), fs.float())
        h, w = ft.shape[-2:]
        maps.append((attention_map(ft).view(-1, h, w).cpu().numpy(), attention_map(fs).view(-1, h, w).cpu().numpy()))
    t_taps.remove()
    s_taps.remove()
    n, cols = len(x), 1 + 2 * len(pairs)
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.6 * n), squeeze=False)
    for i in range(n):
        img = images_u8[i].cpu()
        img = (img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)).numpy()
        axes[i, 0].imshow(img, cmap="gray")
        for j, (pair, (mt, ms)) in enumerate(zip(pairs, maps, strict=True)):
            axes[i, 1 + 2 * j].imshow(mt[i], cmap="inferno")
            axes[i, 2 + 2 * j].imshow(ms[i], cmap="inferno")
            if i == 0:
                axes[i, 1 + 2 * j].set_title(f"T {pair.teacher}", fontsize=7)
                axes[i, 2 + 2 * j].set_title(f"S {pair.student}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    return _save(fig, path)


@torch.no_grad()
def plot_augmentors(hard: Any, images_u8: torch.Tensor, path: Path, columns: int = 6) -> Path:
    """augmentor.png: the same test images (rows) through several saved augmentors (columns:
    the original, then pool members from the first to the last saved), so one sees what HARD learned."""
    import copy

    import matplotlib.pyplot as plt

    x01 = images_u8.float().div(255.0)
    pool = hard.pool
    picks = sorted({round(i * (len(pool) - 1) / max(1, columns - 1)) for i in range(columns)})
    module = copy.deepcopy(hard.augmentor).eval()
    gen = torch.Generator(device=x01.device).manual_seed(0)
    cols = [("original", x01)]
    for i in picks:
        module.load_state_dict(pool[i])
        cols.append((f"saved #{i}", module(x01, gen).clamp(0, 1)))
    n = len(x01)
    fig, axes = plt.subplots(n, len(cols), figsize=(1.5 * len(cols), 1.5 * n), squeeze=False)
    for j, (title, batch) in enumerate(cols):
        for i in range(n):
            img = batch[i].cpu()
            axes[i, j].imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray", vmin=0, vmax=1)
            axes[i, j].axis("off")
        axes[0, j].set_title(title, fontsize=8)
    fig.suptitle(f"{type(hard.augmentor).__name__}: {len(pool)} saved, {hard.switches} switches", fontsize=9)
    return _save(fig, path)


def write_plots(run_dir: Path, metrics: dict[str, Any], teacher: nn.Module | None, student: nn.Module,
                pairs: list[StagePair], class_names: list[str], images_u8: torch.Tensor,
                x: torch.Tensor) -> list[Path]:
    """curves.png, confusion.png and (with a teacher and stage pairs) attention.png, the last
    on ``images_u8`` (a few test images) and ``x`` (the same, normalised)."""
    import matplotlib

    matplotlib.use("Agg")
    files = [plot_curves(metrics, run_dir / "curves.png"),
             plot_confusion(metrics["student"]["confusion_matrix"], class_names,
                            run_dir / "confusion.png", f"student ({metrics['method']}) on the test set")]
    if teacher is not None and pairs:
        files.append(plot_attention(teacher, student, pairs, images_u8, x, run_dir / "attention.png"))
    return files
