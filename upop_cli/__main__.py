"""``python -m upop_cli``: the same as the ``upop`` script (torchrun launches workers this way)."""

from .app import main

main()
