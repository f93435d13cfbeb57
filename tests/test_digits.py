"""The digits teacher, its cache and the yardstick, on tiny budgets (the full build is a benchmark, not a test)."""

import json
import math
import shutil

import pytest
import torch

from fewstep.cli import main
from fewstep.training.data import cache
from fewstep.digits import teacher as digits, yardstick
from fewstep.digits.teacher import DigitsTeacherConfig, build_digits_teacher, digits_teacher

# A few seconds to build: every stage runs, at toy sizes.
TINY = DigitsTeacherConfig(
    vae_blocks=[8, 8, 8], vae_iterations=2, text_hidden=16, text_layers=1, unet_blocks=[16, 32],
    unet_layers_per_block=1, unet_iterations=3, batch_size=8, warmup=1,
)  # fmt: skip
TINY_CLASSIFIER = yardstick.DigitClassifierConfig(width=4, features=16, epochs=1, batch_size=256)


pytestmark = pytest.mark.usefixtures("cache_dir")  # every test gets its own cache root, never the user's


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    return build_digits_teacher(TINY, tmp_path_factory.mktemp("teacher"), progress=False)


@pytest.fixture(scope="module")
def tiny_classifier():
    model, _ = yardstick.train_classifier(TINY_CLASSIFIER, progress=False)
    return model


@pytest.fixture
def count_builds(tiny_teacher, monkeypatch):
    """Count teacher builds; each one copies the tiny teacher instead of training again (the cache is under test)."""
    calls = []

    def copying_build(config, directory, progress=True, device="cpu"):
        calls.append(1)
        shutil.copytree(tiny_teacher, directory, dirs_exist_ok=True)

    monkeypatch.setattr(digits, "build_digits_teacher", copying_build)
    return calls


def test_split_is_fixed_stratified_and_disjoint():
    data = digits.load_digits_split()
    assert data.train_images.shape == (1437, 3, 32, 32) and data.test_images.shape == (360, 3, 32, 32)
    assert data.train_images.min() >= -1 and data.train_images.max() <= 1
    test_share = torch.bincount(data.test_labels, minlength=10) / torch.bincount(
        torch.cat([data.train_labels, data.test_labels]), minlength=10
    )
    assert torch.allclose(test_share, torch.full((10,), 0.2), atol=0.01)
    train_rows = {tuple(x.flatten()[::7].tolist()) for x in data.train_images}
    assert not any(tuple(x.flatten()[::7].tolist()) in train_rows for x in data.test_images)


def test_tiny_teacher_is_a_stable_diffusion_folder(tiny_teacher):
    from diffusers import StableDiffusionPipeline

    from fewstep.training.teacher.loading import load_teacher

    pipe = StableDiffusionPipeline.from_pretrained(tiny_teacher)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the latents, not SD's constant
    assert len(pipe.tokenizer("a handwritten digit seven").input_ids) == 6  # one token per word + bos/eos
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a handwritten digit seven", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and math.isfinite(float(image.sum()))
    _, family = load_teacher(str(tiny_teacher))
    assert family == "sd15"
    record = json.loads((tiny_teacher / digits.TEACHER_CONFIG_FILE).read_text())
    assert digits.read_teacher_config(tiny_teacher) == TINY and record["version"] == digits.VERSION


def test_build_is_deterministic_for_a_seed(tiny_teacher, tmp_path):
    from safetensors.torch import load_file

    again = build_digits_teacher(TINY, tmp_path / "again", progress=False)
    for weights in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        first, second = load_file(tiny_teacher / weights), load_file(again / weights)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_cache_is_reused(count_builds):
    entry = digits_teacher(TINY, progress=False)
    stamp = (entry / "model_index.json").stat().st_mtime_ns
    assert digits_teacher(TINY, progress=False) == entry
    assert len(count_builds) == 1 and (entry / "model_index.json").stat().st_mtime_ns == stamp
    assert entry.name.startswith(f"digits-teacher-v{digits.VERSION}-seed0-")
    digits_teacher(TINY, force=True, progress=False)
    assert len(count_builds) == 2


