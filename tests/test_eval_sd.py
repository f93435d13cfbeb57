"""``fewstep eval --prompts``: any SD teacher and student LoRA scored by FD (DINOv2, CLIP), CLIP score, precision/
recall and speed, with tiny random-weight DINOv2 and CLIP models saved here standing in for the real ones."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from fewstep.cli import main
from fewstep.core.metrics import clip_score

PROMPTS = ["a photo of a cat", "a red car"]


def save_tiny_metric_models(root: Path) -> tuple[Path, Path]:
    """A tiny DINOv2 and a tiny CLIP (with an offline tokenizer), saved as a user's folders would be."""
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

    from fewstep.training.teacher.tiny_models import clip_text_config, write_offline_clip_tokenizer

    torch.manual_seed(0)
    dino = root / "dinov2"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                             patch_size=14, image_size=224)).save_pretrained(dino)  # fmt: skip
    clip = root / "clip"
    tokenizer = write_offline_clip_tokenizer(clip)
    text = clip_text_config(tokenizer, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                  patch_size=8)  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision, projection_dim=16)).save_pretrained(clip)
    tokenizer.save_pretrained(clip)
    return dino, clip


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    return save_tiny_metric_models(tmp_path_factory.mktemp("metric-models"))


@pytest.fixture(scope="module")
def scorer(metric_models):
    from fewstep.training.evaluation.scoring import load_scorer

    return load_scorer(str(metric_models[0]), str(metric_models[1]))


def student_run(directory: Path, teacher: Path, recipe: dict, zero: bool = False) -> Path:
    """A fewstep run directory on the tiny SD1.5 teacher: a random LoRA, or one whose update is exactly zero."""
    from fake_runs import add_random_lora, build_tiny

    from fewstep.training.publish.lora_files import save_diffusers_lora

    unet = add_random_lora(build_tiny("sd15").unet)
    if zero:
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.data.zero_()
    save_diffusers_lora(unet, "generator", directory / "lora", family="sd15")
    (directory / "lora" / "fewstep_recipe.json").write_text(json.dumps(recipe))
    config = {"teacher": str(teacher), "num_steps": len(recipe["timesteps"]), "guidance_scale": 1.75}
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return directory


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval-prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def eval_argv(teacher, prompts_file, metric_models, out, *extra):
    return ["eval", "--teacher", str(teacher), "--prompts", str(prompts_file), "--metric-model", str(metric_models[0]),
            "--clip-model", str(metric_models[1]), "--out", str(out), *extra]  # fmt: skip


# ------------------------------------------------------------------------------------------ the math and the models
def test_clip_score_is_100_times_the_positive_cosine():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    text = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [4.0, 3.0]])
    assert clip_score(image, text).tolist() == pytest.approx([100.0, 0.0, 96.0])


