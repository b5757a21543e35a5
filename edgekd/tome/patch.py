"""ToMe as a patch of timm's VisionTransformer, like facebookresearch/ToMe's ``tome.patch.timm``:
the model, its blocks and their attention get subclasses that merge ``r`` tokens per block
between attention and MLP, track each token's size, and add ``log(size)`` to the attention
logits (proportional attention). Weights and state-dict keys stay timm's own.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekd.errors import EdgekdError
from edgekd.tome.merge import (BUCKET_SIZE, MATCHERS, TokenMatch, TokenMerge, bipartite_soft_matching, default_form,
                               exporting, merge_wavg, tokens_after)


def _vit_classes() -> tuple[type, type, type]:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    return VisionTransformer, Block, Attention


def _tome_classes() -> tuple[type, type, type]:
    VisionTransformer, Block, Attention = _vit_classes()

    class ToMeAttention(Attention):
        """timm's attention, computed explicitly so that it can add log(size) and hand out the keys."""

        def forward(self, x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            B, N, _ = x.shape
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
            # the matching metric: the keys averaged over heads, taken before the permute below (a
            # mean over the permuted heads' axis took 0.36 ms of a ~9 ms merging block in eager at batch 8)
            export, metric = exporting(), None
            if isinstance(self.k_norm, nn.Identity):
                # eager: the heads' sum as adds, faster than that strided mean and more so as the batch
                # grows; the matchers compare directions only, so the scale does not matter
                metric = qkv[:, :, 1].mean(2) if export else functools.reduce(torch.add, qkv[:, :, 1].unbind(2))
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            # proportional attention: a token of size s counts s times, i.e. log(s) added to its logits
            bias = None if size is None else size.log()[:, None, None, :, 0]
            if self.fused_attn and not export:
                # one fused kernel, as timm's own block runs; the bias is its additive float mask
                x = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                                                   dropout_p=self.attn_drop.p if self.training else 0.0)
            else:  # written out for export: the converters take MatMul/Add/Softmax everywhere
                attn = (q * self.scale) @ k.transpose(-2, -1)
                if bias is not None:
                    attn = attn + bias
                x = self.attn_drop(attn.softmax(dim=-1)) @ v
            x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
            x = self.proj_drop(self.proj(self.norm(x)))
            return x, k.mean(1) if metric is None else metric

    class ToMeBlock(Block):
        def forward(self, x: torch.Tensor, size: torch.Tensor | None = None,
                    **_: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
            """One block with merging between attention and MLP; returns the tokens and their sizes."""
            info = self._tome_info
            r = info["r"][self._tome_index]
            if r == 0 and size is None:  # nothing merged so far or here: timm's own computation, bit for bit
                x = x + self.drop_path1(self.ls1(Attention.forward(self.attn, self.norm1(x))))
                return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))), None
            x_attn, metric = self.attn(self.norm1(x), size if info["prop_attn"] else None)
            x = x + self.drop_path1(self.ls1(x_attn))
            if r > 0:
                if default_form() == "matmul" and self.token_match is not None:
                    # exported for TFLite: the matching and the merge in modules of their own, which
                    # int8 export keeps in float
                    matrices = self.token_match(metric, info["class_token"], info["matcher"], info["planes"])
                    x, size = self.token_merge(*matrices, x, size)
                else:
                    merge = bipartite_soft_matching(metric, r, info["class_token"], info["matcher"], info["planes"],
                                                    bucket_size=info["bucket_size"])
                    x, size = merge_wavg(merge, x, size)
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))), size

    class ToMeVisionTransformer(VisionTransformer):
        def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Tokens after the last block and their sizes (how many patches each one holds). The
            sizes pass from block to block as values, not as model state, so tracing and export
            see a pure function."""
            x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
            size = None
            for block in self.blocks:
                x, size = block(x, size)
            return x, torch.ones_like(x[..., :1]) if size is None else size

        def forward_features(self, x: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
            return self.norm(self.forward_tokens(x)[0])

    return ToMeVisionTransformer, ToMeBlock, ToMeAttention


def max_uniform_r(tokens: int, depth: int, class_token: bool = True) -> int:
    """The largest r that every block can merge in full (r tokens each, none clamped)."""
    r = 0
    while True:
        counts = tokens_after(tokens, [r + 1] * depth, class_token)
        if any(a - b != r + 1 for a, b in zip(counts, counts[1:])):
            return r
        r += 1


def check_r(r: int | list[int], tokens: int, depth: int, class_token: bool = True) -> list[int]:
    """The effective per-block schedule for ``r`` (an int: the same r in every block). As in
    facebookresearch/ToMe, a block merges at most half of its (unprotected) tokens, so a later
    block's r is clamped to what it can merge; an r that even the first block cannot merge is
    refused with one line."""
    schedule = [int(r)] * depth if isinstance(r, int) else [int(v) for v in r]
    if len(schedule) != depth:
        raise EdgekdError(f"ToMe r schedule has {len(schedule)} values but the ViT has {depth} blocks; "
                          f"give one r or {depth} values")
    if any(v < 0 for v in schedule):
        raise EdgekdError(f"ToMe r must be 0 or more, got {schedule}")
    first = (tokens - int(class_token)) // 2
    if max(schedule, default=0) > first:
        raise EdgekdError(f"ToMe r={max(schedule)} is too large: the first block sees {tokens} tokens, so at most "
                          f"{first} can merge there; use r <= {first} (r <= "
                          f"{max_uniform_r(tokens, depth, class_token)} merges that many in every block)")
    counts = tokens_after(tokens, schedule, class_token)
    return [a - b for a, b in zip(counts, counts[1:])]


def lsh_planes(dim: int, bits: int, seed: int = 0) -> torch.Tensor:
    """The d × b random hyperplanes of the LSH matcher, fixed by a seed (saved with the model)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, bits, generator=g)


