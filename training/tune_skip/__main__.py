"""``python -m training.tune_skip``: the DVC stage ``tune_skip``."""

from .stage import main

main()
