"""DVC stage ``ablate_text_binding``: does the frozen text encoder bind attributes to objects?

The embedded model reads its prompt through frozen MiniLM (all-MiniLM-L6-v2): the pooled sentence
embedding is added to the timestep embedding and the token embeddings feed cross-attention. If
the encoder's output does not say which colour goes with which shape at which place, no UNet can
compose; if it does, the failure lies in the UNet or its training. This ablation asks the encoder
directly, with no images: small probes trained on frozen encoder outputs predict the scene's
layout (per 3x3 cell: empty or the shape, and its colour, size and texture; the background's
colour, material and strength), and are scored on held-out prompts by the share of scenes whose
every attribute is right, per object count (the same "all attributes right" the base model is
judged by).

Probes (the same training budget each):
- ``pooled_mlp``: the pooled sentence embedding through an MLP (what the class embedding sees).
- ``tokens_xattn``: one learned query per cell cross-attending the token embeddings, two layers
  (what a UNet position reading cross-attention can get).
- ``tokens_adapter_xattn``: as above, after two trainable self-attention layers over the tokens
  (a text adapter, the cheap fix if the frozen tokens need re-binding).
- ``random_encoder_xattn``: ``tokens_xattn`` on a randomly initialised encoder of MiniLM's shape
  (the control: what the probe learns from word identities and order alone).

Params: ``ablate_text_binding`` in params.yaml. Output: ``report_path`` (JSON).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from budgetdiff.io import atomic_write_json
from budgetdiff.domain.scenes import (BACKGROUNDS, COLORS, MATERIALS, POSITIONS, SHAPES, SIZES, STRENGTHS, TEXTURES,
                               sample_scene, spec_to_prompt)
from budgetdiff.text import encode_prompts, load_minilm
from mlops.cli import command
from mlops.params import load_config

Probe = Literal["pooled_mlp", "tokens_xattn", "tokens_adapter_xattn", "random_encoder_xattn"]


@dataclass(frozen=True)
class AblateTextBindingConfig:
    """The ``ablate_text_binding`` section of params.yaml."""

    train_prompts: int
    eval_prompts_per_count: int
    train_seed_offset: int
    eval_seed_offset: int
    count_weights: tuple[float, ...]
    material_prob: float
    speckle_prob: float
    steps: int
    batch_size: int
    lr: float
    width: int
    seed: int
    probes: list[Probe]  # the module docstring describes each
    report_path: str

# Per-cell heads: shape (0 = empty), colour, size, texture; global heads: background, material, strength.
CELL_HEADS = (("shape", ("empty",) + SHAPES), ("color", tuple(COLORS)), ("size", SIZES), ("texture", TEXTURES))
GLOBAL_HEADS = (("background", tuple(BACKGROUNDS)), ("material", MATERIALS), ("strength", tuple(STRENGTHS)))


def layout_targets(specs) -> dict[str, torch.Tensor]:
    """Integer targets per head: cells (B, 9) for the cell heads (-100 where the cell is empty,
    except for shape), (B,) for the global heads."""
    n = len(specs)
    t = {name: torch.full((n, 9), -100, dtype=torch.long) for name, _ in CELL_HEADS}
    t["shape"].fill_(0)
    for i, s in enumerate(specs):
        for o in s.objects:
            c = POSITIONS.index(o.position)
            t["shape"][i, c] = 1 + SHAPES.index(o.shape)
            t["color"][i, c] = list(COLORS).index(o.color)
            t["size"][i, c] = SIZES.index(o.size)
            t["texture"][i, c] = TEXTURES.index(o.texture)
    t["background"] = torch.tensor([list(BACKGROUNDS).index(s.background) for s in specs])
    t["material"] = torch.tensor([MATERIALS.index(s.material) for s in specs])
    t["strength"] = torch.tensor([list(STRENGTHS).index(s.strength) for s in specs])
    return t


class Heads(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.cell = nn.ModuleDict({k: nn.Linear(width, len(v)) for k, v in CELL_HEADS})
        self.glob = nn.ModuleDict({k: nn.Linear(width, len(v)) for k, v in GLOBAL_HEADS})

    def forward(self, cells: torch.Tensor, glob: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {k: h(cells) for k, h in self.cell.items()}
        out.update({k: h(glob) for k, h in self.glob.items()})
        return out


class PooledProbe(nn.Module):
    """The pooled embedding through an MLP to every cell and global head."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * width), nn.GELU(), nn.Linear(4 * width, 10 * width))
        self.width, self.heads = width, Heads(width)

    def forward(self, hidden, mask, pooled):
        z = self.mlp(pooled).view(-1, 10, self.width)
        return self.heads(z[:, :9], z[:, 9])


class TokenProbe(nn.Module):
    """Ten learned queries (nine cells + one global) cross-attending the tokens, two layers;
    optionally after ``adapter_layers`` self-attention layers over the tokens."""

    def __init__(self, dim: int, width: int, adapter_layers: int = 0):
        super().__init__()
        # projected and layer-normed: the decoder layers normalise their queries, not the memory
        self.proj = nn.Sequential(nn.Linear(dim, width), nn.LayerNorm(width))
        self.adapter = (nn.TransformerEncoder(nn.TransformerEncoderLayer(width, 4, 4 * width, 0.0, batch_first=True,
                                                                         norm_first=True), adapter_layers,
                                              enable_nested_tensor=False)
                        if adapter_layers else None)
        self.queries = nn.Parameter(torch.randn(10, width) * 0.02)
        self.layers = nn.ModuleList(nn.TransformerDecoderLayer(width, 4, 4 * width, 0.0, batch_first=True,
                                                               norm_first=True) for _ in range(2))
        self.heads = Heads(width)

    def forward(self, hidden, mask, pooled):
        keys = self.proj(hidden)
        pad = ~mask.bool()
        if self.adapter is not None:
            keys = self.adapter(keys, src_key_padding_mask=pad)
        q = self.queries.expand(len(hidden), -1, -1)
        for layer in self.layers:
            q = layer(q, keys, memory_key_padding_mask=pad)
        return self.heads(q[:, :9], q[:, 9])


