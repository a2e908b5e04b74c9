"""Shared fixtures: tiny randomly initialised components, no trained weights, no downloads."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_TEXT_DIM = 32


def tiny_unet_config():
    """A ``train_base``-style UNet config of a few tens of thousands of parameters (16x16 images:
    ``build_unet(tiny_unet_config(), TINY_RESOLUTION)``)."""
    from training.base import UNetConfig

    return UNetConfig(block_out_channels=[8, 16], cross_attention_levels=[False, True], layers_per_block=1,
                      attention_head_dim=4, norm_num_groups=4, text_dim=TINY_TEXT_DIM)


TINY_RESOLUTION = 16


def tiny_text_encoder():
    """A one-layer random BERT with MiniLM's tokenizer (the vocabulary ships with the package)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from budgetdiff.text import minilm_path

    tokenizer = BertTokenizerFast.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=TINY_TEXT_DIM, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=37, max_position_embeddings=128)
    return BertModel(config).eval(), tokenizer


@pytest.fixture(scope="session")
def tiny_components():
    """Tiny random UNet, text encoder and tokenizer (16x16 images), built once per session."""
    from training.base import build_unet

    torch.manual_seed(0)
    unet = build_unet(tiny_unet_config(), TINY_RESOLUTION).eval()
    encoder, tokenizer = tiny_text_encoder()
    return unet, encoder, tokenizer


