"""DMD and Progressive Distillation end to end on tiny SD1.5- and SDXL-shaped teachers (ε and v), via the trainer.

Each run is a few iterations: it trains, checkpoints, resumes to the uninterrupted run's losses and writes LoRA
files that diffusers loads. Gradient checkpointing is exact for both methods' backward passes.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from fewstep.cli import main
from fewstep.training.methods.dmd import DMDTrainConfig, train_dmd
from fewstep.training.methods.progressive import ProgressiveBatch, ProgressiveLoop, ProgressiveTrainConfig, train_progressive

TRAIN = {"dmd": (DMDTrainConfig, train_dmd), "progressive": (ProgressiveTrainConfig, train_progressive)}


def config(method, teacher, output, prompts, **overrides):
    base = dict(
        teacher=str(teacher), output=str(output), prompts=str(prompts), max_steps=4, gen_rank=4, gen_alpha=2.0,
        checkpoint_every=2, validate_every=0, warmup_steps=1, lr=1e-3, num_pairs=6, pair_steps=2, batch_size=2,
    )  # fmt: skip
    if method == "dmd":
        base.update(fake_rank=4, fake_alpha=4.0)
    else:
        base.update(start_steps=2, end_steps=1)
    cls, _ = TRAIN[method]
    return cls(**{**base, **overrides})


def run_method(method, cfg, resume=False, stop_at=None):
    losses = {}

    def on_step(step, metrics):
        losses[step] = metrics
        return stop_at is not None and step >= stop_at

    TRAIN[method][1](cfg, resume=resume, on_step=on_step)
    return losses


@pytest.mark.parametrize(
    "method,family,prediction_type",
    [
        ("dmd", "sd15", "epsilon"),
        ("dmd", "sdxl", "v_prediction"),
        ("progressive", "sd15", "v_prediction"),
        ("progressive", "sdxl", "epsilon"),
    ],
)
def test_resumed_run_reproduces_the_uninterrupted_losses(teachers, prompts, tmp_path, method, family, prediction_type):
    teacher = teachers[family, prediction_type]
    uninterrupted = run_method(method, config(method, teacher, tmp_path / "a", prompts, max_steps=6))
    first = run_method(method, config(method, teacher, tmp_path / "b", prompts, max_steps=6), stop_at=2)
    pairs = sorted((tmp_path / "b" / "pairs").glob("pairs-*.safetensors"))
    made_at = [p.stat().st_mtime_ns for p in pairs]
    resumed = run_method(method, config(method, teacher, tmp_path / "b", prompts, max_steps=6), resume=True)
    assert max(first) == 2 and sorted(resumed) == [3, 4, 5, 6]  # PD: the round boundary (3) is after the resume
    for step in (3, 4, 5, 6):
        assert resumed[step] == uninterrupted[step]
    assert [p.stat().st_mtime_ns for p in pairs] == made_at  # the pairs were reused, not made again


def test_dmd_writes_pairs_checkpoints_and_a_one_step_lora(teachers, prompts, tmp_path):
    run = train_dmd(config("dmd", teachers["sd15", "epsilon"], tmp_path / "run", prompts))
    assert json.loads((run / "pairs" / "manifest.json").read_text())["pair_steps"] == 2
    assert load_file(run / "pairs" / "pairs-000000.safetensors")["target"].shape == (6, 4, 16, 16)
    assert (run / "checkpoints" / "step-0000004" / "fake_score.safetensors").is_file()
    assert json.loads((run / "lora" / "fewstep_recipe.json").read_text()) == {
        "method": "dmd", "timesteps": [999], "sampler": "few_step", "step": 4
    }


def test_progressive_exports_every_round_with_its_timesteps_and_diffusers_loads_them(teachers, prompts, tmp_path):
    from diffusers import StableDiffusionPipeline

    teacher = teachers["sd15", "epsilon"]
    run = train_progressive(config("progressive", teacher, tmp_path / "run", prompts, start_steps=4))
    recipes = {n: json.loads((run / "lora" / f"steps-{n}" / "fewstep_recipe.json").read_text()) for n in (4, 2, 1)}
    assert recipes[4]["timesteps"] == [999, 749, 499, 249] and recipes[1]["timesteps"] == [999]
    assert all(r["sampler"] == "ddim" and r["method"] == "progressive" for r in recipes.values())
    round_weights = [load_file(run / "lora" / f"steps-{n}" / "pytorch_lora_weights.safetensors") for n in (4, 2, 1)]
    assert any(not torch.equal(round_weights[0][k], round_weights[2][k]) for k in round_weights[0])
    x, t, emb = torch.randn(1, 4, 16, 16), torch.tensor([999]), torch.randn(1, 77, 32)
    base = StableDiffusionPipeline.from_pretrained(teacher)
    with torch.no_grad():
        plain = base.unet(x, t, encoder_hidden_states=emb).sample
        base.load_lora_weights(run / "lora" / "steps-2")
        with_lora = base.unet(x, t, encoder_hidden_states=emb).sample
    assert (with_lora - plain).abs().max() > 1e-5
    # The ComfyUI (kohya) file of the last round holds exactly the final generator adapter.
    from fewstep.training.publish.lora_files import kohya_lora_to_peft

    kohya, alphas = kohya_lora_to_peft(run / "lora" / "steps-1" / "fewstep_comfyui.safetensors")
    final = load_file(run / "checkpoints" / "step-0000004" / "generator.safetensors")
    assert set(kohya) == set(final) and all(torch.equal(kohya[k], final[k]) for k in final)
    assert set(alphas.values()) == {2.0}


def test_pairs_made_for_another_cfg_are_refused_in_one_line(teachers, prompts, tmp_path, capsys):
    train_dmd(config("dmd", teachers["sd15", "epsilon"], tmp_path / "run", prompts, max_steps=1))
    capsys.readouterr()  # the first run's progress bars
    args = ["train", "--method", "dmd", "--teacher", str(teachers["sd15", "epsilon"]), "--output",
            str(tmp_path / "run"), "--prompts", str(prompts), "--num-pairs", "6", "--pair-steps", "2",
            "--guidance-scale", "3", "--max-steps", "1", "--gen-rank", "4", "--fake-rank", "4",
            "--overwrite"]  # fmt: skip  (--overwrite keeps the pair cache, pairs/)
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "guidance_scale: cached 1.75, this run 3.0" in error


def test_dmd2_regression_warm_start_from_the_cli(teachers, prompts, tmp_path):
    args = ["train", "--method", "dmd2", "--teacher", str(teachers["sd15", "epsilon"]), "--output",
            str(tmp_path / "run"), "--prompts", str(prompts), "--num-pairs", "4", "--pair-steps", "2",
            "--init-regression-steps", "2", "--max-steps", "3", "--gen-rank", "4", "--fake-rank", "4",
            "--validate-every", "0", "--timesteps", "399"]  # fmt: skip
    assert main(args) == 0
    assert (tmp_path / "run" / "pairs" / "pairs-000000.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "lora" / "fewstep_recipe.json").read_text())["timesteps"] == [399]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "dmd2", "--start-steps", "4"], "--start-steps is an option of --method progressive"),
        (["--method", "progressive", "--regression-weight", "1"], "--regression-weight is an option of --method dmd"),
        (["--method", "progressive", "--gan-weight", "0.1"], "--gan-weight is an option of --method dmd2 / dmd"),
    ],
)
def test_another_methods_option_is_refused_in_one_line(capsys, tmp_path, args, message):
    assert main(["train", "--teacher", "x", "--output", str(tmp_path / "run"), *args]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and message in error


@pytest.mark.parametrize(
    "method,overrides,message",
    [
        ("progressive", dict(start_steps=6, end_steps=1), "start / end must be a power of 2"),
        ("dmd", dict(gan_weight=0.1), "DMD has no GAN"),
        ("dmd", dict(num_steps=4), "DMD trains a one-step generator"),
    ],
)
def test_bad_combinations_within_a_method_are_refused(teachers, prompts, tmp_path, method, overrides, message):
    from fewstep.training.loop.errors import TrainingError

    with pytest.raises(TrainingError, match=message):
        TRAIN[method][1](config(method, teachers["sd15", "epsilon"], tmp_path / "run", prompts, **overrides))


def test_train_help_documents_every_methods_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for option in ("--regression-weight", "--init-regression-steps", "--start-steps", "--end-steps", "--num-pairs",
                   "--pair-steps", "--gan-weight"):  # fmt: skip
        assert option in text
    assert "progressive only" in text and "dmd only" in text


# ----------------------------------------------------------------------------------- gradient checkpointing
def _generator_gradient(method, checkpointing):
    from test_gradient_checkpointing import networks_with_nonzero_adapters

    from fewstep.training.loop.dmd2_loop import DMD2LoopConfig
    from fewstep.training.loop.regression import DMDBatch, DMDLoop

    networks, cond = networks_with_nonzero_adapters("sd15", 4, 4, checkpointing)
    seen = []

    def record(params, max_norm):
        seen.append(torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.flatten() for p in params]))
        return torch.tensor(0.0)

    sgd = lambda params: torch.optim.SGD(params, lr=0.0)
    torch.manual_seed(0)
    if method == "dmd":
        loop = DMDLoop(
            networks, sgd(networks.generator_parameters()), sgd(networks.fake_score_parameters()),
            DMD2LoopConfig(dfake_gen_update_ratio=1), clip_grad_norm=record,
            regression_weight=0.5, init_regression_steps=0, regression_kind="pseudo_huber",
        )  # fmt: skip
        batch = DMDBatch(shape=(2, 4, 16, 16), cond=cond, pair_noise=torch.randn(2, 4, 16, 16),
                         pair_target=torch.randn(2, 4, 16, 16), pair_cond=cond)  # fmt: skip
    else:  # round 1: the teacher is the other adapter, so forwards switch adapters between teacher and student
        loop = ProgressiveLoop(networks, sgd(networks.generator_parameters()), [4, 2], 1, clip_grad_norm=record)
        loop.round, loop.step = 1, 1
        batch = ProgressiveBatch(x0=torch.randn(2, 4, 16, 16), cond=cond)
    loop.train_step([batch, batch])
    return seen[0]


@pytest.mark.parametrize("method", ["dmd", "progressive"])
def test_generator_gradients_with_checkpointing_equal_those_without(method):
    plain = _generator_gradient(method, checkpointing=False)
    checkpointed = _generator_gradient(method, checkpointing=True)
    assert plain.norm() > 0
    assert float((checkpointed - plain).norm() / plain.norm()) <= 1e-5


def test_resume_from_the_cli_finds_the_runs_method(teachers, prompts, tmp_path, capsys):
    run = tmp_path / "run"
    run_method("progressive", config("progressive", teachers["sd15", "epsilon"], run, prompts, max_steps=4), stop_at=2)
    assert (run / "method").read_text().strip() == "progressive"
    assert main(["train", "--output", str(run), "--resume"]) == 0  # no --method: the run's own
    assert (run / "checkpoints" / "step-0000004").is_dir()
    capsys.readouterr()
    # Another method is refused in one line; PD's rounds split --max-steps, so a resume cannot change it.
    assert main(["train", "--method", "dmd", "--output", str(run), "--resume"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "is a --method progressive run" in error
    assert main(["train", "--output", str(run), "--resume", "--max-steps", "6"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--max-steps 6 (the run has 4) cannot change on resume" in error


# ----------------------------------------------------------------------------------- run safety, every method
def cli_args(method, teacher, prompts, run, *extra):
    """``fewstep train`` arguments of a tiny DMD or PD run: 6 iterations, checkpoints and grids every 2."""
    args = ["train", "--method", method, "--teacher", str(teacher), "--prompts", str(prompts), "--output", str(run),
            "--max-steps", "6", "--gen-rank", "4", "--gen-alpha", "2", "--checkpoint-every", "2", "--validate-every",
            "2", "--warmup-steps", "1", "--lr", "1e-3", "--num-pairs", "6", "--pair-steps", "2", "--batch-size", "2",
            "--num-validation-prompts", "2"]  # fmt: skip
    if method == "dmd":
        args += ["--fake-rank", "4", "--fake-alpha", "4", "--ema-decay", "0.5"]
    else:
        args += ["--start-steps", "2", "--end-steps", "1"]
    return [*args, *extra]


def assert_same_tensors(paths, reference_run, run):
    """Each safetensors file under ``reference_run`` holds exactly the tensors of its twin under ``run``."""
    for path in paths:
        other = load_file(run / path.relative_to(reference_run))
        assert all(torch.equal(tensor, other[key]) for key, tensor in load_file(path).items()), path


@pytest.fixture(scope="module")
def uninterrupted_runs(teachers, prompts, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    for method in ("dmd", "progressive"):
        assert main(cli_args(method, teachers["sd15", "epsilon"], prompts, root / method)) == 0
    return root


# PD's round boundary is at iteration 3 (6 iterations, 2 rounds): stopped at 3, the resume crosses it.
@pytest.mark.parametrize("stop", [3, 4])
@pytest.mark.parametrize("method", ["dmd", "progressive"])
def test_every_method_stops_on_sigterm_after_a_checkpoint_and_resumes_bit_identically(
    teachers, prompts, tmp_path, monkeypatch, capsys, uninterrupted_runs, method, stop
):
    import os
    import signal

    from fewstep.training.loop.regression import DMDLoop

    loop_class = DMDLoop if method == "dmd" else ProgressiveLoop
    train_step = loop_class.train_step

    def interrupted_train_step(self, batches):
        if self.step == stop - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(self, batches)

    run = tmp_path / "run"
    capsys.readouterr()
    with monkeypatch.context() as patches:
        patches.setattr(loop_class, "train_step", interrupted_train_step)
        assert main(cli_args(method, teachers["sd15", "epsilon"], prompts, run)) == 128 + signal.SIGTERM
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(f"at step {stop}, checkpoint saved; resume with: fewstep train --output {run} --resume")
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == f"step-{stop:07d}"
    if stop % 2 == 0:
        (run / "samples" / f"step-{stop:07d}.png").unlink()  # as if a kill had come between checkpoint and grid
    (run / "checkpoints" / "step-0000005.tmp").mkdir()  # as if a kill had cut a checkpoint write short
    assert main(["train", "--output", str(run), "--resume"]) == 0  # no --method: the run's own
    assert not (run / "checkpoints" / "step-0000005.tmp").exists()
    uninterrupted = uninterrupted_runs / method
    assert sorted(p.name for p in (run / "samples").iterdir()) == sorted(
        p.name for p in (uninterrupted / "samples").iterdir()
    )  # the missed grid is made on resume
    final = [*(uninterrupted / "checkpoints" / "step-0000006").glob("*.safetensors"),
             *(uninterrupted / "lora").rglob("*.safetensors")]  # fmt: skip  (PD: every round's LoRA files)
    assert_same_tensors(final, uninterrupted, run)
    state = lambda r: torch.load(r / "checkpoints" / "step-0000006" / "training_state.pt", weights_only=True)
    assert state(run)["generator_optimizer"]["state"][0]["exp_avg"].equal(
        state(uninterrupted)["generator_optimizer"]["state"][0]["exp_avg"]
    )


@pytest.mark.parametrize("method", ["dmd", "progressive"])
def test_ctrl_c_while_making_pairs_says_what_is_kept_and_resume_finishes_the_same_run(
    teachers, prompts, tmp_path, monkeypatch, capsys, uninterrupted_runs, method
):
    import os
    import signal

    from fewstep.training.data import pair_cache

    make_shard = pair_cache.sample_ddim

    def interrupted_shard(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the first shard is being made
        return make_shard(*args, **kwargs)

    run = tmp_path / "run"
    capsys.readouterr()
    with monkeypatch.context() as patches:
        patches.setattr(pair_cache, "sample_ddim", interrupted_shard)
        assert main(cli_args(method, teachers["sd15", "epsilon"], prompts, run)) == 128 + signal.SIGINT
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"stopped while making the teacher ODE pairs: 0 of 6 are saved in {run / 'pairs'}" in last
    assert last.endswith(f"continue with: fewstep train --output {run} --resume")
    assert main(["train", "--output", str(run), "--resume"]) == 0
    uninterrupted = uninterrupted_runs / method
    assert_same_tensors((uninterrupted / "lora").rglob("*.safetensors"), uninterrupted, run)


def test_a_new_lr_takes_effect_on_resume_of_a_progressive_run(teachers, prompts, tmp_path):
    run = tmp_path / "run"
    run_method("progressive", config("progressive", teachers["sd15", "epsilon"], run, prompts, max_steps=4), stop_at=2)
    assert main(["train", "--output", str(run), "--resume", "--lr", "5e-4"]) == 0
    state = torch.load(run / "checkpoints" / "step-0000004" / "training_state.pt", weights_only=True)
    assert state["generator_scheduler"]["base_lrs"] == [5e-4]
    assert state["generator_optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-4)
