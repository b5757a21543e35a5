"""A small ViT student: timm's VisionTransformer (ToMe's own target) at 28–32 px with 4 px patches,
so 49–64 patch tokens plus the class token; optionally ToMe-patched for training (``tome_r``)."""

from __future__ import annotations

import torch.nn as nn

from edgekd.errors import EdgekdError


def vit(num_classes: int, in_channels: int, image_size: int, embed_dim: int = 64, depth: int = 4, num_heads: int = 2,
        patch_size: int = 4, mlp_ratio: float = 2.0, tome_r: int = 0, tome_matcher: str = "exact",
        tome_bits: int = 16, **_: object) -> nn.Module:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        raise EdgekdError("the vit student needs timm: pip install 'edgekd[vit]'") from None
    if image_size % patch_size:
        raise EdgekdError(f"vit: image_size {image_size} is not a multiple of patch_size {patch_size}; "
                          "change data.image_size or student.patch_size")
    if embed_dim % num_heads:
        raise EdgekdError(f"vit: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    model = VisionTransformer(img_size=image_size, patch_size=patch_size, in_chans=in_channels,
                              num_classes=num_classes, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                              mlp_ratio=mlp_ratio, qkv_bias=True, class_token=True, global_pool="token")
    if tome_r:  # merging while training too (ToMe §4: a model trained with merging loses less to it)
        from edgekd.tome import apply_tome

        apply_tome(model, tome_r, tome_matcher, tome_bits)
    return model
