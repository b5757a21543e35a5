"""Zoo modules rewritten, with the same math, into a form the TFLite converters take.

timm's MobileViTv2 attention (``LinearSelfAttention``) broadcasts its first product implicitly
and its second through ``expand_as``; litert-torch lowers that mix to a ``tfl.mul`` MLIR rejects
("operands don't have broadcast-compatible shapes"), so every MobileViTv2 failed at fp32 TFLite.
Expanding both converts at fp32 but leaves int8 a ``BROADCAST_TO`` LiteRT cannot prepare; both
implicit converts at fp32 and int8 (28 and 32 px tried) and computes the same numbers. Like
ToMe's patch, the instance's class is swapped for a subclass: the state dict, the hooks and the
checkpoint format stay timm's.
"""

from __future__ import annotations

from functools import cache

import torch.nn as nn


@cache
def _implicit_broadcast_linear_self_attention() -> type[nn.Module]:
    import torch.nn.functional as F
    from timm.models.mobilevit import LinearSelfAttention

    class ImplicitBroadcastLinearSelfAttention(LinearSelfAttention):
        """timm's ``_forward_self_attn`` with both products broadcast implicitly."""

        def _forward_self_attn(self, x):
            query, key, value = self.qkv_proj(x).split([1, self.embed_dim, self.embed_dim], dim=1)
            context_scores = self.attn_drop(F.softmax(query, dim=-1))
            context_vector = (key * context_scores).sum(dim=-1, keepdim=True)
            return self.out_drop(self.out_proj(F.relu(value) * context_vector))

    return ImplicitBroadcastLinearSelfAttention


def make_convertible(model: nn.Module) -> int:
    """Rewrites ``model``'s modules in place; returns how many were rewritten (0: nothing to do)."""
    import sys

    if "timm.models.mobilevit" not in sys.modules:  # a model without it cannot hold one
        return 0
    from timm.models.mobilevit import LinearSelfAttention

    rewritten = 0
    for m in model.modules():
        if type(m) is LinearSelfAttention:
            m.__class__ = _implicit_broadcast_linear_self_attention()
            rewritten += 1
    return rewritten