def loss_fn(out, targets) -> torch.Tensor:
    loss = 0.0
    for k, logits in out.items():
        t = targets[k]
        loss = loss + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), ignore_index=-100)
    return loss


@torch.no_grad()
def all_right(out, targets) -> torch.Tensor:
    """Per scene: every cell head right where it applies and every global head right."""
    ok = torch.ones(len(targets["shape"]), dtype=torch.bool)
    for k, logits in out.items():
        pred, t = logits.argmax(-1), targets[k]
        good = (pred == t) | (t == -100)
        ok &= good.all(-1) if good.dim() == 2 else good
    return ok


def encode(prompts, encoder, tokenizer, batch: int = 256):
    hidden, masks, pooled = [], [], []
    for i in range(0, len(prompts), batch):
        e = encode_prompts(prompts[i:i + batch], encoder, tokenizer)
        hidden.append(e.hidden.half()), masks.append(e.mask), pooled.append(e.pooled)
    length = max(h.shape[1] for h in hidden)
    hidden = torch.cat([F.pad(h, (0, 0, 0, length - h.shape[1])) for h in hidden])
    masks = torch.cat([F.pad(m, (0, length - m.shape[1])) for m in masks])
    return hidden, masks, torch.cat(pooled)


def scenes(n: int, offset: int, cfg: AblateTextBindingConfig, n_objects: int | None = None):
    specs = [sample_scene(offset + i, n_objects=n_objects, count_weights=cfg.count_weights,
                          material_prob=cfg.material_prob, speckle_prob=cfg.speckle_prob) for i in range(n)]
    return specs, [spec_to_prompt(s) for s in specs]


def train_probe(probe: nn.Module, train, evals, cfg: AblateTextBindingConfig) -> dict:
    hidden, mask, pooled, targets = train
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=0.01)
    total, warm = cfg.steps, max(1, cfg.steps // 20)  # 5 % linear warm-up, then cosine to 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, k / total))))
    g = torch.Generator().manual_seed(cfg.seed)
    for _ in tqdm(range(cfg.steps), desc="probe", unit="step", leave=False):
        idx = torch.randint(0, len(hidden), (cfg.batch_size,), generator=g)
        out = probe(hidden[idx].float(), mask[idx], pooled[idx])
        loss = loss_fn(out, {k: v[idx] for k, v in targets.items()})
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    probe.eval()
    result = {}
    with torch.no_grad():
        for count, (h, m, p, t) in evals.items():
            result[str(count)] = round(float(all_right(probe(h.float(), m, p), t).float().mean()), 4)
    return {"all_attributes_right": result, "final_train_loss": round(loss.item(), 4)}


def run(cfg: AblateTextBindingConfig) -> dict:
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    specs, prompts = scenes(cfg.train_prompts, cfg.train_seed_offset, cfg)
    eval_sets = {k: scenes(cfg.eval_prompts_per_count, cfg.eval_seed_offset + 100_000 * k, cfg, n_objects=k)
                 for k in (1, 2, 3, 4)}
    encoders = {"minilm": load_minilm()}
    if any(p.startswith("random_encoder") for p in cfg.probes):
        from transformers import BertModel

        minilm, tokenizer = encoders["minilm"]
        torch.manual_seed(cfg.seed)
        encoders["random"] = (BertModel(minilm.config).eval().requires_grad_(False), tokenizer)
    features = {}
    for name, (encoder, tokenizer) in encoders.items():
        train = (*encode(prompts, encoder, tokenizer), layout_targets(specs))
        evals = {k: (*encode(p, encoder, tokenizer), layout_targets(s)) for k, (s, p) in eval_sets.items()}
        features[name] = (train, evals)
    dim = features["minilm"][0][0].shape[-1]
    builders = {
        "pooled_mlp": ("minilm", lambda: PooledProbe(dim, cfg.width)),
        "tokens_xattn": ("minilm", lambda: TokenProbe(dim, cfg.width)),
        "tokens_adapter_xattn": ("minilm", lambda: TokenProbe(dim, cfg.width, adapter_layers=2)),
        "random_encoder_xattn": ("random", lambda: TokenProbe(dim, cfg.width)),
    }
    results = {}
    for name in cfg.probes:
        source, build = builders[name]
        torch.manual_seed(cfg.seed)
        start = time.time()
        results[name] = train_probe(build(), *features[source], cfg)
        results[name]["seconds"] = round(time.time() - start, 1)
        print(f"ablate_text_binding: {name}: all attributes right by object count "
              f"{results[name]['all_attributes_right']}", flush=True)
    report = {"what": "held-out share of prompts whose whole layout a probe on the frozen text encoder decodes",
              "train_prompts": cfg.train_prompts, "eval_prompts_per_count": cfg.eval_prompts_per_count,
              "steps": cfg.steps, "probes": results, "seconds": round(time.time() - t0, 1)}
    atomic_write_json(cfg.report_path, report)
    return report


@command
def main() -> None:
    run(load_config("ablate_text_binding", AblateTextBindingConfig))


if __name__ == "__main__":
    main()
