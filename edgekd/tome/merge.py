"""Bipartite soft matching and size-weighted merging (ToMe §3) with fixed shapes, in two forms.

Two forms of the same merge. The gather form picks the r merged and the kept tokens by index: in
PyTorch with a sort and adds the merged tokens into their destinations as rows of one matrix
(``index_select``, ``index_add_``: ``merge_rows``); while exporting to ONNX with fixed-size index
tensors (a ``topk`` of r, and a ``topk`` of the kept indices in place of a sort, which TFLite
lacks) and a (t_b × r) 0/1 matrix for the adds (a scatter does not convert). The matmul form is
written for LiteRT's XNNPACK delegate: every step is float arithmetic that XNNPACK runs (step
functions from ReLU and Ceil, ranks as sums of pairwise comparisons, 0/1 matrices applied with
batched matmuls), with no ArgMax, TopK, Select, CumSum, L2Normalization, strided slice or
dynamic-weight FullyConnected, each of which XNNPACK refuses and which split the graph into one
delegate partition per merging block (``benchmarks/tome_profile.py``: op census). Both equal the
reference's gather/scatter (tests check it); ``default_form`` picks the faster one for where the
model is going.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch

MATCHERS = ("exact", "lsh", "bucketed")
# bucketed: tokens per chunk of the hash-sorted sequence (the fixed bucket capacity)
BUCKET_SIZE = 32
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
    TFLite (torch.export, i.e. litert-torch): matmul, the form XNNPACK runs whole: the index form
    before it (TopK, ArgMax, OneHot, CumSum, Select) split the graph at every merging block and
    made r = 8 slower than r = 0 (``benchmarks/tome_profile.py --exported``)."""
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


# Any positive float difference (subnormals aside) times this is >= 1, so ceil(relu(d * _BIG))
# is a step function of d > 0 that XNNPACK can run; scores lie in [-12, 2], far from overflow.
_BIG = 1e30


def _at_most_one(v: torch.Tensor) -> torch.Tensor:
    """min(v, 1) for v >= 0 where v is a ReLU's output, written as ReLU: the converter fuses a ReLU
    followed by a minimum into TFLite's RELU_0_TO_1, which XNNPACK does not run."""
    return 1.0 - torch.relu(1.0 - v)


def _positive(d: torch.Tensor) -> torch.Tensor:
    """1.0 where d > 0, else 0.0, in float ops only: three ops (MUL, CEIL with the ReLU fused, MINIMUM)
    where ``_at_most_one`` takes five; a merging block has three of these on (t/2)² elements."""
    return torch.minimum(torch.ceil(torch.relu(d * _BIG)), torch.ones((), dtype=d.dtype, device=d.device))


