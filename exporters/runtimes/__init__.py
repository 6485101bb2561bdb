"""One file per runtime: each registers its ``Backend`` (``upop.exporters.registry``) when imported.
``upop.exporters`` imports every module here; a new runtime is a new file, listed nowhere else."""
