"""LoRA files: diffusers/PEFT and kohya formats reproduce the trained adapter exactly; families are told apart.

All offline, on the tiny SD1.5- and SDXL-shaped pipelines from ``fewstep.training.teacher.tiny_models``.
"""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fewstep.training.publish.lora_files import (
    kohya_lora_to_peft,
    kohya_name_to_module_path,
    load_kohya_lora,
    lora_family_of_state_dict,
    save_diffusers_lora,
    save_kohya_lora,
)
from fewstep.training.teacher.tiny_models import (
    TINY_IMAGE_SIZE,
    TINY_LATENT_SIZE,
    build_tiny_sd15_pipeline,
    build_tiny_sdxl_pipeline,
    write_offline_clip_tokenizer,
)

TARGET_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj",
]  # fmt: skip
FAMILIES = ["sd15", "sdxl"]


def _builder(family):
    return build_tiny_sdxl_pipeline if family == "sdxl" else build_tiny_sd15_pipeline


def _pipeline_class(family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _add_generator_lora(unet, rank=4, alpha=2, **config_kwargs):
    from peft import LoraConfig

    torch.manual_seed(1)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=TARGET_MODULES, **config_kwargs
    )
    unet.add_adapter(config, adapter_name="generator")
    return unet


@torch.no_grad()
def _unet_output(unet):
    """The UNet's prediction on one fixed input (conditioning shaped for the UNet's family)."""
    generator = torch.Generator().manual_seed(123)
    context_dim = unet.config.cross_attention_dim
    sample = torch.randn(1, 4, TINY_LATENT_SIZE, TINY_LATENT_SIZE, generator=generator)
    context = torch.randn(1, 8, context_dim, generator=generator)
    added = None
    if unet.config.addition_embed_type == "text_time":
        size = float(TINY_IMAGE_SIZE)
        added = {
            "text_embeds": torch.randn(1, 32, generator=generator),
            "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]]),
        }
    return unet(sample, torch.tensor([500]), context, added_cond_kwargs=added).sample


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_reloads_offline_and_generates(family, bases):
    from diffusers import DiffusionPipeline

    pipe = _pipeline_class(family).from_pretrained(bases[family])
    assert type(DiffusionPipeline.from_pretrained(bases[family])) is type(pipe)
    images = pipe(
        "a photo", num_inference_steps=2, output_type="np", height=TINY_IMAGE_SIZE, width=TINY_IMAGE_SIZE
    ).images
    assert images.shape == (1, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
    assert images.std() > 0.01
    # Also loadable by transformers 4, whose CLIPTokenizer reads these instead of tokenizer.json.
    assert (bases[family] / "tokenizer" / "vocab.json").is_file()
    assert (bases[family] / "tokenizer" / "merges.txt").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_is_deterministic_per_seed_with_non_trivial_unet_output(family):
    first = _unet_output(_builder(family)(seed=0).unet)
    assert torch.equal(first, _unet_output(_builder(family)(seed=0).unet))
    assert not torch.allclose(first, _unet_output(_builder(family)(seed=1).unet))
    assert first.abs().mean() > 0.05


def test_offline_tokenizer_keeps_prompt_and_extra_words_whole(tmp_path):
    tokenizer = write_offline_clip_tokenizer(tmp_path, extra_words=["zebra"])
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("A photo of a zebra, digit seven").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "zebra</w>", ",</w>",
                      "digit</w>", "seven</w>", "<|endoftext|>"]  # fmt: skip
    assert len(tokenizer("xylophone", padding="max_length").input_ids) == 77


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_lora_reloads_into_fresh_pipeline_with_exact_alpha(family, bases, tmp_path):
    unet = _builder(family)().unet
    base_output = _unet_output(unet)
    trained_output = _unet_output(_add_generator_lora(unet, rank=4, alpha=2))
    assert (trained_output - base_output).abs().max() > 1e-2  # the LoRA matters, so the check below has teeth

    save_diffusers_lora(unet, "generator", tmp_path / "lora")
    fresh = _pipeline_class(family).from_pretrained(bases[family])
    fresh.load_lora_weights(tmp_path / "lora")

    assert (_unet_output(fresh.unet) - trained_output).abs().max() <= 1e-5


