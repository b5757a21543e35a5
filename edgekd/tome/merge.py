"""Bipartite soft matching and size-weighted merging (ToMe §3) with fixed shapes, in two forms.

Two forms of the same merge. The gather form picks the r merged and the kept tokens with
fixed-size index tensors (a ``topk`` of r, and a ``topk`` of the kept indices in place of a sort,
which TFLite lacks) and adds the merged tokens into their destinations with ``scatter_reduce`` in
PyTorch, or, while exporting, with a (t_b × r) 0/1 matrix (a scatter does not convert). The matmul
form builds every step as 0/1 matrices compared against ``arange`` and merges with two matmuls:
only bool/int index arithmetic, Equal, Select, TopK, ArgMax and BatchMatMul, all in ONNX opset 17
and TFLite's builtins, int8 included. Both equal the reference's gather/scatter (tests check it);
``default_form`` picks the faster one for where the model is going.
"""

from __future__ import annotations

import functools
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


def exporting() -> bool:
    """True while torch.onnx, torch.export (litert-torch) or the tracer records the model."""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def default_form(export: bool | None = None) -> str:
    """The merge form for where the model is going. PyTorch and ONNX: gather (at 197 tokens, r = 8,
    onnxruntime ran the gather-form match + merge in 0.68x the time of the 0/1-matrix one).
    TFLite (torch.export, i.e. litert-torch): matmul, as LiteRT ran it 7 % faster than gathers,
    whose GATHER_ND/TOPK ops XNNPACK does not take (``benchmarks/tome_profile.py``: op census)."""
    export = exporting() if export is None else export
    return "matmul" if export and not torch.onnx.is_in_onnx_export() else "gather"


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


def _offsets(t_a: int, t_b: int, dtype: torch.dtype,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The class token's protection (a (t_a, 1) column) and the tie-breaking offsets of B and A."""
    protect = ((torch.arange(t_a, device=device) == 0).to(dtype) * _PROTECT)[:, None]
    return (protect, _TIE * torch.arange(t_b, device=device, dtype=dtype) / t_b,
            _TIE * torch.arange(t_a, device=device, dtype=dtype) / t_a)


_cached_offsets = functools.lru_cache(maxsize=256)(_offsets)


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = True, matcher: str = "exact",
                            planes: torch.Tensor | None = None, form: str | None = None) -> Merge | None:
    """ToMe's bipartite soft matching: merge the ``r`` tokens of set A most similar to some token
    of set B into it. Returns ``merge(x)`` (sum mode, shape (B, t − r, C)) or None when r = 0.

    Tokens alternate into A (even positions) and B (odd); each A token keeps its best B match;
    the r best edges merge; the class token (position 0, in A) is protected. Output order is the
    reference's: the unmerged A tokens in their original order (class token first), then B.
    ``form``: ``gather`` or ``matmul`` (0/1 matrices for every step); default: the faster one
    where the model runs (see ``default_form``).
    """
    export = exporting()
    form = form or default_form(export)
    if form not in ("gather", "matmul"):
        raise ValueError(f"unknown merge form {form!r}; choose gather or matmul")
    t = metric.shape[1]
    r = min(r, (t - int(class_token)) // 2)
    if r <= 0:
        return None
    with torch.no_grad():
        scores = match_scores(metric, matcher, planes)
        t_a, t_b = scores.shape[1], scores.shape[2]
        offsets = _cached_offsets if form == "gather" else _offsets  # eager: a few ops fewer per block
        protect, tie_b, tie_a = offsets(t_a, t_b, scores.dtype, scores.device)
        if class_token:
            scores = scores + protect
        scores = scores - tie_b
        node_max, node_idx = scores.max(dim=-1)  # each A token's best B token
        node_max = node_max - tie_a
        if form == "gather":
            if export:
                src_idx = node_max.topk(r, dim=-1).indices  # the r A tokens that merge away
                # The kept A tokens in their original order (class token first), without a sort
                # (ONNX and TFLite have none; a top-k of every element lowers to one): a top-k of
                # -index over the kept, the merged pushed below them, in int32 as TFLite's TopK takes it.
                merged = _hits(src_idx, t_a).any(dim=1)
                index = torch.arange(t_a, device=merged.device, dtype=torch.int32)
                unm_idx = torch.where(merged, -2 * t_a, -index).topk(t_a - r, dim=-1).indices
            else:  # the same indices; one argsort and one small sort are cheaper in eager (422 vs 520 µs)
                order = node_max.argsort(dim=-1, descending=True)
                src_idx, unm_idx = order[:, :r], order[:, r:].sort(dim=-1).values
            dst_idx = node_idx.gather(1, src_idx)  # the B tokens they merge into
            # a fixed (t_b, r) 0/1 matrix adds the merged tokens where a scatter would not convert
            into = _hits(dst_idx, t_b).transpose(1, 2) if export else None
            src_idx, unm_idx, dst_idx = src_idx[..., None], unm_idx[..., None], dst_idx[..., None]

            def merge_gather(x: torch.Tensor) -> torch.Tensor:
                a, b = x[:, ::2], x[:, 1::2]
                c = x.shape[-1]
                src = a.gather(1, src_idx.expand(-1, -1, c))
                if into is None:
                    b = b.scatter_reduce(1, dst_idx.expand(-1, -1, c), src, reduce="sum")
                else:
                    b = b + _select(into, x.dtype) @ src
                return torch.cat([a.gather(1, unm_idx.expand(-1, -1, c)), b], dim=1)

            return merge_gather
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