def test_features_and_fd_do_not_depend_on_image_order_or_batching(scorer):
    from fewstep.core.metrics import frechet_distance

    images = torch.rand(6, 3, 40, 36, generator=torch.Generator().manual_seed(0))
    features, clip = scorer.embed(images)
    order = torch.tensor([5, 2, 0, 4, 1, 3])
    shuffled_features, shuffled_clip = scorer.embed(images[order])
    torch.testing.assert_close(shuffled_features, features[order], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(shuffled_clip, clip[order], atol=1e-5, rtol=1e-4)
    other = torch.rand(6, 3, 40, 36, generator=torch.Generator().manual_seed(1))
    reference, _ = scorer.embed(other)
    assert frechet_distance(shuffled_features, reference) == pytest.approx(frechet_distance(features, reference), 1e-6)


def test_the_metric_models_preprocess_to_their_input_size(scorer):
    from fewstep.training.evaluation.metric_models import preprocess

    assert scorer.features.kind == "dinov2" and scorer.features.size == 224
    assert scorer.clip.kind == "clip" and scorer.clip.size == 32
    pixels = preprocess(torch.rand(2, 3, 64, 48), 32, (0.5,) * 3, (0.5,) * 3)
    assert pixels.shape == (2, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1


@pytest.mark.parametrize("spec, expected", [
    ("", dict(name="distillpp", lam=0.01, guided_steps=2, rule="eps_mix", teacher_guidance_scale=7.5)),
    ("strong:lam=0.2,steps=1", dict(name="strong", lam=0.2, guided_steps=1, rule="eps_mix")),
    ("lam=0.1,rule=x0_lerp,cfg=3,teacher_steps=4", dict(name="distillpp", rule="x0_lerp", teacher_guidance_scale=3.0,
                                                        teacher_steps=4)),
])  # fmt: skip
def test_distillpp_row_specs(spec, expected):
    from dataclasses import asdict

    from fewstep.training.evaluation.rows import parse_distillpp

    parsed = asdict(parse_distillpp(spec))
    assert {key: parsed[key] for key in expected} == expected


@pytest.mark.parametrize("spec, message", [
    ("a:lam=2", "λ must be in [0, 1]"), ("a:speed=1", "'speed=1' is not one of"), ("a:steps=x", "steps must be a "
    "number"), ("a:rule=mix", "rule must be one of"), ("a b:lam=0.1", "row name 'a b'"),
])  # fmt: skip
def test_bad_distillpp_specs_are_refused_quoting_them(spec, message):
    from fewstep.training.evaluation.rows import parse_distillpp

    with pytest.raises(ValueError, match=None) as error:
        parse_distillpp(spec)
    assert message in str(error.value) and repr(spec) in str(error.value)


# ------------------------------------------------------------------------------------------ fewstep eval --prompts
def test_an_identical_student_and_teacher_score_alike(teacher, prompts_file, metric_models, tmp_path, capsys):
    """A LoRA whose update is zero, sampled with DDIM at the teacher's 4 timesteps, and the teacher at 4 DDIM steps,
    CFG 1: the same images, so FD 0 in both feature spaces, precision and recall 1, equal CLIP scores."""
    run = student_run(tmp_path / "run", teacher, {"timesteps": [999, 749, 499, 249], "sampler": "ddim"}, zero=True)
    out = tmp_path / "eval"
    argv = eval_argv(teacher, prompts_file, metric_models, out, "--lora", str(run), "--teacher-steps", "4",
                     "--teacher-cfg", "1", "--images-per-prompt", "3")  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "metrics.json").read_text())
    teacher_row, student = result["rows"]["teacher_4"], result["rows"]["student"]
    assert student["fd"] == pytest.approx(0, abs=1e-6) and student["fd_clip"] == pytest.approx(0, abs=1e-6)
    assert student["precision"] == student["recall"] == student["coverage"] == 1.0
    assert student["clip_score"] == pytest.approx(teacher_row["clip_score"], abs=1e-6)
    assert teacher_row["fd"] is None and student["images"] == teacher_row["images"] == 6


def test_eval_report_for_a_student_with_distillpp_and_real_images(teacher, prompts_file, metric_models, images,
                                                                  tmp_path, capsys):  # fmt: skip
    run = student_run(tmp_path / "run", teacher, {"timesteps": [999, 499], "sampler": "few_step"})
    out = tmp_path / "eval"
    argv = eval_argv(teacher, prompts_file, metric_models, out, "--lora", str(run), "--teacher-steps", "2",
                     "--distillpp", "pp:lam=0.1,steps=1", "--images", str(images), "--json", str(tmp_path / "e.json"))
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "metrics.json").read_text())
    assert list(result["rows"]) == ["teacher_2", "student", "pp", "pp_control"]
    assert json.loads((tmp_path / "e.json").read_text()) == result
    student = result["rows"]["student"]
    for key in ("fd", "fd_clip", "fd_real", "fd_clip_real", "clip_score", "precision", "recall", "density",
                "coverage", "seconds_per_image", "precision_real"):  # fmt: skip
        assert isinstance(student[key], float), key
    assert result["rows"]["teacher_2"]["fd_real"] > 0 and result["settings"]["real_images"]["count"] == 3
    assert result["settings"]["teacher_cfg"] == 1.75  # the run's distillation CFG
    assert result["prompts"] == PROMPTS and "student, timesteps [999, 499]" in result["titles"]["student"]
    assert "FD_DINOv2 ↓" in printed and "pp_control" in printed and "CLIP score ↑" in printed
    page = (out / "report.html").read_text()
    assert all(prompt in page for prompt in PROMPTS) and "data:image/png;base64," in page
    assert "teacher, 2 DDIM steps, CFG 1.75" in page and "eps_mix λ=0.1 on 1 step(s)" in page
    from PIL import Image

    with Image.open(out / "report.png") as grid:
        assert grid.width > 4 * 32 and grid.height > 2 * 32


def test_a_missing_or_uncached_metric_model_is_one_line(teacher, prompts_file, metric_models, tmp_path, capsys):
    missing = eval_argv(teacher, prompts_file, (tmp_path / "no-dinov2", metric_models[1]), tmp_path / "out")
    uncached = eval_argv(teacher, prompts_file, metric_models, tmp_path / "out")
    uncached[uncached.index("--clip-model") + 1] = "fewstep-tests/no-such-clip"
    for argv, option in ((missing, "--metric-model"), (uncached, "--clip-model")):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and option in err and "pass a" in err, err


def test_options_of_the_other_mode_are_refused(prompts_file, capsys):
    assert main(["eval", "--prompts", str(prompts_file), "--n", "10"]) == 2
    assert "--n is for the digits yardstick" in capsys.readouterr().err
    assert main(["eval", "--images-per-prompt", "2"]) == 2
    assert "--images-per-prompt is for --prompts FILE" in capsys.readouterr().err