def test_diffusers_lora_keys_are_peft_native_with_config_and_family_in_metadata(tmp_path):
    unet = _add_generator_lora(build_tiny_sdxl_pipeline().unet)
    path = save_diffusers_lora(unet, "generator", tmp_path)
    keys = load_file(path).keys()
    assert all(key.startswith("unet.") and key.endswith((".lora_A.weight", ".lora_B.weight")) for key in keys)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["fewstep_base_family"] == "sdxl"
    assert '"unet.lora_alpha": 2' in metadata["lora_adapter_metadata"]


@pytest.mark.parametrize("alpha", [4, 2], ids=["alpha_equals_rank", "alpha_differs_from_rank"])
def test_kohya_lora_converts_back_to_the_same_matrices_and_alpha(alpha, tmp_path):
    from peft import get_peft_model_state_dict

    unet = _add_generator_lora(build_tiny_sd15_pipeline().unet, rank=4, alpha=alpha)
    state_dict, alphas = kohya_lora_to_peft(save_kohya_lora(unet, "generator", tmp_path / "lora.safetensors"))

    expected = get_peft_model_state_dict(unet, adapter_name="generator")
    assert state_dict.keys() == expected.keys()
    assert all(torch.equal(state_dict[key], expected[key]) for key in expected)
    assert set(alphas.values()) == {float(alpha)}


def test_kohya_lora_writes_per_module_alpha_from_alpha_pattern(tmp_path):
    unet = _add_generator_lora(build_tiny_sd15_pipeline().unet, alpha=2, alpha_pattern={"attn1.to_q": 8})
    modules = load_kohya_lora(save_kohya_lora(unet, "generator", tmp_path / "lora.safetensors"))
    for module_path, (_, _, alpha) in modules.items():
        assert alpha == (8.0 if module_path.endswith("attn1.to_q") else 2.0), module_path


def test_kohya_keys_start_with_lora_unet_and_every_module_has_down_up_alpha(tmp_path):
    from peft import get_peft_model_state_dict

    unet = _add_generator_lora(build_tiny_sdxl_pipeline().unet)
    tensors = load_file(save_kohya_lora(unet, "generator", tmp_path / "lora.safetensors"))
    assert all(key.startswith("lora_unet_") for key in tensors)
    names = {key.split(".")[0] for key in tensors}
    peft_keys = get_peft_model_state_dict(unet, adapter_name="generator")
    module_paths = {key.removesuffix(".lora_A.weight") for key in peft_keys if key.endswith(".lora_A.weight")}
    assert names == {"lora_unet_" + path.replace(".", "_") for path in module_paths}
    for name in names:
        assert tensors[f"{name}.alpha"].ndim == 0 and tensors[f"{name}.alpha"].dtype == torch.float32
        assert tensors[f"{name}.lora_down.weight"].shape[0] == 4
        assert tensors[f"{name}.lora_up.weight"].shape[1] == 4
    assert len(tensors) == 3 * len(names)


def test_kohya_alpha_override_keeps_the_applied_update(tmp_path):
    unet = _add_generator_lora(build_tiny_sd15_pipeline().unet, rank=4, alpha=2)
    real = load_kohya_lora(save_kohya_lora(unet, "generator", tmp_path / "real.safetensors"))
    overridden = load_kohya_lora(save_kohya_lora(unet, "generator", tmp_path / "rank.safetensors", alpha=4))
    for module_path, (down, up, alpha) in real.items():
        other_down, other_up, other_alpha = overridden[module_path]
        assert other_alpha == 4.0
        rank = down.shape[0]
        update = up.flatten(1) @ down.flatten(1) * (alpha / rank)
        other_update = other_up.flatten(1) @ other_down.flatten(1) * (other_alpha / rank)
        torch.testing.assert_close(other_update, update)


