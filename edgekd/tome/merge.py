"""Bipartite soft matching and size-weighted merging (ToMe §3), as one-hot matrices and matmuls.

The reference gathers and ``scatter_reduce``s with data-dependent indices; those do not convert
to TFLite (and not everywhere to ONNX). Here the token count after merging is a Python int fixed
by ``r``, the choice of tokens is a ``topk`` and an ``argmax``, and the merge itself is two
matmuls with 0/1 matrices built by comparing indices against ``arange``: every op is in
ONNX opset 17 and in TFLite's builtins, and the result equals the reference's (tests check it).
"""

from __future__ import annotations

from typing import Callable

import torch

MATCHERS = ("exact", "lsh")
# Ties are common under LSH (scores are multiples of 2/b) and runtimes break them differently, so
# an exported model would merge other tokens than PyTorch. A tiny index-dependent offset makes
# every choice unique and the same everywhere; it is far below any real score difference.
_TIE = 1e-5
# Added to the class token's row of scores so it is never chosen to merge away. A finite value
# (cosine and code agreement lie in [-1, 1]) keeps int8 quantisation ranges sane, unlike -inf.
_PROTECT = -10.0

Merge = Callable[[torch.Tensor], torch.Tensor]


def _hits(index: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean one-hot of ``index`` over ``n`` places, as Equal against an arange (converts where
    OneHot does not). Index arithmetic stays in bool and int tensors, which int8 quantisation leaves
    alone: an equality on quantised floats (a slot of 24.8 for 25) would drop tokens."""
    return index.unsqueeze(-1) == torch.arange(n, device=index.device)


def _select(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 0/1 matrix from a mask, as a Select (an Equal + Cast lowers to TFLite one_hot, which has
    no int8 kernel)."""
    return torch.where(mask, torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype))


def match_scores(metric: torch.Tensor, matcher: str = "exact", planes: torch.Tensor | None = None) -> torch.Tensor:
    """Scores between set A (even tokens) and set B (odd tokens), shape (B, ceil(t/2), floor(t/2)).

    exact: cosine similarity of the keys (the reference). lsh: random-hyperplane codes
    ``sign(k · P)`` with ``P`` a d × b Gaussian matrix; the score is the fraction of agreeing bits
    mapped to [-1, 1] (``codes_a · codes_b / b``), whose expectation is ``1 − 2θ/π`` for keys at
    angle θ (Charikar 2002): a monotone function of the cosine, so with enough bits it ranks
    pairs as the cosine does.
    """
    if matcher == "exact":
        m = metric / metric.norm(dim=-1, keepdim=True)
        return m[:, ::2] @ m[:, 1::2].transpose(-1, -2)
    if matcher == "lsh":
        if planes is None:
            raise ValueError("the lsh matcher needs its hyperplanes")
        codes = torch.where(metric @ planes >= 0, 1.0, -1.0).to(metric.dtype)
        return (codes[:, ::2] @ codes[:, 1::2].transpose(-1, -2)) / planes.shape[1]
    raise ValueError(f"unknown matcher {matcher!r}; choose from {', '.join(MATCHERS)}")


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = True, matcher: str = "exact",
                            planes: torch.Tensor | None = None) -> Merge | None:
    """ToMe's bipartite soft matching: merge the ``r`` tokens of set A most similar to some token
    of set B into it. Returns ``merge(x)`` (sum mode, shape (B, t − r, C)) or None when r = 0.

    Tokens alternate into A (even positions) and B (odd); each A token keeps its best B match;
    the r best edges merge; the class token (position 0, in A) is protected. Output order is the
    reference's: the unmerged A tokens in their original order (class token first), then B.
    """
    t = metric.shape[1]
    r = min(r, (t - int(class_token)) // 2)
    if r <= 0:
        return None
    with torch.no_grad():
        scores = match_scores(metric, matcher, planes)
        if class_token:
            row = (torch.arange(scores.shape[1], device=scores.device) == 0).to(scores.dtype) * _PROTECT
            scores = scores + row[:, None]
        t_a, t_b = scores.shape[1], scores.shape[2]
        scores = scores - _TIE * torch.arange(t_b, device=scores.device, dtype=scores.dtype) / t_b
        node_max, node_idx = scores.max(dim=-1)  # each A token's best B token
        node_max = node_max - _TIE * torch.arange(t_a, device=scores.device, dtype=scores.dtype) / t_a
        src_idx = node_max.topk(r, dim=-1).indices  # the r A tokens that merge away

    def merge(x: torch.Tensor) -> torch.Tensor:
        merged = _hits(src_idx, t_a).any(dim=1)  # (B, t_a): True where an A token merges away
        kept = ~merged
        slot = torch.cumsum(kept.to(torch.int32), dim=-1) - 1  # place of each kept A token among the kept
        keep = _select(_hits(slot, t_a - r) & kept.unsqueeze(-1), x.dtype).transpose(1, 2)  # (B, t_a - r, t_a)
        into = _select(_hits(node_idx, t_b) & merged.unsqueeze(-1), x.dtype).transpose(1, 2)  # (B, t_b, t_a)
        a, b = x[:, ::2], x[:, 1::2]
        return torch.cat([keep @ a, b + into @ a], dim=1)

    return merge


def merge_wavg(merge: Merge, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of merged tokens; returns the new tokens and their sizes (token mass)."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    merged = merge(torch.cat([x * size, size], dim=-1))  # one merge for both: same matrices
    x, size = merged[..., :-1], merged[..., -1:]
    return x / size, size


def tokens_after(tokens: int, schedule: list[int], class_token: bool = True) -> list[int]:
    """Token count entering each block and after the last, for a per-block r schedule."""
    counts = [tokens]
    for r in schedule:
        t = counts[-1]
        counts.append(t - min(r, (t - int(class_token)) // 2))
    return counts
