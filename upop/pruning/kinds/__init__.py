"""Unit kinds: one object per structural shape of compressible module (see ``base.py``).

Importing this package registers every kind shipped with upop; a kind defined elsewhere registers
itself when its module is imported (subclassing ``UnitKind`` with a ``kind`` name is enough).
"""

from .base import ATTENTION, GROUPS, KINDS, MLP, SizePatcher, UnitKind, from_dict, kind_named, mask_last_axis
from .attention import AttentionSpec, InProj
from .mlp import MLPSpec
from .gqa import GQASpec, patch_rotary_attention
from .gated_mlp import GatedMLPSpec

__all__ = ["ATTENTION", "AttentionSpec", "GQASpec", "GROUPS", "GatedMLPSpec", "InProj", "KINDS", "MLP", "MLPSpec",
           "SizePatcher", "UnitKind", "from_dict", "kind_named", "mask_last_axis", "patch_rotary_attention"]
