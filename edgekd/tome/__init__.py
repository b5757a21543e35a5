"""Token Merging (ToMe, Bolya et al., ICLR 2023) for edgekd's ViT student, with an exact and a
hashing (random-hyperplane LSH) matcher, written with ops that export to ONNX and TFLite.

``apply_tome(vit, r, matcher="exact")`` patches a timm VisionTransformer in place, as the
reference (facebookresearch/ToMe) does; ``r=0`` leaves the model computing exactly what it did.
"""

from edgekd.tome.merge import MATCHERS, bipartite_soft_matching, merge_wavg, tokens_after
from edgekd.tome.patch import apply_tome, check_r, max_uniform_r, tome_settings

__all__ = ["MATCHERS", "apply_tome", "bipartite_soft_matching", "check_r", "max_uniform_r", "merge_wavg",
           "tokens_after", "tome_settings"]
