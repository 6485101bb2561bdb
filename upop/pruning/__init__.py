"""Structured pruning: unit kinds, masks, the search, slimming, parameter and FLOP counts."""
