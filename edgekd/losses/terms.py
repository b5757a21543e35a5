"""Distillation losses as pure tensor functions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two NCHW maps to the spatial size of the smaller."""
    ha, hb = a.shape[-2:], b.shape[-2:]
    if ha == hb:
        return a, b
    if ha[0] * ha[1] > hb[0] * hb[1]:
        return F.adaptive_avg_pool2d(a, hb), b
    return a, F.adaptive_avg_pool2d(b, ha)


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Activation-based spatial attention (Zagoruyko & Komodakis 2016, "Paying More Attention
    to Attention", eq. 2 with F_sum^p): ``at(f) = vec(mean_c |f_c|^p) / ||vec(mean_c |f_c|^p)||_2``.

    f: (N, C, H, W) -> (N, H*W), each row of unit L2 norm. Computed in float32.
    """
    a = f.float().abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(a, p=2.0, dim=1)


def self_attention_map(f: torch.Tensor) -> torch.Tensor:
    """The AT-KD poster's variant: a parameter-free spatial self-attention over the stage.
    With X = vec(f) in R^{C x HW}: ``A = softmax(X^T X / sqrt(C))`` (rows: queries), the map is
    the attention each position receives averaged over queries, ``a = mean_q A[q, :]``,
    L2-normalised like ``attention_map``. f: (N, C, H, W) -> (N, H*W)."""
    x = f.float().flatten(2)  # N, C, HW
    logits = torch.bmm(x.transpose(1, 2), x) / math.sqrt(x.shape[1])  # N, HW(q), HW(k)
    a = logits.softmax(dim=-1).mean(dim=1)
    return F.normalize(a, p=2.0, dim=1)


def at_loss(t_feats: list[torch.Tensor], s_feats: list[torch.Tensor], p: float = 2.0,
            map_fn: str = "activation") -> torch.Tensor:
    """Attention transfer: ``sum over stage pairs of MSE(at(f_t), at(f_s))`` (Zagoruyko &
    Komodakis 2016, eq. 2, with the mean over positions). The larger map of a pair is
    average-pooled to the smaller one's size first; ``map_fn`` is "activation" or "self"."""
    total = s_feats[0].new_zeros((), dtype=torch.float32)
    for ft, fs in zip(t_feats, s_feats, strict=True):
        ft, fs = match_spatial(ft, fs)
        if map_fn == "self":
            at_t, at_s = self_attention_map(ft), self_attention_map(fs)
        else:
            at_t, at_s = attention_map(ft, p), attention_map(fs, p)
        total = total + F.mse_loss(at_s, at_t.detach())
    return total


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton, Vinyals & Dean 2015: ``T^2 · KL(softmax(z_t/T) || softmax(z_s/T))``, averaged over
    the batch. The T^2 keeps the gradient scale independent of T."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float().detach() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def hint_loss(t_feats: list[torch.Tensor], regressed_s_feats: list[torch.Tensor]) -> torch.Tensor:
    """FitNets (Romero et al. 2015): ``sum over pairs of MSE(f_t, r(f_s))`` where r is a learned
    1x1-conv regressor to the teacher's channels; spatial sizes are matched by pooling."""
    total = regressed_s_feats[0].new_zeros((), dtype=torch.float32)
    for ft, fs in zip(t_feats, regressed_s_feats, strict=True):
        ft, fs = match_spatial(ft, fs)
        total = total + F.mse_loss(fs.float(), ft.detach().float())
    return total


def softmax_kl(target_logits: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """HARD (Nix, Burg & Sinz 2023, eq. 1–2): ``D[a, b] = T^2 · KL(softmax(a/T) || softmax(b/T))``,
    averaged over the batch, with gradients through *both* sides (the augmentor is trained
    through the teacher's outputs too, unlike ``kd_loss``, which detaches the teacher)."""
    t = temperature
    log_p = F.log_softmax(target_logits.float() / t, dim=1)
    log_q = F.log_softmax(logits.float() / t, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (t * t)


def warmup_scale(step: int, warmup_steps: int) -> float:
    """Linear warm-up of the distillation terms: ``min(1, (step + 1) / warmup_steps)`` for the
    0-based optimisation ``step`` (1 for every step when ``warmup_steps`` is 0). The teacher's
    targets weigh in gradually while the student's cross-entropy trains from the first step, a
    common schedule for the KD term (e.g. DeiT-style and CRD-style trainers warm the loss mix)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)