def split_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Set A (even positions) and set B (odd) as ``x[:, ::2], x[:, 1::2]``, but with a reshape and
    stride-1 slices: TFLite's STRIDED_SLICE with stride 2 is not run by XNNPACK."""
    n, t, c = x.shape
    pairs = x[:, : t - t % 2].reshape(n, t // 2, 2 * c)
    a, b = pairs[..., :c], pairs[..., c:]
    return (torch.cat([a, x[:, t - 1:]], dim=1), b) if t % 2 else (a, b)


def match_scores(metric: torch.Tensor, matcher: str = "exact", planes: torch.Tensor | None = None,
                 form: str = "gather") -> torch.Tensor:
    """Scores between set A (even tokens) and set B (odd tokens), shape (B, ceil(t/2), floor(t/2)).

    exact: cosine similarity of the keys (the reference). lsh: random-hyperplane codes
    ``sign(k · P)`` with ``P`` a d × b Gaussian matrix; the score is the fraction of agreeing bits
    mapped to [-1, 1] (``codes_a · codes_b / b``), whose expectation is ``1 − 2θ/π`` for keys at
    angle θ (Charikar 2002): a monotone function of the cosine, so with enough bits it ranks
    pairs as the cosine does. ``form="matmul"``: the same numbers from ops XNNPACK runs (see the
    module's docstring).
    """
    if matcher not in ("exact", "lsh"):  # bucketed has no dense score matrix: bucketed_best_match
        raise ValueError(f"unknown matcher {matcher!r}; choose from exact, lsh")
    if matcher == "lsh" and planes is None:
        raise ValueError("the lsh matcher needs its hyperplanes")
    if form == "matmul":
        if matcher == "exact":  # a multiply by rsqrt: litert-torch fuses a divide by the norm into
            m = metric * torch.rsqrt((metric * metric).sum(dim=-1, keepdim=True))  # L2_NORMALIZATION
        else:  # sign as a step function (a Select would leave XNNPACK)
            m = 1.0 - 2.0 * _positive(-(metric @ planes))
        a, b = split_tokens(m)
        # einsum lowers to BATCH_MATMUL; ``a @ b.mT`` to a FullyConnected with dynamic weights,
        # which XNNPACK refuses
        scores = torch.einsum("nic,njc->nij", a, b)
        return scores if matcher == "exact" else scores / planes.shape[1]
    if matcher == "exact":
        m = metric / metric.norm(dim=-1, keepdim=True)
        return m[:, ::2] @ m[:, 1::2].transpose(-1, -2)
    codes = torch.where(metric @ planes >= 0, 1.0, -1.0).to(metric.dtype)
    return (codes[:, ::2] @ codes[:, 1::2].transpose(-1, -2)) / planes.shape[1]


def bucketed_best_match(metric: torch.Tensor, planes: torch.Tensor,
                        bucket_size: int = BUCKET_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Each A token's best B token (cosine of the keys), searched only within its hash bucket:
    LSH that saves work rather than replacing the score (Reformer's bucketing, Kitaev et al. 2020).

    Angular LSH (Andoni et al. 2015): a token's bucket is ``argmax([k·P, −k·P])`` over ``2h``
    buckets for the d × h hyperplanes ``P``. The tokens of A and B together are sorted by (bucket,
    position) and cut into chunks of ``bucket_size`` — a fixed capacity, so every shape is static
    — and each A token is scored against the B tokens of its chunk only: ``t · s · d`` multiply-adds
    instead of exact matching's ``t_a · t_b · d`` (at 785 tokens, s = 32, d = 32: 0.8 M for 4.9 M).
    An A token with no B token in its chunk scores −2 and so merges last.
    Returns (B, ceil(t/2)) best scores and the index of that B token in set B.
    """
    n, t, d = metric.shape
    m = metric / metric.norm(dim=-1, keepdim=True)
    projected = m @ planes
    bucket = torch.cat([projected, -projected], dim=-1).argmax(dim=-1)
    position = torch.arange(t, device=m.device)
    order = (bucket * t + position).argsort(dim=-1)  # by bucket, then position: deterministic
    pad = -t % bucket_size
    keys = m.gather(1, order[..., None].expand(-1, -1, d))
    is_b = order % 2 == 1  # B is the odd positions
    if pad:  # padding joins the last chunk as neither A nor B
        keys = torch.cat([keys, keys.new_zeros(n, pad, d)], dim=1)
        is_b = torch.cat([is_b, is_b.new_zeros(n, pad)], dim=1)
        order = torch.cat([order, order.new_zeros(n, pad)], dim=1)
    chunks = keys.view(n, -1, bucket_size, d)
    scores = chunks @ chunks.transpose(-1, -2)  # (B, chunks, s, s)
    scores = torch.where(is_b.view(n, -1, 1, bucket_size), scores, scores.new_tensor(-2.0))
    best, column = scores.max(dim=-1)
    partner = order.view(n, -1, bucket_size).gather(2, column).view(n, -1)[:, :t]  # position of the B token
    unsort = order[:, :t].argsort(dim=-1)
    best = best.view(n, -1)[:, :t].gather(1, unsort)[:, ::2]
    partner = partner.gather(1, unsort)[:, ::2] // 2
    # an A token with no B token in its chunk (score −2) points at B token 0: its argmax column was
    # an A token or padding, whose index may lie past the end of B; it merges last, and only when r
    # exceeds the A tokens that have a partner (late blocks of a large r)
    return best, torch.where(best > -1.5, partner, torch.zeros_like(partner))


def _offsets(t_a: int, t_b: int, dtype: torch.dtype,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The class token's protection (a (t_a, 1) column) and the tie-breaking offsets of B and A."""
    protect = ((torch.arange(t_a, device=device) == 0).to(dtype) * _PROTECT)[:, None]
    return (protect, _TIE * torch.arange(t_b, device=device, dtype=dtype) / t_b,
            _TIE * torch.arange(t_a, device=device, dtype=dtype) / t_a)


_cached_offsets = functools.lru_cache(maxsize=256)(_offsets)


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = True, matcher: str = "exact",
                            planes: torch.Tensor | None = None, form: str | None = None,
                            bucket_size: int = BUCKET_SIZE) -> Merge | None:
    """ToMe's bipartite soft matching: merge the ``r`` tokens of set A most similar to some token
    of set B into it. Returns ``merge(x)`` (sum mode, shape (B, t − r, C)) or None when r = 0.

    Tokens alternate into A (even positions) and B (odd); each A token keeps its best B match;
    the r best edges merge; the class token (position 0, in A) is protected. Output order is the
    reference's: the unmerged A tokens in their original order (class token first), then B.
    ``form``: ``gather`` or ``matmul`` (0/1 matrices for every step); default: the faster one
    where the model runs (see ``default_form``). ``matcher``: exact (cosine), lsh (agreement of
    hash codes) or bucketed (cosine within hash buckets of ``bucket_size``; gather form only).
    """
    export = exporting()
    form = "gather" if matcher == "bucketed" else form or default_form(export)  # a sort: no matmul form
    if form not in ("gather", "matmul"):
        raise ValueError(f"unknown merge form {form!r}; choose gather or matmul")
    if matcher not in MATCHERS:
        raise ValueError(f"unknown matcher {matcher!r}; choose from {', '.join(MATCHERS)}")
    if matcher != "exact" and planes is None:
        raise ValueError(f"the {matcher} matcher needs its hyperplanes")
    t = metric.shape[1]
    r = min(r, (t - int(class_token)) // 2)
    if r <= 0:
        return None
    # no_grad keeps training from differentiating the matching; while exporting it would become a
    # higher-order op whose tuple output int8 calibration cannot observe (and export has no grad)
    with contextlib.nullcontext() if export else torch.no_grad():
        if form == "gather":
            t_a, t_b = (t + 1) // 2, t // 2
            protect, tie_b, tie_a = _cached_offsets(t_a, t_b, metric.dtype, metric.device)
            if matcher == "bucketed":
                node_max, node_idx = bucketed_best_match(metric, planes, bucket_size)
                node_max = node_max + protect[:, 0] if class_token else node_max
            else:
                scores = match_scores(metric, matcher, planes, form)
                if class_token:
                    scores = scores + protect
                scores = scores - tie_b
                node_max, node_idx = scores.max(dim=-1)  # each A token's best B token
            node_max = node_max - tie_a
            if not export:  # eager: one argsort and one small sort, cheaper than the top-ks below (422 vs 520 µs)
                order = node_max.argsort(dim=-1, descending=True)
                src_idx, unm_idx = order[:, :r], order[:, r:].sort(dim=-1).values
                return merge_rows(t, src_idx, unm_idx, node_idx.gather(1, src_idx))
            src_idx = node_max.topk(r, dim=-1).indices  # the r A tokens that merge away
            # The kept A tokens in their original order (class token first), without a sort
            # (ONNX and TFLite have none; a top-k of every element lowers to one): a top-k of
            # -index over the kept, the merged pushed below them, in int32 as TFLite's TopK takes it.
            merged = _hits(src_idx, t_a).any(dim=1)
            index = torch.arange(t_a, device=merged.device, dtype=torch.int32)
            unm_idx = torch.where(merged, -2 * t_a, -index).topk(t_a - r, dim=-1).indices
            dst_idx = node_idx.gather(1, src_idx)  # the B tokens they merge into
            # a fixed (t_b, r) 0/1 matrix adds the merged tokens where a scatter would not convert
            into = _hits(dst_idx, t_b).transpose(1, 2)
            src_idx, unm_idx = src_idx[..., None], unm_idx[..., None]

            def merge_gather(x: torch.Tensor) -> torch.Tensor:
                a, b = x[:, ::2], x[:, 1::2]
                c = x.shape[-1]
                src = a.gather(1, src_idx.expand(-1, -1, c))
                return torch.cat([a.gather(1, unm_idx.expand(-1, -1, c)), b + _select(into, x.dtype) @ src], dim=1)

            return merge_gather
        keep, pick, into = match_matrices(match_scores(metric, matcher, planes, form), r, class_token)
    return merge_by_matrices(keep, pick, into)


@functools.lru_cache(maxsize=256)
def _row_offsets(n: int, t: int, r: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For ``merge_rows``: each image's first row in (n · t, C), B's rows, and where B starts in each
    image's (t − r) output rows."""
    t_a, t_b = (t + 1) // 2, t // 2
    image = torch.arange(n, device=device)[:, None]
    return image * t, 2 * torch.arange(t_b, device=device) + 1 + image * t, image * (t - r) + (t_a - r)


def merge_rows(t: int, src_idx: torch.Tensor, unm_idx: torch.Tensor, dst_idx: torch.Tensor) -> Merge:
    """The merge for eager PyTorch: the tokens as rows of one (n · t, C) matrix, the output's rows
    picked with one ``index_select`` (kept A tokens, then B) and the merged ones added into theirs
    with one ``index_add_``. The same result as the reference's per-image gathers and scatter_reduce
    on the strided halves ``x[:, ::2]``, ``x[:, 1::2]`` (tests check it), faster in eager: one block's
    matching + size-weighted merge at 197 tokens, r = 8, took 655 vs 953 µs at batch 8 and 3.9 vs
    5.2 ms at batch 32 (quiet, interleaved; the same at batch 1, where dispatch dominates)."""
    n, r = src_idx.shape
    first, b_rows, b_start = _row_offsets(n, t, r, src_idx.device)
    out_rows = torch.cat([2 * unm_idx + first, b_rows], dim=1).view(-1)
    src_rows, dst_rows = (2 * src_idx + first).view(-1), (dst_idx + b_start).view(-1)

    def merge(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = rows.index_select(0, out_rows)
        return out.index_add_(0, dst_rows, rows.index_select(0, src_rows)).view(n, t - r, -1)

    return merge


def matmul_constants(t_a: int, t_b: int, r: int, dtype: torch.dtype = torch.float32,
                     device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The fixed tensors of the matmul form for t_a A tokens, t_b B tokens and r merges: the class
    token's protection, the tie-breaking offsets, the index orders and the output places. ``TokenMatch``
    holds them as buffers, so an exported file has them as constants (computed in the graph, int8
    conversion quantised the aranges and broke them)."""
    protect, tie_b, tie_a = _offsets(t_a, t_b, dtype, device or torch.device("cpu"))
    places_b = torch.arange(t_b, device=device, dtype=dtype)
    places = torch.arange(t_a, device=device, dtype=dtype)
    return {"protect": protect, "tie_b": tie_b, "tie_a": tie_a,
            "countdown_b": t_b - places_b,  # t_b, ..., 1: the lowest index scores highest
            "before": _positive(places[:, None] - places[None, :]),  # (i, j): j < i
            "slots": torch.arange(t_a, device=device, dtype=dtype)[:, None]}  # 0, 1, ...: places in an output


def match_matrices(scores: torch.Tensor, r: int, class_token: bool = True,
                   constants: dict[str, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The matmul form's matching from A × B scores, as three 0/1 matrices: ``keep`` (B, t_a − r, t_a)
    picks the kept A tokens in their original order, ``pick`` (B, r, t_a) the merged ones, and
    ``into`` (B, t_b, r) adds each of those to its B token. Every step is float arithmetic on 0/1
    tensors (the module's docstring says why); ties are broken towards the lower index, as argmax
    and the reference's stable order do. ``pick`` and ``into`` in place of one (t_b, t_a) matrix
    cut the merge's multiply-adds from t_b · t_a to (t_a + t_b) · r per channel (the 12-block
    vit197 student at r = 8, int8 with fixed matching, one interleaved LiteRT run: 7.80 vs 8.24 ms)."""
    t_a, t_b = scores.shape[1], scores.shape[2]
    c = constants or matmul_constants(t_a, t_b, r, scores.dtype, scores.device)
    if class_token:
        scores = scores + c["protect"]
    scores = scores - c["tie_b"]
    row_max = scores.amax(dim=-1)  # each A token's best score
    is_max = 1.0 - _positive(row_max[..., None] - scores)  # 1.0 at each row maximum
    first = is_max * c["countdown_b"]  # the first maximum (argmax's choice) has the largest value
    best = 1.0 - _positive(first.amax(dim=-1, keepdim=True) - first)
    node_max = row_max - c["tie_a"]
    beats = _positive(node_max[:, None, :] - node_max[:, :, None])  # (i, j): token j scores above i
    ties = (1.0 - beats - beats.transpose(1, 2)) * c["before"]
    rank = (beats + ties).sum(dim=-1)  # place of each A token in the descending order
    merged = _at_most_one(torch.relu(r - rank))  # 1.0 for the r best edges
    kept = 1.0 - merged
    # place of each token among the kept (among the merged), from the count of those before it
    slot = torch.einsum("nj,ij->ni", kept, c["before"])
    keep = torch.relu(1.0 - (slot[:, None, :] - c["slots"][: t_a - r]).abs()) * kept[:, None, :]
    slot = torch.einsum("nj,ij->ni", merged, c["before"])
    pick = torch.relu(1.0 - (slot[:, None, :] - c["slots"][:r]).abs()) * merged[:, None, :]
    return keep, pick, torch.einsum("nij,nki->njk", best, pick)


def merge_by_matrices(keep: torch.Tensor, pick: torch.Tensor, into: torch.Tensor) -> Merge:
    """The merge of the matmul form: batched matmuls with the 0/1 matrices of ``match_matrices``."""
    def merge(x: torch.Tensor) -> torch.Tensor:
        a, b = split_tokens(x)
        merged = torch.einsum("nki,nic->nkc", pick, a)
        return torch.cat([torch.einsum("nki,nic->nkc", keep, a), b + torch.einsum("njk,nkc->njc", into, merged)], dim=1)

    return merge


def merge_wavg(merge: Merge, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of merged tokens; returns the new tokens and their sizes (token mass)."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    merged = merge(torch.cat([x * size, size], dim=-1))  # one merge for both: same matrices
    x, size = merged[..., :-1], merged[..., -1:]
    return x / size, size


class TokenMatch(torch.nn.Module):
    """One block's matching in the matmul form (``match_matrices``), as a module of its own: its
    constants are buffers (not saved: the state dict keeps timm's keys), and int8 export leaves
    the ops inside it in float (``edgekd.export.calibrate_int8``), as step functions and ranks are
    exact only there. The merge that applies its 0/1 matrices stays outside, quantised like any
    matmul (0 and 1 are exact in int8)."""

    def __init__(self, tokens: int, r: int) -> None:
        super().__init__()
        self.r = r
        for name, value in matmul_constants((tokens + 1) // 2, tokens // 2, r).items():
            self.register_buffer(name, value, persistent=False)

    def forward(self, metric: torch.Tensor, class_token: bool, matcher: str,
                planes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        constants = {name: buffer for name, buffer in self.named_buffers()}
        with contextlib.nullcontext() if exporting() else torch.no_grad():
            return match_matrices(match_scores(metric, matcher, planes, "matmul"), self.r, class_token, constants)


class TokenMerge(torch.nn.Module):
    """One block's size-weighted merge in the matmul form, as a module of its own so that int8
    export leaves it in float (``edgekd.export.calibrate_int8``). Quantised, ``x · size`` shares one
    int8 scale across token masses of 1 to ~70 (the vit197 student at r = 8, last block): a token
    of mass 1 kept a few levels and int8 top-1 fell 8 pt (r = 8) and 17 pt (r = 16) below fp32;
    in float it is within 1 pt, as r = 0 is."""

    def forward(self, keep: torch.Tensor, pick: torch.Tensor, into: torch.Tensor, x: torch.Tensor,
                size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return merge_wavg(merge_by_matrices(keep, pick, into), x, size)


def tokens_after(tokens: int, schedule: list[int], class_token: bool = True) -> list[int]:
    """Token count entering each block and after the last, for a per-block r schedule."""
    counts = [tokens]
    for r in schedule:
        t = counts[-1]
        counts.append(t - min(r, (t - int(class_token)) // 2))
    return counts