def test_kohya_lora_applies_the_trained_update_in_diffusers_kohya_loader(bases, tmp_path):
    """An independent reader of the kohya format (diffusers' converter) reproduces the adapter, alpha included."""
    unet = _add_generator_lora(build_tiny_sd15_pipeline().unet, rank=4, alpha=2)
    trained_output = _unet_output(unet)
    save_kohya_lora(unet, "generator", tmp_path / "lora.safetensors")
    fresh = _pipeline_class("sd15").from_pretrained(bases["sd15"])
    fresh.load_lora_weights(tmp_path, weight_name="lora.safetensors")
    assert (_unet_output(fresh.unet) - trained_output).abs().max() <= 1e-5


def test_kohya_names_map_back_to_diffusers_module_paths():
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_out_0"
    assert kohya_name_to_module_path(name) == "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_out.0"
    assert kohya_name_to_module_path("lora_unet_up_blocks_0_resnets_1_time_emb_proj") == (
        "up_blocks.0.resnets.1.time_emb_proj"
    )
    assert kohya_name_to_module_path("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj") == (
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_read_from_both_file_formats(family, tmp_path):
    unet = _add_generator_lora(_builder(family)().unet)
    assert lora_family_of_state_dict(save_diffusers_lora(unet, "generator", tmp_path)) == family
    assert lora_family_of_state_dict(save_kohya_lora(unet, "generator", tmp_path / "k.safetensors")) == family


def test_family_is_told_from_real_model_shapes_and_names_without_metadata():
    def lora_a(width):
        return torch.zeros(4, width)

    sd15_key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
    sdxl_kohya_key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight"
    assert lora_family_of_state_dict({sd15_key: lora_a(768)}) == "sd15"
    assert lora_family_of_state_dict({sd15_key: lora_a(2048)}) == "sdxl"
    assert lora_family_of_state_dict({sdxl_kohya_key: lora_a(2048)}) == "sdxl"
    assert lora_family_of_state_dict({"lora_unet_add_embedding_linear_1.lora_down.weight": lora_a(2816)}) == "sdxl"
    sd15_first_level = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
    assert lora_family_of_state_dict({sd15_first_level: lora_a(320)}) == "sd15"
    assert lora_family_of_state_dict({sd15_key: lora_a(1024)}) is None  # SD2.x: neither


def test_tiny_sdxl_lora_is_recognised_by_its_stacked_transformer_blocks():
    from peft import get_peft_model_state_dict

    unet = _add_generator_lora(build_tiny_sdxl_pipeline().unet)
    assert lora_family_of_state_dict(get_peft_model_state_dict(unet, adapter_name="generator")) == "sdxl"


def test_the_same_lora_saved_twice_is_the_same_file(tmp_path):
    """safetensors writes its header from a hash map (key order varies run to run); fewstep's files sort it."""
    import subprocess
    import sys

    script = (
        "import sys, torch; from safetensors.torch import save_file; "
        "from fewstep.training.publish.lora_files import canonical_header; "
        "tensors = {f'lora_unet_block_{i}.lora_down.weight': torch.full((2, 3), float(i)) for i in range(6)}; "
        "save_file(tensors, sys.argv[1], metadata={k: k * 3 for k in 'abcdefgh'}); canonical_header(sys.argv[1])"
    )
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for path in paths:  # separate processes: each hash map gets its own random order
        subprocess.run([sys.executable, "-c", script, str(path)], check=True)
    assert len({path.read_bytes() for path in paths}) == 1
    with safe_open(str(paths[0]), framework="pt") as handle:
        assert handle.metadata() == {k: k * 3 for k in "abcdefgh"}
        assert torch.equal(handle.get_tensor("lora_unet_block_5.lora_down.weight"), torch.full((2, 3), 5.0))
