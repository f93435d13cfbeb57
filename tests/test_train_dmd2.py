"""DMD2 on one shared base UNet, end to end on tiny SD1.5- and SDXL-shaped teachers saved to disk."""


import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fewstep.cli import main
from fewstep.training.methods.dmd2 import DMD2TrainConfig, train_dmd2
from fewstep.training.loop.errors import TrainingError
from fewstep.training.loop.dmd2_loop import DMD2Batch, DMD2Loop, DMD2LoopConfig
from fewstep.training.loop.networks import FAKE_SCORE, GENERATOR, GANHead, SharedUNetNetworks, attach_adapters
from fewstep.training.teacher.loading import encode_prompts, teacher_schedule, unconditional
from fewstep.training.teacher.tiny_models import build_tiny_sd15_pipeline, build_tiny_sdxl_pipeline




BUILDERS = {"sd15": build_tiny_sd15_pipeline, "sdxl": build_tiny_sdxl_pipeline}


def config(teacher, output, prompts, **overrides):
    base = dict(
        teacher=str(teacher), output=str(output), prompts=str(prompts), max_steps=4, gen_rank=4, fake_rank=8,
        gen_alpha=2.0, fake_alpha=8.0, dfake_gen_update_ratio=2, checkpoint_every=2, validate_every=0,
        warmup_steps=1, lr=1e-3,
    )  # fmt: skip
    return DMD2TrainConfig(**{**base, **overrides})


# ----------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize(
    "family,prediction_type,num_steps,with_images,accumulation",
    [
        ("sd15", "epsilon", 1, False, 1),
        ("sd15", "v_prediction", 4, True, 1),
        ("sdxl", "epsilon", 4, False, 2),
        ("sdxl", "v_prediction", 1, True, 1),
    ],
)
def test_a_few_iterations_write_the_run_directory(
    teachers, prompts, images, tmp_path, family, prediction_type, num_steps, with_images, accumulation
):
    losses = []
    run = train_dmd2(
        config(
            teachers[family, prediction_type], tmp_path / "run", prompts, num_steps=num_steps,
            images=str(images) if with_images else None, validate_every=2, gradient_accumulation_steps=accumulation,
        ),
        on_step=lambda step, metrics: losses.append(metrics),
    )  # fmt: skip
    assert (run / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "lora" / "fewstep_comfyui.safetensors").is_file()
    assert sorted(p.name for p in (run / "samples").iterdir()) == [f"step-000000{i}.png" for i in (0, 2, 4)]
    assert all(torch.isfinite(torch.tensor(m["loss_fake"])) for m in losses)
    assert any("loss_dm" in m for m in losses)
    if with_images:
        assert any("loss_disc" in m for m in losses) and any("loss_gan_gen" in m for m in losses)


# ----------------------------------------------------------------------------------------- ownership
def shared_networks(family="sd15", gan=True):
    pipe = BUILDERS[family]()
    cond = encode_prompts(pipe, family, ["a red car", "a cat"], 32)
    uncond = unconditional(pipe, family, 32)
    unet = pipe.unet
    attach_adapters(unet, 4, 4, 4, 4, init_lora_weights=False)
    head = GANHead(unet.config.block_out_channels[-1]) if gan else None
    return SharedUNetNetworks(unet, teacher_schedule(pipe), uncond, 2.0, head), cond


def snapshot(networks):
    named = dict(networks.unet.named_parameters())
    if networks.gan_head is not None:
        named.update({f"gan_head.{k}": v for k, v in networks.gan_head.named_parameters()})
    return {name: p.detach().clone() for name, p in named.items()}


def changed(before, networks):
    after = snapshot(networks)
    return {name for name in before if not torch.equal(before[name], after[name])}


def make_loop(networks, ratio=1):
    adam = lambda params: torch.optim.AdamW(params, lr=1e-2)
    return DMD2Loop(
        networks, adam(networks.generator_parameters()), adam(networks.fake_score_parameters()),
        DMD2LoopConfig(dfake_gen_update_ratio=ratio, gan_generator_weight=0.1, gan_discriminator_weight=0.1),
    )  # fmt: skip


