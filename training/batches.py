"""What the training DataLoaders share: turning a list of samples into one batch."""

from __future__ import annotations

import torch


def stack_columns(batch: list[tuple]) -> tuple:
    """Collate samples that are tuples, column by column: tensors are stacked along a new first
    dimension, anything else (prompts, scene dicts) becomes a list. Unlike torch's
    ``default_collate``, strings come back as a list, which the text encoders take as is."""
    return tuple(torch.stack(column) if isinstance(column[0], torch.Tensor) else list(column)
                 for column in zip(*batch))