def make_tiny_pipe(components):
    from diffusers import DDIMScheduler

    from budgetdiff.generation.pipeline import BudgetDiffusionPipeline

    unet, encoder, tokenizer = components
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    pipe = BudgetDiffusionPipeline(unet, encoder, tokenizer, scheduler, default_guidance_scale=2.0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def tiny_pipe(tiny_components):
    """A BudgetDiffusionPipeline on the tiny components with a fresh DDIM scheduler for every
    test, so no test sees a scheduler (or its state) left behind by another."""
    return make_tiny_pipe(tiny_components)


@pytest.fixture()
def unet_batch_sizes(tiny_pipe, monkeypatch) -> list[int]:
    """The batch size of every network evaluation tiny_pipe makes during the test, in order
    (spied on beneath the adaptive-skip hook, which the pipeline installs once per UNet)."""
    from budgetdiff.methods.adaptive import install_adaptive_skip

    sizes: list[int] = []
    hook = install_adaptive_skip(tiny_pipe.unet)
    original = hook.fn_ref.original_forward

    def spy(sample, *args, **kwargs):
        sizes.append(sample.shape[0])
        return original(sample, *args, **kwargs)

    monkeypatch.setattr(hook.fn_ref, "original_forward", spy)
    return sizes


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_components, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_model") / "base"
    make_tiny_pipe(tiny_components).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------
# Tiny stock Stable Diffusion 1.5 / SDXL components (after diffusers' own pipeline tests).
# ------------------------------------------------------------------------------------------
def _tiny_clip_tokenizer():
    """A CLIPTokenizer over single characters: every byte-level character and its word-final
    form, no merges. Enough to tokenise any prompt without a downloaded vocabulary."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _tiny_clip_config(projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=32,
                          intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=514,
                          hidden_act="gelu", projection_dim=projection_dim, max_position_embeddings=77)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=4, norm_num_groups=2, sample_size=32)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = tmp_path_factory.mktemp("tiny_sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=2, attention_head_dim=2)
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=CLIPTextModel(_tiny_clip_config()).eval(),
        tokenizer=_tiny_clip_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "sd")
    return root / "sd"


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = tmp_path_factory.mktemp("tiny_sdxl")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
                                projection_class_embeddings_input_dim=80, cross_attention_dim=64,
                                norm_num_groups=1)
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=CLIPTextModel(_tiny_clip_config()).eval(),
        text_encoder_2=CLIPTextModelWithProjection(_tiny_clip_config()).eval(),
        tokenizer=_tiny_clip_tokenizer(), tokenizer_2=_tiny_clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         timestep_spacing="leading", steps_offset=1),
    )
    pipe.save_pretrained(root / "sdxl")
    return root / "sdxl"


# ------------------------------------------------------------------------------------------
# A tiny model bundle (budgetdiff.generation.bundle): base, student, budget predictor, skip policy.
# ------------------------------------------------------------------------------------------
TINY_BUDGET_METRICS = ["pixel/lsnr", "pixel/psnr", "pixel/ssim", "mid/lpips_alex_randinit",
                       "high/clipt_domainclip", "high/iclip_domainclip", "domain/attr_acc"]
TINY_BUDGET_GRID = [2, 3, 4, 6, 8, 12, 20]


def tiny_skip_policy(thresholds=(0.05, 0.5), default: float = 0.5, schedulers=("ddim", "dpmpp", "euler")):
    """A skip policy with made-up measurements: a lower δ keeps more quality and saves less."""
    from budgetdiff.methods.adaptive import AdaptiveSkipConfig
    from budgetdiff.methods.policy import OperatingPoint, SchedulerPolicy, SkipPolicy

    points = tuple(OperatingPoint(f"delta={d:g}", AdaptiveSkipConfig(threshold=d, max_skip=2, warmup=4,
                                                                        reuse="epsilon"),
                                  {"quality": round(1.0 - d / 10, 4), "nfe_speedup": 1.0 + d})
                   for d in thresholds)
    return SkipPolicy({s: SchedulerPolicy(f"delta={default:g}", points) for s in schedulers},
                      {"stage": "tests"}, 20)


def make_tiny_predictor(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """A random tiny BiLSTM budget predictor trained "for" ``model_dir``'s UNet, saved at ``out``."""
    import numpy as np

    from budgetdiff.methods.budget import TargetNormalizer, build_network, make_config, model_record, save_budget_model

    values = np.random.default_rng(0).normal(size=(8, len(TINY_BUDGET_METRICS), len(TINY_BUDGET_GRID) + 1))
    config = make_config("bilstm", {"hidden": 8}, text_dim=TINY_TEXT_DIM, max_text_length=64,
                         step_grid=TINY_BUDGET_GRID, reference_steps=30, metrics=TINY_BUDGET_METRICS,
                         rule_metrics={"pixel": "pixel/ssim", "mid": "mid/lpips", "high": "high/iclip"},
                         normalizer=TargetNormalizer.fit(TINY_BUDGET_METRICS, values),
                         model=model_record(model_dir))
    torch.manual_seed(seed)
    save_budget_model(build_network(config), config, out)
    return out


def make_tiny_bundle(root: Path, components, student_max_steps: int = 8, policy=None) -> Path:
    """Write a bundle of the tiny components under ``root``: base/, student/ (another random
    UNet of the same shape), budget/ (a random BiLSTM for base's UNet), bundle/."""
    import numpy as np

    from budgetdiff.generation.bundle import write_bundle
    from training.base import build_unet

    root.mkdir(parents=True, exist_ok=True)
    make_tiny_pipe(components).save_pretrained(root / "base")
    torch.manual_seed(1)
    student_unet = build_unet(tiny_unet_config(), TINY_RESOLUTION).eval()
    make_tiny_pipe((student_unet, components[1], components[2])).save_pretrained(root / "student")
    make_tiny_predictor(root / "base", root / "budget")
    raw = {"base": {"path": "../base", "scheduler": "ddim", "steps": 20},
           "student": {"path": "../student", "steps": 4, "scheduler": "ddim", "guidance": 2.0},
           "budget": {"path": "../budget", "plateau_epsilon": 0.01},
           "auto": {"student_max_steps": student_max_steps, "student_guidance": 1.0, "scheduler": "ddim"}}
    write_bundle(root / "bundle", raw, policy or tiny_skip_policy())
    return root / "bundle"


@pytest.fixture(scope="session")
def tiny_bundle_dir(tiny_components, tmp_path_factory) -> Path:
    """models/bundle's layout on the tiny components (read-only: copy it to change it)."""
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny_bundle"), tiny_components)


@pytest.fixture(scope="session")
def tiny_generator(tiny_bundle_dir):
    """A Generator loaded from the tiny bundle, shared by a session's tests (it keeps no state)."""
    from budgetdiff.generation.engine import Generator

    return Generator.load(tiny_bundle_dir, device="cpu")


def cli_error(capsys, main, *args) -> str:
    """Run a command-line ``main`` that must fail: exit status 2 after one ``error: ...`` line on
    stderr (mlops.cli). Returns that line."""
    with pytest.raises(SystemExit) as exc:
        main(*args)
    assert exc.value.code == 2, f"exit status {exc.value.code!r}, expected 2"
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err
