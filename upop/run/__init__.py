"""A compress run and its files: the pipeline, settings, recipes, checkpoints, state, report, safety."""