def test_an_sdxl_teacher_and_student(scorer):
    """The SDXL path (pooled embeddings, micro-conditioning) through the library, on an in-memory tiny SDXL."""
    from fake_runs import add_random_lora

    from fewstep.training.evaluation.rows import STUDENT_ADAPTER, SDModels, StudentRow, TeacherRow, distillpp_rows
    from fewstep.training.evaluation.rows import DistillppSpec
    from fewstep.training.evaluation.scoring import evaluate
    from fewstep.training.teacher.tiny_models import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline()
    add_random_lora(pipe.unet, adapter_name=STUDENT_ADAPTER)
    student = StudentRow((999,))
    rows = [TeacherRow(2, 3.0), student, *distillpp_rows([DistillppSpec(lam=0.2, guided_steps=1)], student)]
    evaluation = evaluate(SDModels(pipe, "sdxl", 32), rows, PROMPTS, scorer, images_per_prompt=1, progress=False)
    result = evaluation.result
    assert list(result["rows"]) == ["teacher_2", "student", "distillpp", "distillpp_control"]
    assert result["rows"]["student"]["fd"] > 0 and result["settings"]["family"] == "sdxl"
    assert sorted(evaluation.thumbnails["student"]) == [0, 1]


# ------------------------------------------------------------------------------------------ fewstep train --eval-every
def test_train_logs_the_eval_metrics_and_the_model_card_shows_the_final_table(teacher, prompts, metric_models,
                                                                              tmp_path, capsys):  # fmt: skip
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fewstep.training.publish.hub import build_upload_folder

    run = tmp_path / "run"
    argv = ["train", "--teacher", str(teacher), "--output", str(run), "--prompts", str(prompts), "--max-steps", "3",
            "--gen-rank", "4", "--fake-rank", "4", "--dfake-gen-update-ratio", "2", "--checkpoint-every", "0",
            "--warmup-steps", "1", "--validate-every", "0", "--report-to", "tensorboard", "--eval-every", "2",
            "--eval-prompts", str(prompts), "--eval-teacher-steps", "2", "--eval-metric-model", str(metric_models[0]),
            "--eval-clip-model", str(metric_models[1])]  # fmt: skip
    assert main(argv) == 0
    scalars = EventAccumulator(str(run / "logs" / "fewstep"), size_guidance={"scalars": 0}).Reload().Tags()["scalars"]
    for key in ("fd", "fd_clip", "clip_score", "precision", "recall", "density", "coverage", "seconds_per_image"):
        assert f"eval/student/{key}" in scalars, key
    assert "eval/teacher_2/clip_score" in scalars and "eval/teacher_2/fd" not in scalars
    logged = EventAccumulator(str(run / "logs" / "fewstep")).Reload().Scalars("eval/student/fd")
    steps = [event.step for event in logged]
    assert steps == [2, 3]  # every --eval-every, and the final LoRA
    result = json.loads((run / "eval" / "metrics.json").read_text())
    assert result["settings"]["step"] == 3 and result["settings"]["prompts"] == 3
    assert (run / "eval" / "report.html").is_file() and (run / "eval" / "report.png").is_file()
    folder = build_upload_folder(run, "alice/student", tmp_path / "upload", base_model="owner/base")
    card = (folder / "README.md").read_text()
    assert "| row | FD_DINOv2 ↓ | FD_CLIP ↓ | CLIP score ↑ |" in card and "| student | " in card
    published = json.loads((folder / "metrics.json").read_text())
    assert published["rows"] == result["rows"] and str(tmp_path) not in json.dumps(published)


def test_eval_every_without_prompts_is_refused_up_front(teacher, prompts, tmp_path, capsys):
    argv = ["train", "--teacher", str(teacher), "--output", str(tmp_path / "run"), "--prompts", str(prompts),
            "--eval-every", "2"]  # fmt: skip
    assert main(argv) == 2
    assert "--eval-every needs --eval-prompts FILE" in capsys.readouterr().err


def test_bench_eval_times_every_row_on_the_tiny_architecture(tmp_path, capsys):
    argv = ["bench", "eval", "--architecture", "tiny", "--metric-models", "tiny", "--prompts", "2",
            "--images-per-prompt", "1", "--teacher-steps", "2", "--json", str(tmp_path / "bench.json")]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert list(result["seconds_per_image"]) == ["teacher_2", "student", "distillpp", "distillpp_control"]
    assert all(seconds > 0 for seconds in result["seconds_per_image"].values())
    assert result["metric_models_seconds_per_image"] > 0 and "distillpp_control" in capsys.readouterr().out
    assert main(["bench", "eval", "--prompts", "1", "--images-per-prompt", "1"]) == 2