def apply_tome(model: nn.Module, r: int | list[int] = 0, matcher: str = "exact", bits: int = 16,
               prop_attn: bool = True, seed: int = 0, bucket_size: int = BUCKET_SIZE) -> nn.Module:
    """Patch a timm VisionTransformer in place for ToMe and return it; call again to change r or
    the matcher. ``r``: tokens merged per block (an int or one value per block); ``matcher``:
    exact (cosine of the keys), lsh (``bits``-bit random-hyperplane codes) or bucketed (cosine
    within the chunks of ``bucket_size`` tokens of a hash-sorted order; ``bits`` hyperplanes give
    2 × ``bits`` buckets)."""
    VisionTransformer, Block, Attention = _vit_classes()
    if not isinstance(model, VisionTransformer):
        raise EdgekdError(f"ToMe patches a timm VisionTransformer, not a {type(model).__name__}")
    if matcher not in MATCHERS:
        raise EdgekdError(f"unknown ToMe matcher '{matcher}'; choose from {', '.join(MATCHERS)}")
    if matcher != "exact" and bits < 1:
        raise EdgekdError(f"the {matcher} matcher needs at least 1 bit")
    if bucket_size < 2:
        raise EdgekdError(f"the bucketed matcher's bucket size must be at least 2, got {bucket_size}")
    ToMeVisionTransformer, ToMeBlock, ToMeAttention = _tome_classes()
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    schedule = check_r(r, tokens, len(model.blocks), class_token=model.cls_token is not None)
    head_dim = model.blocks[0].attn.head_dim
    counts = tokens_after(tokens, schedule, class_token=model.cls_token is not None)
    model.__class__ = ToMeVisionTransformer
    model._tome_info = {"r": schedule, "matcher": matcher, "bits": bits, "prop_attn": prop_attn,
                        "class_token": model.cls_token is not None,
                        "bucket_size": bucket_size,
                        "planes": lsh_planes(head_dim, bits, seed) if matcher != "exact" else None}
    for i, block in enumerate(model.blocks):
        block.__class__ = ToMeBlock
        block._tome_index, block._tome_info = i, model._tome_info
        # the matmul form's matching for TFLite (bucketed sorts, so it keeps the gather form)
        block.token_match = TokenMatch(counts[i], schedule[i]) if schedule[i] and matcher != "bucketed" else None
        block.token_merge = TokenMerge() if block.token_match is not None else None
        block.attn.__class__ = ToMeAttention
    return model


def tome_settings(model: nn.Module) -> dict[str, Any] | None:
    """The ToMe settings of a patched model (r schedule, matcher, bits), or None."""
    info = getattr(model, "_tome_info", None)
    if info is None:
        return None
    return {"r": list(info["r"]), "matcher": info["matcher"], "bits": info["bits"] if info["matcher"] != "exact" else None,
            "prop_attn": info["prop_attn"],
            **({"bucket_size": info["bucket_size"]} if info["matcher"] == "bucketed" else {})}