@pytest.mark.parametrize("damage", ["delete", "truncate", "no_manifest"])
def test_corrupted_cache_entry_is_rebuilt(count_builds, damage):
    from diffusers import StableDiffusionPipeline

    entry = digits_teacher(TINY, progress=False)
    weights = entry / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "delete":
        weights.unlink()
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (entry / cache.MANIFEST).unlink()
    assert cache.check_entry(entry) is not None
    assert digits_teacher(TINY, progress=False) == entry
    assert len(count_builds) == 2 and cache.check_entry(entry) is None
    StableDiffusionPipeline.from_pretrained(entry)


def test_interrupted_build_leaves_nothing_reusable(cache_dir, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C after the VAE and the tokenizer were written

    monkeypatch.setattr(digits, "_train_unet", interrupt)
    with pytest.raises(KeyboardInterrupt):
        digits_teacher(TINY, progress=False)
    assert list(cache_dir.iterdir()) == []  # no entry and no temporary folder


def test_unfinished_entry_is_not_reused(cache_dir, count_builds):
    """A folder under the entry's name without the manifest (e.g. the process was killed) is rebuilt."""
    unfinished = cache_dir / cache.entry_name("digits-teacher", digits.VERSION, TINY)
    unfinished.mkdir(parents=True)
    (unfinished / "model_index.json").write_text("{}")
    assert digits_teacher(TINY, progress=False) == unfinished
    assert len(count_builds) == 1 and cache.check_entry(unfinished) is None


def test_leftovers_of_killed_builds_are_removed(cache_dir, count_builds):
    """SIGKILL skips all cleanup: the next build deletes the dead process's temporary folder."""
    name = cache.entry_name("digits-teacher", digits.VERSION, TINY)
    leftover = cache_dir / f".tmp-{name}-99999999-0123abcd"  # no process has this id
    leftover.mkdir(parents=True)
    digits_teacher(TINY, progress=False)
    assert not leftover.exists()


def test_classifier_is_cached(monkeypatch):
    calls = []
    train = yardstick.train_classifier
    monkeypatch.setattr(yardstick, "train_classifier", lambda *a, **k: calls.append(1) or train(*a, **k))
    first = yardstick.digit_classifier(TINY_CLASSIFIER, progress=False)
    second = yardstick.digit_classifier(TINY_CLASSIFIER, progress=False)
    assert len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def _student_run(teacher_dir, run_dir):
    """A fake DMD2 run: a random generator LoRA on the teacher's UNet, saved as the trainer saves it."""
    from diffusers import StableDiffusionPipeline

    from fewstep.training.publish.lora_files import save_diffusers_lora
    from fewstep.training.loop.networks import lora_config

    unet = StableDiffusionPipeline.from_pretrained(teacher_dir).unet
    torch.manual_seed(0)
    unet.add_adapter(lora_config(4, 4, init_lora_weights=False), adapter_name="generator")
    save_diffusers_lora(unet, "generator", run_dir / "lora")
    (run_dir / "config.yaml").write_text("num_steps: 1\nguidance_scale: 1.5\n")
    return run_dir


def test_eval_json_schema(tiny_teacher, tiny_classifier, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(yardstick, "digit_classifier", lambda **kwargs: tiny_classifier)
    run_dir = _student_run(tiny_teacher, tmp_path / "run")
    out = tmp_path / "out" / "eval.json"
    argv = ["eval", "--teacher", str(tiny_teacher), "--lora", str(run_dir), "--n", "10", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"real", "teacher_50", "teacher_4", "teacher_1", "student_1"}  # a 1-step student
    assert result["n"] == 10 and result["seed"] == 0 and result["guidance_scale"] == 1.5  # from the run config
    for row in result["rows"].values():
        assert set(row) == {"fd", "acc", "precision", "recall", "density", "coverage", "seconds"}
        assert all(math.isfinite(v) for v in row.values())
        assert all(0.0 <= row[key] <= 1.0 for key in ("acc", "precision", "recall", "coverage"))
    assert "teacher_50" in capsys.readouterr().out


def _train_images_as_generator(monkeypatch, images_per_digit: int):
    """Make every generated row draw real train images of the prompted digit, cycling through the first few."""
    data = digits.load_digits_split()
    pools = [(data.train_labels == d).nonzero().flatten()[:images_per_digit] for d in range(10)]
    drawn = [0] * 10

    def sample_digits(model, row, labels, noise, generator, guidance_scale, distillpp):
        picks = []
        for digit in labels.tolist():
            picks.append(pools[digit][drawn[digit] % len(pools[digit])])
            drawn[digit] += 1
        return data.train_images[torch.stack(picks)] / 2 + 0.5

    monkeypatch.setattr(yardstick, "sample_digits", sample_digits)


def test_real_row_scores_high_precision_recall_and_coverage(tiny_teacher, tiny_classifier):
    row = yardstick.evaluate(tiny_teacher, n=500, rows=["real"], classifier=tiny_classifier, progress=False)["rows"]
    assert row["real"]["precision"] > 0.9 and row["real"]["recall"] > 0.9 and row["real"]["coverage"] > 0.9


def test_a_collapsed_generator_scores_low_recall_and_coverage_at_high_precision(
    tiny_teacher, tiny_classifier, monkeypatch
):
    # A real digit, so every image looks real; but one per digit, repeated over the row's 50 per digit.
    _train_images_as_generator(monkeypatch, images_per_digit=1)
    result = yardstick.evaluate(tiny_teacher, n=500, rows=["teacher_1"], classifier=tiny_classifier, progress=False)
    row = result["rows"]["teacher_1"]
    assert row["precision"] > 0.9 and row["recall"] < 0.05 and row["coverage"] < 0.2


def test_a_generator_drawing_distinct_real_images_scores_like_the_real_row(tiny_teacher, tiny_classifier, monkeypatch):
    _train_images_as_generator(monkeypatch, images_per_digit=50)
    rows = yardstick.evaluate(
        tiny_teacher, n=500, rows=["real", "teacher_1"], classifier=tiny_classifier, progress=False
    )["rows"]  # fmt: skip
    for key in ("precision", "recall", "coverage"):
        assert rows["teacher_1"][key] == pytest.approx(rows["real"][key], abs=0.05), key


def test_table_prints_variety_and_a_dash_for_results_from_before_it():
    rows = {"real": {"fd": 20.0, "acc": 0.99, "precision": 0.98, "recall": 0.957, "density": 1.0, "coverage": 0.96,
                     "seconds": 1.0}, "teacher_1": {"fd": 280.0, "acc": 0.99, "seconds": 9.0}}  # fmt: skip
    lines = yardstick.format_table({"rows": rows, "n": 500, "guidance_scale": 2.0, "seed": 0}).splitlines()
    assert "recall" in lines[1] and "cover" in lines[1]
    assert "0.957" in lines[2] and lines[3].count("—") == 3


@pytest.mark.parametrize(
    "num_steps, student_rows",
    [
        (1, ["student_1"]),
        (4, ["student_4", "student_distillpp", "student_distillpp_control"]),
        (2, ["student", "student_distillpp", "student_distillpp_control"]),
    ],
)
def test_default_rows_measure_a_student_at_the_steps_it_trained_for(tmp_path, num_steps, student_rows):
    student = yardstick.StudentInfo(lora=tmp_path / "lora.safetensors", num_steps=num_steps)
    assert yardstick.default_rows(student) == ["real", "teacher_50", "teacher_4", "teacher_1", *student_rows]
    assert yardstick.default_rows(None) == ["real", "teacher_50", "teacher_4", "teacher_1"]


def test_student_differs_from_teacher_and_teacher_is_restored(tiny_teacher, tmp_path):
    model = yardstick.load_digits_model(tiny_teacher, _student_run(tiny_teacher, tmp_path / "run"))
    plain = yardstick.load_digits_model(tiny_teacher)
    labels, noise = torch.arange(10), torch.randn(10, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sample = lambda m, row: yardstick.sample_digits(m, row, labels, noise, torch.Generator().manual_seed(1))
    teacher = sample(model, "teacher_1")
    assert not torch.allclose(sample(model, "student_1"), teacher)
    assert torch.allclose(sample(model, "teacher_1"), teacher)  # the LoRA is off again for the teacher
    assert torch.allclose(sample(plain, "teacher_1"), teacher, atol=1e-5)


def test_distillpp_row_follows_its_settings(tiny_teacher, tmp_path):
    """λ = 0 is the plain 4-step student; the rule and the guiding teacher's CFG each change the samples."""
    model = yardstick.load_digits_model(tiny_teacher, _student_run(tiny_teacher, tmp_path / "run"))
    labels, noise = torch.arange(10), torch.randn(10, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def sample(row, **settings):
        distillpp = yardstick.DistillppSettings(**settings)
        return yardstick.sample_digits(model, row, labels, noise, torch.Generator().manual_seed(1), 1.5, distillpp)

    assert torch.allclose(sample("student_distillpp", lam=0.0), sample("student_4"))
    guided = sample("student_distillpp", lam=0.5)  # the default rule (eps_mix)
    assert not torch.allclose(guided, sample("student_4"), atol=1e-4)
    assert not torch.allclose(sample("student_distillpp", lam=0.5, rule="x0_lerp"), guided, atol=1e-4)
    assert not torch.allclose(sample("student_distillpp", lam=0.5, teacher_guidance_scale=4.0), guided, atol=1e-4)
    assert torch.allclose(sample("student_distillpp", lam=0.5, teacher_guidance_scale=1.5), guided)  # = the row's CFG
    two_steps = sample("student_distillpp", lam=0.5, guided_steps=2)
    assert not torch.allclose(two_steps, guided, atol=1e-4)
    self_guided = sample("student_distillpp", lam=0.5, guide="student")  # the ablation: no teacher at all
    assert not torch.allclose(self_guided, guided, atol=1e-4)


def test_a_multi_step_students_last_step_is_its_own_yardstick_row(tiny_teacher, tiny_classifier, tmp_path, monkeypatch):
    from fewstep.benchmarks import student_steps

    monkeypatch.setattr(yardstick, "digit_classifier", lambda **kwargs: tiny_classifier)
    run_dir = _student_run(tiny_teacher, tmp_path / "run")
    recipe = {"method": "dmd2", "timesteps": [999, 749, 499, 249], "sampler": "few_step"}
    (run_dir / "lora" / "fewstep_recipe.json").write_text(json.dumps(recipe))
    rows = student_steps.measure(tiny_teacher, run_dir, n=20, seed=3, grids=[[999, 749, 499, 249], [999, 499]])
    assert list(rows) == ["step 1 (t=999)", "step 2 (t=749)", "step 3 (t=499)", "step 4 (t=249)",
                          "grid 999,749,499,249", "grid 999,499"]  # fmt: skip
    own = yardstick.evaluate(tiny_teacher, lora=run_dir, n=20, seed=3, rows=["student"], classifier=tiny_classifier,
                             progress=False)["rows"]["student"]  # fmt: skip
    assert rows["step 4 (t=249)"]["fd"] == pytest.approx(own["fd"]) and rows["step 4 (t=249)"]["acc"] == own["acc"]
    assert rows["grid 999,749,499,249"] == rows["step 4 (t=249)"]  # the same noise and fresh noise
    assert rows["grid 999,499"]["fd"] != pytest.approx(rows["step 4 (t=249)"]["fd"])


def test_distillpp_control_row_is_the_same_setting_with_noise_only(tiny_teacher, tmp_path):
    """The control beside every Distillation++ row: the same rule, λ and steps, the rule's noise and no teacher."""
    model = yardstick.load_digits_model(tiny_teacher, _student_run(tiny_teacher, tmp_path / "run"))
    labels, noise = torch.arange(10), torch.randn(10, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = yardstick.DistillppSettings(lam=0.3, guided_steps=2)

    def sample(row, distillpp):
        return yardstick.sample_digits(model, row, labels, noise, torch.Generator().manual_seed(1), 1.5, distillpp)

    control = sample("student_distillpp_control", settings)
    noise_only = yardstick.DistillppSettings(lam=0.3, guided_steps=2, guide="noise")
    assert torch.equal(control, sample("student_distillpp", noise_only))
    assert not torch.allclose(control, sample("student_distillpp", settings), atol=1e-4)
    assert not torch.allclose(control, sample("student_4", settings), atol=1e-4)  # eps_mix's noise term acts


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert main(["teacher", "digits", "--out", str(not_a_dir)]) == 2
    assert main(["eval", "--n", "15"]) == 2
    assert main(["eval", "--distillpp-lambda", "2"]) == 2
    assert main(["eval", "--distillpp-steps", "-1"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and "is a file" in errors[0] and "multiple of 10" in errors[1]
    assert "λ must be in [0, 1]" in errors[2] and "steps must be ≥ 0" in errors[3]
