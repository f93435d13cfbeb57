"""Tiny, offline Stable Diffusion 1.5 and SDXL pipelines with the real architectures' shapes.

Tests, benchmarks and the digits teacher need pipelines that load, save, train and sample through the real
diffusers code paths without a download. The recipe follows diffusers' own tests (see
``shared/design/diffusers-peft-hub.md``): a few-thousand-parameter UNet, VAE and CLIP text encoder, and a
CLIP tokenizer whose vocabulary is written here instead of fetched from the Hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from ...core.schedule import SD_TRAINING_SCHEDULE

# Every prompt word the tests, benchmarks and the digits teacher use; each becomes one token so that prompts
# stay short and the tiny text encoder sees whole words rather than letters.
PROMPT_WORDS = (
    "a an the of in on with and at by for to is photo picture painting drawing image sketch render "
    "cat dog horse bird fish car house tree flower city street forest mountain sea beach sky river "
    "man woman person child face portrait landscape astronaut riding red blue green yellow black white "
    "orange purple small large big beautiful high quality detailed sharp blurry dark bright night day "
    "digit number handwritten zero one two three four five six seven eight nine"
).split()

# Where the SD1.5 and SDXL latent spaces differ only in size; 16 latents * vae_scale_factor 2 = 32 px images.
TINY_LATENT_SIZE = 16
TINY_IMAGE_SIZE = 32


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    byte_values, code_points = printable[:], printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(byte_values, code_points)}


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE: repeatedly merge the adjacent pair with the lowest rank until none is in ``ranks``."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def _word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Merges that turn each word into one token.

    Each word is first split by the merges learnt so far, then its pieces are joined left to right by new,
    lower-priority merges, so adding a word never changes how earlier words are split.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words if w.isalpha() and w.isascii()):
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    return merges


def write_offline_clip_tokenizer(directory: str | Path, extra_words: Iterable[str] = ()):
    """Write a CLIP BPE vocabulary to ``directory`` and load it as a ``CLIPTokenizer`` (no Hub access).

    The vocabulary is the 256 byte characters, the same with the end-of-word marker ``</w>``, one entry per merge
    result, then ``<|startoftext|>`` and ``<|endoftext|>`` (last, so it has the highest id as in real CLIP).
    Words from ``PROMPT_WORDS`` and ``extra_words`` (those made of ASCII letters; others are skipped) are single
    tokens; any other text is split into the pieces those merges allow, down to single characters.
    """
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    merges = _word_merges([*PROMPT_WORDS, *extra_words])
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    # model_max_length must be set: padding="max_length" (what the pipelines use) needs it.
    return CLIPTokenizer.from_pretrained(directory, model_max_length=77)


def _tiny_tokenizer():
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        return write_offline_clip_tokenizer(directory)


def clip_text_config(tokenizer, **sizes):
    """A ``CLIPTextConfig`` of the given sizes whose special-token ids match ``tokenizer``.

    ``vocab_size`` and ``max_position_embeddings`` default to the tokenizer's; pass them to override.
    """
    from transformers import CLIPTextConfig

    defaults = dict(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length)
    return CLIPTextConfig(
        **{**defaults, **sizes},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_text_encoder(tokenizer, with_projection: bool = False, hidden_size: int = 32):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = clip_text_config(
        tokenizer, hidden_size=hidden_size, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        projection_dim=32, hidden_act="gelu",
    )  # fmt: skip
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval()


def _tiny_vae():
    from diffusers import AutoencoderKL

    # Two blocks -> one downsampling -> vae_scale_factor 2.
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=TINY_IMAGE_SIZE,
    ).eval()


def _tiny_scheduler(prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD_TRAINING_SCHEDULE, prediction_type=prediction_type, clip_sample=False, steps_offset=1)


def _tiny_unet(**family_kwargs):
    from diffusers import UNet2DConditionModel

    # conv_out keeps PyTorch's default (non-zero) init, so the UNet's output depends on its input from step 0.
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=TINY_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        **family_kwargs,
    ).eval()


def build_tiny_sd15_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """A ``StableDiffusionPipeline`` shaped like SD1.5 (one text encoder, cross-attention dim = its width)."""
    from diffusers import StableDiffusionPipeline

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(seed)
    unet = _tiny_unet(cross_attention_dim=32, attention_head_dim=(2, 4))
    vae = _tiny_vae()
    text_encoder = _tiny_text_encoder(tokenizer)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_tiny_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl_pipeline(prediction_type: str = "epsilon", seed: int = 0, text_encoder_2_width: int = 32):
    """A ``StableDiffusionXLPipeline`` shaped like SDXL.

    Two text encoders whose hidden states are concatenated (32 + 32 = cross-attention dim 64), the second one's
    pooled projection (32) plus six micro-conditioning scalars embedded in 8 dims each feeding the
    ``text_time`` added embedding: 32 + 6 * 8 = 80 inputs. ``text_encoder_2_width`` ≠ 32 makes the two encoders
    differ in width as SDXL's do (768, 1280), which diffusers' single-file loader relies on to tell them apart.
    """
    from diffusers import StableDiffusionXLPipeline

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(seed)
    addition_time_embed_dim = 8
    text_encoder = _tiny_text_encoder(tokenizer)
    text_encoder_2 = _tiny_text_encoder(tokenizer, with_projection=True, hidden_size=text_encoder_2_width)
    pooled_dim = text_encoder_2.config.projection_dim
    unet = _tiny_unet(
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=pooled_dim + 6 * addition_time_embed_dim,
    )
    vae = _tiny_vae()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_tiny_scheduler(prediction_type),
        force_zeros_for_empty_prompt=True,
    )


def save_tiny_pipeline(pipe, directory: str | Path) -> Path:
    """Save a tiny pipeline so ``from_pretrained(directory)`` reloads it offline, tokenizers included.

    transformers 5 saves a tokenizer as ``tokenizer.json`` only; ``vocab.json`` and ``merges.txt`` are written
    next to it as well so that transformers 4 (whose ``CLIPTokenizer`` reads those two files) loads it too.
    """
    directory = Path(directory)
    pipe.save_pretrained(directory)
    for name in ("tokenizer", "tokenizer_2"):
        backend = getattr(getattr(pipe, name, None), "backend_tokenizer", None)
        if backend is not None:
            backend.model.save(str(directory / name))
    return directory
