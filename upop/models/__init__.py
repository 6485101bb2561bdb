"""Models that ``transformers`` does not ship, written in its style (config + PreTrainedModel)."""

from .blip_nlvr import BlipNlvrConfig, BlipNlvrForVisualReasoning

__all__ = ["BlipNlvrConfig", "BlipNlvrForVisualReasoning"]
