"""The compressible modules of a model, described without reference to any model class.

The unit kinds live in ``upop.pruning.kinds`` (one file per structural shape); this module keeps the names
the rest of upop imported before they moved.
"""

from __future__ import annotations

from .kinds import AttentionSpec, GatedMLPSpec, GQASpec, InProj, MLPSpec, UnitKind

ModuleSpec = UnitKind

__all__ = ["AttentionSpec", "GQASpec", "GatedMLPSpec", "InProj", "MLPSpec", "ModuleSpec", "UnitKind"]
