"""Teachers beyond diffusers folders: single-file checkpoints (``--teacher FILE --teacher-config DIR``) and styled
teachers (``--teacher-lora FILE[:SCALE]``), on tiny SD1.5 and SDXL pipelines; bad files get one line each."""

import pytest
import torch
import yaml
from safetensors.torch import save_file
from single_file_checkpoints import save_single_file

from fewstep.cli import main
from fewstep.training.publish.lora_files import save_kohya_lora
from fewstep.training.teacher.loading import load_teacher
from fewstep.training.teacher.tiny_models import build_tiny_sd15_pipeline, build_tiny_sdxl_pipeline, save_tiny_pipeline

# SDXL's two text encoders differ in width (768, 1280); diffusers' single-file loader tells them apart by it.
BUILDERS = {"sd15": build_tiny_sd15_pipeline, "sdxl": lambda seed: build_tiny_sdxl_pipeline(seed=seed, text_encoder_2_width=48)}
TRAIN = ["--max-steps", "2", "--gen-rank", "4", "--fake-rank", "4", "--dfake-gen-update-ratio", "2",
         "--checkpoint-every", "0", "--validate-every", "0", "--warmup-steps", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Per family: a single-file checkpoint (seed 3), a diffusers config folder with other weights (seed 4), and
    the pipeline the checkpoint was written from."""
    root = tmp_path_factory.mktemp("single-file")
    out = {}
    for family, build in BUILDERS.items():
        pipe = build(seed=3)
        out[family] = {
            "checkpoint": save_single_file(pipe, root / f"{family}.safetensors"),
            "config": save_tiny_pipeline(build(seed=4), root / f"{family}-config"),
            "pipe": pipe,
        }
    return out


def cli_error(capsys, *argv):
    capsys.readouterr()
    code = main(["train", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def style_lora(family: str, path, seed: int = 9):
    """A kohya-format style LoRA with non-zero up weights (so fusing it changes the teacher)."""
    from peft import LoraConfig

    unet = BUILDERS[family](seed=3).unet
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="style")  # fmt: skip
    return save_kohya_lora(unet, "style", path, family=family)


# ----------------------------------------------------------------------------------------- single-file checkpoints
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_teacher_has_the_files_weights_and_family(files, family):
    pipe, detected = load_teacher(str(files[family]["checkpoint"]), teacher_config=str(files[family]["config"]))
    assert detected == family
    for name in ("unet", "vae", "text_encoder"):
        expected, loaded = getattr(files[family]["pipe"], name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(expected[k], loaded[k]) for k in expected)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_checkpoint_trains_with_teacher_config(files, prompts, tmp_path, capsys, family):
    run = tmp_path / "run"
    code = main(["train", "--teacher", str(files[family]["checkpoint"]), "--teacher-config", str(files[family]["config"]),
                 "--output", str(run), "--prompts", str(prompts), *TRAIN])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["teacher_config"] == str(files[family]["config"])


def test_single_file_without_teacher_config_offline_says_to_pass_it(files, prompts, tmp_path, capsys):
    err = cli_error(capsys, "--teacher", str(files["sd15"]["checkpoint"]), "--output", str(tmp_path / "r"),
                    "--prompts", str(prompts))  # fmt: skip
    assert "is an SD1.x/2.x checkpoint" in err and "pass --teacher-config DIR_OR_ID" in err


def test_teacher_config_of_the_other_family_is_one_line(files, prompts, tmp_path, capsys):
    err = cli_error(capsys, "--teacher", str(files["sd15"]["checkpoint"]), "--teacher-config", str(files["sdxl"]["config"]),
                    "--output", str(tmp_path / "r"), "--prompts", str(prompts))  # fmt: skip
    assert "is an SDXL pipeline" in err and "SD1.x/2.x checkpoint" in err


def test_lora_file_as_teacher_is_one_line(prompts, tmp_path, capsys):
    lora = style_lora("sd15", tmp_path / "style.safetensors")
    err = cli_error(capsys, "--teacher", str(lora), "--output", str(tmp_path / "r"), "--prompts", str(prompts))
    assert "is a LoRA" in err and "--teacher-lora style.safetensors" in err


def test_vae_file_as_teacher_is_one_line(files, prompts, tmp_path, capsys):
    vae = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in files["sd15"]["pipe"].vae.state_dict().items()}, vae)
    err = cli_error(capsys, "--teacher", str(vae), "--output", str(tmp_path / "r"), "--prompts", str(prompts))
    assert "is a VAE, not a checkpoint" in err


def test_pickle_checkpoint_as_teacher_is_one_line(prompts, tmp_path, capsys):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    err = cli_error(capsys, "--teacher", str(ckpt), "--output", str(tmp_path / "r"), "--prompts", str(prompts))
    assert "is a pickle checkpoint (.ckpt)" in err and "only .safetensors" in err


def test_other_model_family_checkpoint_is_one_line(prompts, tmp_path, capsys):
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.proj.weight": torch.zeros(2, 2)}, flux)
    err = cli_error(capsys, "--teacher", str(flux), "--output", str(tmp_path / "r"), "--prompts", str(prompts))
    assert "looks like a Flux transformer" in err


# ----------------------------------------------------------------------------------------- styled teachers
def test_styled_teacher_output_differs_from_the_plain_base(files, tmp_path):
    lora = style_lora("sd15", tmp_path / "style.safetensors")
    plain, _ = load_teacher(str(files["sd15"]["config"]))
    styled, _ = load_teacher(str(files["sd15"]["config"]), style_loras=[f"{lora}:0.8"])
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        difference = (plain.unet(x, t, context).sample - styled.unet(x, t, context).sample).abs().max()
    assert difference > 1e-3
    assert not getattr(styled.unet, "peft_config", None)  # fused and unloaded: training adds its own adapters


def test_style_lora_scale_scales_the_fused_change(files, tmp_path):
    lora = style_lora("sd15", tmp_path / "style.safetensors")
    base = load_teacher(str(files["sd15"]["config"]))[0].unet.state_dict()
    half = load_teacher(str(files["sd15"]["config"]), style_loras=[f"{lora}:0.5"])[0].unet.state_dict()
    full = load_teacher(str(files["sd15"]["config"]), style_loras=[str(lora)])[0].unet.state_dict()
    key = next(k for k in base if k.endswith("attn1.to_q.weight") and not torch.equal(base[k], full[k]))
    torch.testing.assert_close(full[key] - base[key], 2 * (half[key] - base[key]), rtol=1e-4, atol=1e-6)


def test_styled_run_records_the_style_lora_and_its_card_names_it(files, prompts, tmp_path, capsys):
    lora = style_lora("sd15", tmp_path / "style.safetensors")
    run = tmp_path / "run"
    code = main(["train", "--teacher", str(files["sd15"]["config"]), "--teacher-lora", f"{lora}:0.7",
                 "--output", str(run), "--prompts", str(prompts), *TRAIN])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert yaml.safe_load((run / "config.yaml").read_text())["teacher_lora"] == [f"{lora}:0.7"]
    assert main(["push", str(run), "--repo-id", "alice/styled", "--base-model", "owner/base", "--dry-run",
                 "--folder", str(tmp_path / "upload")]) == 0  # fmt: skip
    card = (tmp_path / "upload" / "README.md").read_text()
    assert "| style LoRAs fused into the teacher | `style.safetensors` at scale 0.7 |" in card


def test_diffusers_format_style_lora_also_fuses(files, tmp_path):
    from peft import LoraConfig

    from fewstep.training.publish.lora_files import save_diffusers_lora

    unet = BUILDERS["sd15"](seed=3).unet
    torch.manual_seed(2)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_v"]),
                     adapter_name="style")  # fmt: skip
    lora = save_diffusers_lora(unet, "style", tmp_path / "style", family="sd15")
    lora = lora if lora.is_file() else lora / "pytorch_lora_weights.safetensors"
    base = load_teacher(str(files["sd15"]["config"]))[0].unet.state_dict()
    styled = load_teacher(str(files["sd15"]["config"]), style_loras=[str(lora)])[0].unet.state_dict()
    assert any(not torch.equal(base[k], styled[k]) for k in base if k.endswith("to_q.weight"))


def test_sdxl_style_lora_on_an_sd15_teacher_is_one_line(files, prompts, tmp_path, capsys):
    lora = style_lora("sdxl", tmp_path / "xl_style.safetensors")
    err = cli_error(capsys, "--teacher", str(files["sd15"]["config"]), "--teacher-lora", str(lora),
                    "--output", str(tmp_path / "r"), "--prompts", str(prompts))  # fmt: skip
    assert "xl_style.safetensors is an SDXL LoRA but the teacher is SD1.5" in err


def test_missing_style_lora_is_one_line(files, prompts, tmp_path, capsys):
    err = cli_error(capsys, "--teacher", str(files["sd15"]["config"]), "--teacher-lora", str(tmp_path / "no.safetensors:0.5"),
                    "--output", str(tmp_path / "r"), "--prompts", str(prompts))  # fmt: skip
    assert "does not exist" in err and "no.safetensors" in err


def test_sample_applies_the_runs_style_loras_as_the_model_card_says(files, prompts, tmp_path, capsys):
    """``fewstep sample`` on a styled run samples on the styled base, the same image as the card's diffusers snippet
    (style LoRA loaded, fused at its scale and unloaded, then the fewstep LoRA)."""
    import numpy as np
    from diffusers import DiffusionPipeline
    from PIL import Image

    from fewstep.pipelines import SD_PIPELINE_FILE

    lora = style_lora("sd15", tmp_path / "style.safetensors")
    run, base = tmp_path / "run", files["sd15"]["config"]
    assert main(["train", "--teacher", str(base), "--teacher-lora", f"{lora}:0.7", "--output", str(run),
                 "--prompts", str(prompts), *TRAIN]) == 0  # fmt: skip

    def sampled(*extra) -> np.ndarray:
        out = tmp_path / f"samples{len(extra)}"
        assert main(["sample", "--lora", str(run), "--prompt", "a red car", "--out", str(out), *extra]) == 0
        return np.asarray(Image.open(next(out.glob("*.png"))), dtype=np.int16)

    pipe = DiffusionPipeline.from_pretrained(str(base), custom_pipeline=SD_PIPELINE_FILE, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="style_style")  # the card's lines
    pipe.set_adapters(["style_style"], adapter_weights=[0.7])
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(run))
    resolution = yaml.safe_load((run / "config.yaml").read_text())["resolution"]
    card = pipe("a red car", height=resolution, width=resolution, generator=torch.Generator("cpu").manual_seed(0))
    card = np.asarray(card.images[0], dtype=np.int16)
    assert np.abs(sampled() - card).max() <= 1
    assert "style LoRAs fused into the teacher" in capsys.readouterr().out
    assert np.abs(sampled("--teacher-lora", "none") - card).max() > 1  # the plain base samples another image