def test_generator_step_changes_only_generator_lora_weights():
    networks, cond = shared_networks()
    loop = make_loop(networks)
    real = torch.randn(2, 4, 16, 16)
    batch = DMD2Batch(shape=(2, 4, 16, 16), cond=cond, real_x0=real, real_cond=cond)
    before = snapshot(networks)
    x, c = loop.generate(batch, grad=True)
    loop.generator_update([(x, c)])
    names = changed(before, networks)
    assert names and all(f".{GENERATOR}." in n for n in names)
    assert len(names) == len(networks.generator_parameters())  # every generator weight moved (A and B random)


def test_fake_score_step_changes_only_fake_score_weights_and_the_gan_head():
    networks, cond = shared_networks()
    loop = make_loop(networks)
    batch = DMD2Batch(shape=(2, 4, 16, 16), cond=cond, real_x0=torch.randn(2, 4, 16, 16), real_cond=cond)
    before = snapshot(networks)
    x, c = loop.generate(batch, grad=False)
    loop.fake_score_update([(x, c, batch)])
    names = changed(before, networks)
    assert any(n.startswith("gan_head.") for n in names)
    assert all(f".{FAKE_SCORE}." in n or n.startswith("gan_head.") for n in names)
    assert any(f".{FAKE_SCORE}." in n for n in names)


def test_base_unet_weights_never_change_over_full_iterations():
    networks, cond = shared_networks()
    loop = make_loop(networks)
    base = {n: p.detach().clone() for n, p in networks.unet.named_parameters() if "lora_" not in n}
    batch = DMD2Batch(shape=(2, 4, 16, 16), cond=cond, real_x0=torch.randn(2, 4, 16, 16), real_cond=cond)
    for _ in range(2):
        loop.train_step(batch)
    after = dict(networks.unet.named_parameters())
    assert all(torch.equal(base[n], after[n]) for n in base)


def test_teacher_pass_is_the_base_unet_with_adapters_disabled():
    networks, cond = shared_networks(gan=False)
    x_t, t = torch.randn(2, 4, 16, 16), torch.tensor([500, 800])
    networks.guidance_scale = 1.0
    with torch.no_grad():
        teacher = networks.real_score(x_t, t, cond)
        student = networks.generator(x_t, t, cond)
        networks.unet.disable_adapters()
        base = networks.schedule.to_x0(networks.unet(x_t, t, **cond.unet_kwargs()).sample, x_t, t)
    torch.testing.assert_close(teacher, base)
    assert not torch.allclose(teacher, student)


def test_nan_loss_skips_the_update_and_is_counted():
    networks, cond = shared_networks()
    generator = networks.generator
    networks.generator = lambda x_t, t, c: generator(x_t, t, c) * float("nan")  # e.g. an fp16 overflow
    loop = make_loop(networks)
    before = snapshot(networks)
    loop.train_step(DMD2Batch(shape=(2, 4, 16, 16), cond=cond))
    assert loop.skipped_steps == 2 and not changed(before, networks)  # generator and fake-score updates


# ----------------------------------------------------------------------------------------- LoRA files
def test_lora_files_reproduce_the_training_time_generator(teachers, prompts, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import set_peft_model_state_dict

    from fewstep.training.publish.lora_files import kohya_lora_to_peft

    teacher = teachers["sd15", "epsilon"]
    run = train_dmd2(config(teacher, tmp_path / "run", prompts))
    trained = load_file(run / "checkpoints" / "step-0000004" / "generator.safetensors")

    # The training-time generator: base UNet + the generator adapter as the trainer built it.
    reference = StableDiffusionPipeline.from_pretrained(teacher)
    attach_adapters(reference.unet, 4, 2.0, 8, 8.0)
    set_peft_model_state_dict(reference.unet, trained, adapter_name=GENERATOR)
    reference.unet.set_adapter(GENERATOR)
    loaded = StableDiffusionPipeline.from_pretrained(teacher)
    loaded.load_lora_weights(run / "lora")
    x, t, emb = torch.randn(2, 4, 16, 16), torch.tensor([999, 249]), torch.randn(2, 77, 32)
    with torch.no_grad():
        expected = reference.unet(x, t, encoder_hidden_states=emb).sample
        actual = loaded.unet(x, t, encoder_hidden_states=emb).sample
        base = StableDiffusionPipeline.from_pretrained(teacher).unet(x, t, encoder_hidden_states=emb).sample
    assert (actual - expected).abs().max() <= 1e-5
    assert (expected - base).abs().max() > 1e-4  # the LoRA really changes the UNet

    kohya, alphas = kohya_lora_to_peft(run / "lora" / "fewstep_comfyui.safetensors")
    assert set(kohya) == set(trained)
    assert all(torch.equal(kohya[k], trained[k]) for k in trained)
    assert set(alphas.values()) == {2.0}


def test_export_rewrites_lora_files_from_a_checkpoint(teachers, prompts, tmp_path):
    run = train_dmd2(config(teachers["sd15", "epsilon"], tmp_path / "run", prompts))
    final = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    assert main(["export", str(run), "--checkpoint", "2", "--out", str(tmp_path / "at2")]) == 0
    at2 = load_file(tmp_path / "at2" / "pytorch_lora_weights.safetensors")
    assert set(at2) == set(final) and any(not torch.equal(at2[k], final[k]) for k in final)
    assert (tmp_path / "at2" / "fewstep_comfyui.safetensors").is_file()


# ----------------------------------------------------------------------------------------- resume
def test_resumed_run_reproduces_the_uninterrupted_loss_sequence(teachers, prompts, images, tmp_path):
    def run(output, max_steps, resume=False, stop_at=None):
        losses = {}

        def on_step(step, metrics):
            losses[step] = metrics
            return stop_at is not None and step >= stop_at

        cfg = config(teachers["sd15", "epsilon"], output, prompts, images=str(images), max_steps=max_steps)
        train_dmd2(cfg, resume=resume, on_step=on_step)
        return losses

    uninterrupted = run(tmp_path / "a", 6)
    first = run(tmp_path / "b", 6, stop_at=3)  # killed after step 3; the stop writes checkpoint 3
    assert max(first) == 3
    resumed = run(tmp_path / "b", 6, resume=True)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == uninterrupted[step]


def test_checkpoints_are_atomic_and_only_the_last_k_are_kept(teachers, prompts, tmp_path):
    run = train_dmd2(config(teachers["sd15", "epsilon"], tmp_path / "run", prompts, max_steps=8, checkpoints_total_limit=2))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-0000006", "step-0000008"]
    assert not list((run / "checkpoints").glob("*.tmp"))


# ----------------------------------------------------------------------------------------- bad input
def cli_error(capsys, *argv):
    capsys.readouterr()  # drop what earlier runs in the test printed
    code = main(["train", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_missing_teacher_folder_is_one_line(capsys, prompts, tmp_path):
    err = cli_error(capsys, "--teacher", str(tmp_path / "nope"), "--output", str(tmp_path / "r"), "--prompts", str(prompts))
    assert "does not exist" in err


def test_unknown_model_type_is_rejected(capsys, teachers, prompts, tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "--teacher", str(teachers["sd15", "epsilon"]), "--model-type", "sd3"])
    assert "invalid choice: 'sd3'" in capsys.readouterr().err


def test_empty_prompts_file_is_one_line(capsys, teachers, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    err = cli_error(capsys, "--teacher", str(teachers["sd15", "epsilon"]), "--output", str(tmp_path / "r"), "--prompts", str(empty))
    assert "empty" in err


def test_images_without_captions_are_one_line(capsys, teachers, prompts, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "lonely.png")
    err = cli_error(
        capsys, "--teacher", str(teachers["sd15", "epsilon"]), "--output", str(tmp_path / "r"),
        "--prompts", str(prompts), "--images", str(tmp_path),
    )  # fmt: skip
    assert "no caption" in err and "lonely.png" in err


def test_resolution_not_divisible_by_the_vae_factor_is_one_line(capsys, teachers, prompts, tmp_path):
    err = cli_error(
        capsys, "--teacher", str(teachers["sd15", "epsilon"]), "--output", str(tmp_path / "r"),
        "--prompts", str(prompts), "--resolution", "33",
    )  # fmt: skip
    assert "33" in err and "scale factor 2" in err


def test_sdxl_checkpoint_cannot_resume_on_an_sd15_teacher(capsys, teachers, prompts, tmp_path):
    train_dmd2(config(teachers["sdxl", "epsilon"], tmp_path / "run", prompts, max_steps=2))
    err = cli_error(
        capsys, "--teacher", str(teachers["sd15", "epsilon"]), "--output", str(tmp_path / "run"),
        "--prompts", str(prompts), "--resume",
    )  # fmt: skip
    assert f"--teacher {teachers['sd15', 'epsilon']} (the run has {teachers['sdxl', 'epsilon']})" in err
    assert "cannot change on resume" in err


def test_repeated_nan_losses_stop_the_run_with_a_message(teachers, prompts, tmp_path, monkeypatch):
    generator = SharedUNetNetworks.generator
    monkeypatch.setattr(SharedUNetNetworks, "generator", lambda self, x_t, t, c: generator(self, x_t, t, c) * float("nan"))
    with pytest.raises(TrainingError, match="NaN/inf in 3 steps"):
        train_dmd2(config(teachers["sd15", "epsilon"], tmp_path / "run", prompts, max_nan_steps=2, max_steps=10))


def test_yaml_config_is_overridden_by_the_cli_and_unknown_keys_are_rejected(capsys, teachers, prompts, tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"teacher: {teachers['sd15', 'epsilon']}\nprompts: {prompts}\nmax-steps: 1\ngen_rank: 4\nfake_rank: 4\n")
    assert main(["train", "--config", str(yaml_file), "--output", str(tmp_path / "r"), "--max-steps", "2",
                 "--validate-every", "0", "--checkpoint-every", "0"]) == 0  # fmt: skip
    saved = (tmp_path / "r" / "config.yaml").read_text()
    assert "max_steps: 2" in saved and "gen_rank: 4" in saved
    yaml_file.write_text("learning_rate: 1\n")
    err = cli_error(capsys, "--config", str(yaml_file))
    assert "unknown option(s) learning_rate" in err


def test_ema_of_the_generator_adapter_is_what_gets_exported(teachers, prompts, tmp_path):
    from fewstep.training.publish.lora_files import kohya_lora_to_peft

    run = train_dmd2(config(teachers["sd15", "epsilon"], tmp_path / "run", prompts, ema_decay=0.5, lr_schedule="cosine"))
    checkpoint = run / "checkpoints" / "step-0000004"
    raw, ema = load_file(checkpoint / "generator.safetensors"), load_file(checkpoint / "generator_ema.safetensors")
    exported, _ = kohya_lora_to_peft(run / "lora" / "fewstep_comfyui.safetensors")
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)


def test_resume_from_the_cli_reuses_the_saved_options(teachers, prompts, tmp_path):
    run = tmp_path / "run"
    train_dmd2(config(teachers["sd15", "epsilon"], run, prompts, max_steps=2))
    assert main(["train", "--output", str(run), "--resume", "--max-steps", "4"]) == 0
    assert (run / "checkpoints" / "step-0000004").is_dir()


def test_a_run_from_before_an_option_existed_resumes_as_it_started(teachers, prompts, tmp_path):
    import yaml

    from fewstep.training.data.cache import write_manifest

    run = tmp_path / "run"
    train_dmd2(config(teachers["sd15", "epsilon"], run, prompts, max_steps=2, num_steps=2))
    assert yaml.safe_load((run / "config.yaml").read_text())["dm_timesteps"] == "below_input"  # a new run's default
    for saved in run.rglob("config.yaml"):  # as an older fewstep wrote them: no dm_timesteps
        options = yaml.safe_load(saved.read_text())
        del options["dm_timesteps"]
        saved.write_text(yaml.safe_dump(options))
    write_manifest(run / "checkpoints" / "step-0000002")  # the edited checkpoint, complete again
    assert main(["train", "--output", str(run), "--resume", "--max-steps", "4"]) == 0
    resumed = yaml.safe_load((run / "checkpoints" / "step-0000004" / "config.yaml").read_text())
    assert resumed["dm_timesteps"] == "full"  # the reference's range, which that run trained with
