"""Never lose a run: a run directory holds one run, resumes continue that run, signals stop after a checkpoint,
failed writes keep the last good checkpoint, bad data is named before any model loads."""

import errno
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fewstep.cli import main
from fewstep.training.data.cache import MANIFEST
from fewstep.training.teacher import loading as teachers
from fewstep.training.loop.dmd2_loop import DMD2Loop

TINY = [
    "--gen-rank", "4", "--fake-rank", "4", "--dfake-gen-update-ratio", "2", "--warmup-steps", "1", "--lr", "1e-3",
    "--checkpoint-every", "2", "--validate-every", "0",
]  # fmt: skip


def train(capsys, *argv) -> tuple[int, str]:
    """``fewstep train ARGV``: (exit status, stderr)."""
    capsys.readouterr()
    code = main(["train", *argv])
    return code, capsys.readouterr().err


def new_run(capsys, teacher, prompts, run, *extra, max_steps=2) -> None:
    code, err = train(capsys, "--teacher", str(teacher), "--prompts", str(prompts), "--output", str(run),
                      "--max-steps", str(max_steps), *TINY, *extra)  # fmt: skip
    assert code == 0, err


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("fewstep train")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_teacher_load(monkeypatch):
    """Fail the test if a model starts loading: data and options must be checked before."""

    def load_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the input was checked")

    monkeypatch.setattr(teachers, "load_teacher", load_teacher)


# ------------------------------------------------------------------------------------------ one run per directory
def test_a_fresh_start_into_a_run_directory_is_refused_and_leaves_the_run_untouched(capsys, teacher, prompts, tmp_path):
    run = tmp_path / "run"
    new_run(capsys, teacher, prompts, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, err = train(capsys, "--teacher", str(teacher), "--prompts", str(prompts), "--output", str(run), "--lr", "5")
    assert code == 2
    assert f"--output {run} already holds a run" in one_line(err) and "--resume" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_overwrite_replaces_the_old_run_only_once_the_new_one_can_start(capsys, teacher, prompts, tmp_path):
    run = tmp_path / "run"
    new_run(capsys, teacher, prompts, run, max_steps=4)
    code, err = train(capsys, "--teacher", str(tmp_path / "typo"), "--prompts", str(prompts), "--output", str(run),
                      "--overwrite")  # fmt: skip
    assert code == 2 and "does not exist" in one_line(err)
    assert (run / "checkpoints" / "step-0000004").is_dir()  # a failed start deleted nothing
    new_run(capsys, teacher, prompts, run, "--overwrite", max_steps=2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]
    assert yaml.safe_load((run / "config.yaml").read_text())["max_steps"] == 2


def test_a_non_empty_folder_that_holds_no_run_is_never_overwritten(capsys, teacher, prompts, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    code, err = train(capsys, "--teacher", str(teacher), "--prompts", str(prompts), "--output", str(tmp_path),
                      "--overwrite")  # fmt: skip
    assert code == 2 and "is not empty and holds no fewstep run" in one_line(err)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_on_an_empty_directory_says_there_is_no_run(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, err = train(capsys, "--output", str(tmp_path / "empty"), "--resume")
    assert code == 2 and "holds no fewstep run; start a new run without --resume" in one_line(err)
    assert "--teacher" not in err


# ------------------------------------------------------------------------------------------ resume
def test_resume_refuses_options_that_cannot_change(capsys, teacher, prompts, tmp_path):
    run = tmp_path / "run"
    new_run(capsys, teacher, prompts, run)
    code, err = train(capsys, "--output", str(run), "--resume", "--max-steps", "4", "--gen-rank", "8", "--seed", "1")
    line = one_line(err)
    assert code == 2 and "--gen-rank 8 (the run has 4); --seed 1 (the run has 0) cannot change on resume" in line
    assert "--max-steps" in line.split("options that may change:")[1]
    assert not (run / "checkpoints" / "step-0000004").exists()


def test_a_different_teacher_of_the_same_family_cannot_resume_the_run(capsys, teacher, prompts, tmp_path):
    from fewstep.training.teacher.tiny_models import build_tiny_sd15_pipeline, save_tiny_pipeline

    other = save_tiny_pipeline(build_tiny_sd15_pipeline(), tmp_path / "other-sd15")
    run = tmp_path / "run"
    new_run(capsys, teacher, prompts, run)
    code, err = train(capsys, "--output", str(run), "--resume", "--teacher", str(other), "--max-steps", "4")
    assert code == 2 and f"--teacher {other} (the run has {teacher}) cannot change on resume" in one_line(err)
    assert yaml.safe_load((run / "config.yaml").read_text())["teacher"] == str(teacher)
    code, err = train(capsys, "--output", str(run), "--resume", "--teacher", f"{teacher}/", "--max-steps", "4")
    assert code == 0, err  # the same folder, spelled differently


def test_new_learning_rates_on_resume_take_effect_and_are_recorded(capsys, teacher, prompts, tmp_path):
    run = tmp_path / "run"
    new_run(capsys, teacher, prompts, run)
    code, err = train(capsys, "--output", str(run), "--resume", "--max-steps", "4", "--lr", "5e-5", "--fake-lr", "2e-5")
    assert code == 0, err
    state = torch.load(run / "checkpoints" / "step-0000004" / "training_state.pt", weights_only=True)
    for name, lr in (("generator", 5e-5), ("fake_score", 2e-5)):
        assert state[f"{name}_scheduler"]["base_lrs"] == [lr]
        groups = state[f"{name}_optimizer"]["param_groups"]
        assert all(group["initial_lr"] == lr and group["lr"] == pytest.approx(lr) for group in groups)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["lr"] == 5e-5 and saved["fake_lr"] == 2e-5


def test_resuming_a_finished_run_says_how_to_go_on(capsys, teacher, prompts, tmp_path):
    run = tmp_path / "run"
    new_run(capsys, teacher, prompts, run)
    code, err = train(capsys, "--output", str(run), "--resume")
    assert code == 2 and "is already at step 2 (--max-steps 2); give a larger --max-steps" in one_line(err)


def test_a_validation_grid_missed_by_a_kill_is_made_on_resume(capsys, teacher, prompts, tmp_path):
    run = tmp_path / "run"
    new_run(capsys, teacher, prompts, run, "--validate-every", "2")
    grid = run / "samples" / "step-0000002.png"
    made = grid.read_bytes()
    grid.unlink()  # as if killed after checkpoint 2 was written and before its grid
    code, err = train(capsys, "--output", str(run), "--resume", "--max-steps", "4")
    assert code == 0, err
    assert grid.read_bytes() == made  # the same weights, prompts and noise: the same grid
    assert (run / "samples" / "step-0000004.png").is_file()


# ------------------------------------------------------------------------------------------ SIGINT and SIGTERM
@pytest.fixture
def sigterm_guard():
    """Where SIGTERM is not handled it would end pytest itself: make that a test failure instead."""

    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached the default handler")

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield
    signal.signal(signal.SIGTERM, previous)


def signal_during_iteration(monkeypatch, signum, step):
    """Send ``signum`` to this process as iteration ``step`` starts."""
    train_step = DMD2Loop.train_step

    def interrupted_train_step(self, batches):
        if self.step == step - 1:
            os.kill(os.getpid(), signum)
        return train_step(self, batches)

    monkeypatch.setattr(DMD2Loop, "train_step", interrupted_train_step)


def signal_during_checkpoint(monkeypatch, signum, step):
    """Send ``signum`` while checkpoint ``step`` is half written (adapters saved, training state not yet)."""
    save = torch.save

    def interrupted_save(obj, path, *args, **kwargs):
        if f"step-{step:07d}" in str(path):
            os.kill(os.getpid(), signum)
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", interrupted_save)


def checkpoint_contents(checkpoint: Path) -> dict:
    contents = {}
    for path in sorted(checkpoint.iterdir()):
        if path.suffix == ".safetensors":
            contents[path.name] = load_file(path)
        elif path.suffix == ".pt":
            contents[path.name] = torch.load(path, weights_only=True)
        elif path.name == "config.yaml":  # the same options; only the run directory differs
            contents[path.name] = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "output"}
        elif path.name == MANIFEST:  # hashes of the files above, config.yaml (its run directory) included
            continue
        else:
            contents[path.name] = path.read_bytes()
    return contents


def assert_identical(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def signal_run_args(teacher, prompts, images):
    # EMA, gradient accumulation, the GAN and validation grids: every piece of state a resume must restore.
    return [
        "--teacher", str(teacher), "--prompts", str(prompts), "--images", str(images), "--max-steps", "4", *TINY,
        "--ema-decay", "0.5", "--gradient-accumulation-steps", "2", "--validate-every", "2",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(signal_run_args, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(["train", *signal_run_args, "--output", str(run)]) == 0
    return run


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize(
    "when, send, stopped_at",
    [("mid-iteration", signal_during_iteration, 3), ("mid-checkpoint", signal_during_checkpoint, 2)],
)
def test_a_signal_stops_after_a_checkpoint_and_the_resumed_run_is_bit_identical(
    capsys, monkeypatch, sigterm_guard, signal_run_args, uninterrupted, tmp_path, signum, when, send, stopped_at
):
    run = tmp_path / "run"
    with monkeypatch.context() as patches:
        send(patches, signum, stopped_at)
        code, err = train(capsys, *signal_run_args, "--output", str(run))
    assert code == 128 + signum
    last = err.strip().splitlines()[-1]
    assert last == (
        f"fewstep train: stopped by {signal.Signals(signum).name} at step {stopped_at}, checkpoint saved; "
        f"resume with: fewstep train --output {run} --resume"
    )
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints[-1] == f"step-{stopped_at:07d}" and not any(name.endswith(".tmp") for name in checkpoints)
    assert not (run / "lora").exists()

    code, err = train(capsys, "--output", str(run), "--resume")
    assert code == 0, err
    final = "checkpoints/step-0000004"
    assert_identical(checkpoint_contents(run / final), checkpoint_contents(uninterrupted / final), final)
    for name in ("pytorch_lora_weights.safetensors", "fewstep_comfyui.safetensors"):
        assert_identical(load_file(run / "lora" / name), load_file(uninterrupted / "lora" / name), name)
    grids = sorted(p.name for p in (uninterrupted / "samples").iterdir())
    assert all((run / "samples" / g).read_bytes() == (uninterrupted / "samples" / g).read_bytes() for g in grids)


def test_a_signal_during_the_last_iteration_lets_the_run_finish(capsys, monkeypatch, sigterm_guard, teacher, prompts,
                                                                 tmp_path):  # fmt: skip
    signal_during_iteration(monkeypatch, signal.SIGTERM, 2)
    new_run(capsys, teacher, prompts, tmp_path / "run")  # exit status 0: a resume would have nothing to do
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_a_second_signal_stops_at_once(capsys, monkeypatch, teacher, prompts, tmp_path):
    train_step = DMD2Loop.train_step

    def twice_interrupted(self, batches):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(self, batches)

    monkeypatch.setattr(DMD2Loop, "train_step", twice_interrupted)
    code, err = train(capsys, "--teacher", str(teacher), "--prompts", str(prompts), "--output", str(tmp_path / "run"),
                      "--max-steps", "4", *TINY)  # fmt: skip
    assert code == 130 and err.strip().splitlines()[-1] == (
        "fewstep train: stopped at once by a second SIGINT; resume from the last checkpoint"
    )
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000002"]


# ------------------------------------------------------------------------------------------ failed writes
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_good_one(capsys, monkeypatch, teacher,
                                                                                  prompts, tmp_path):  # fmt: skip
    import shutil

    run = tmp_path / "run"
    save, disk_usage = torch.save, shutil.disk_usage

    def full_disk_save(obj, path, *args, **kwargs):
        if "step-0000004" in str(path):  # what torch.save raises when the disk fills up (measured on a tmpfs)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return save(obj, path, *args, **kwargs)

    def full(path):
        return disk_usage(path)._replace(free=0) if str(path).startswith(str(tmp_path)) else disk_usage(path)

    with monkeypatch.context() as patches:
        patches.setattr(torch, "save", full_disk_save)
        patches.setattr(shutil, "disk_usage", full)
        code, err = train(capsys, "--teacher", str(teacher), "--prompts", str(prompts), "--output", str(run),
                          "--max-steps", "4", *TINY)  # fmt: skip
    assert code == 2
    assert one_line(err) == (
        f"fewstep train: error: cannot write {run}: no space left on device; free some space or choose another "
        f"location; the last complete checkpoint is kept: fewstep train --output {run} --resume"
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]
    assert load_file(run / "checkpoints" / "step-0000002" / "generator.safetensors")
    code, err = train(capsys, "--output", str(run), "--resume")
    assert code == 0, err


def unwritable(monkeypatch, root: Path, code: int):
    """Make directories under ``root`` fail to be created with ``code`` (EROFS: read-only; ENOSPC: disk full)."""
    mkdir = Path.mkdir

    def failing_mkdir(self, *args, **kwargs):
        if str(self).startswith(str(root)):
            raise OSError(code, os.strerror(code), str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", failing_mkdir)


@pytest.mark.parametrize(
    "code, fix",
    [
        (errno.EROFS, "read-only file system; choose a writable location"),
        (errno.ENOSPC, "no space left on device; free some space or choose another location"),
    ],
    ids=["read-only", "disk-full"],
)
def test_an_unwritable_output_is_one_line_for_train_sample_export_and_push(capsys, monkeypatch, teacher, prompts,
                                                                           runs, tmp_path, code, fix):  # fmt: skip
    run = tmp_path / "run"
    new_run(capsys, teacher, prompts, run)
    locked = tmp_path / "locked"
    unwritable(monkeypatch, locked, code)
    commands = {
        "train": ["train", "--teacher", str(teacher), "--prompts", str(prompts), "--output", str(locked / "r"), *TINY],
        "sample": ["sample", "--lora", str(run), "--prompt", "a cat", "--out", str(locked / "s")],
        "export": ["export", str(run), "--out", str(locked / "e")],
        "push": ["push", str(runs["sd15"]), "--repo-id", "alice/x", "--base-model", "a/b", "--dry-run", "--folder",
                 str(locked / "p")],
    }  # fmt: skip
    for name, argv in commands.items():
        capsys.readouterr()
        assert main(argv) != 0, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"fewstep {name}: error: cannot write {locked}"), err
        assert fix in err, err


# ------------------------------------------------------------------------------------------ data, before any model
def test_a_corrupt_or_truncated_image_is_named_before_the_teacher_loads(capsys, no_teacher_load, prompts, images,
                                                                        tmp_path):  # fmt: skip
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    whole = (folder / "1.png").read_bytes()
    (folder / "1.png").write_bytes(whole[: len(whole) // 2])
    code, err = train(capsys, "--teacher", "any/teacher", "--prompts", str(prompts), "--images", str(folder),
                      "--output", str(tmp_path / "r"))  # fmt: skip
    assert code == 2 and f"image {folder / '1.png'} cannot be decoded" in one_line(err)
    (folder / "1.png").write_bytes(b"not an image at all")
    code, err = train(capsys, "--teacher", "any/teacher", "--prompts", str(prompts), "--images", str(folder),
                      "--output", str(tmp_path / "r"))  # fmt: skip
    assert code == 2 and f"image {folder / '1.png'} cannot be decoded" in one_line(err)


@pytest.mark.parametrize(
    "lines, message",
    [
        ('{"file_name": "0.png", "text": "a car"}\n\n{"file_name": "1.png", text: "a cat"}\n',
         "metadata.jsonl:3 is not valid JSON"),
        ('{"file_name": "0.png", "text": "a car"}\n["1.png", "a cat"]\n', "metadata.jsonl:2 is not a JSON object"),
    ],
)  # fmt: skip
def test_an_invalid_metadata_line_names_the_file_and_the_line(capsys, no_teacher_load, prompts, images, tmp_path,
                                                              lines, message):  # fmt: skip
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    (folder / "metadata.jsonl").write_text(lines)
    code, err = train(capsys, "--teacher", "any/teacher", "--prompts", str(prompts), "--images", str(folder),
                      "--output", str(tmp_path / "r"))  # fmt: skip
    assert code == 2 and f"{folder / message}" in one_line(err)


def test_a_binary_prompts_file_is_named(capsys, no_teacher_load, tmp_path):
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(bytes(range(256)))
    code, err = train(capsys, "--teacher", "any/teacher", "--prompts", str(binary), "--output", str(tmp_path / "r"))
    assert code == 2 and f"prompts file {binary} is not UTF-8 text" in one_line(err)


def test_a_teacher_path_that_is_a_file_says_so(capsys, prompts, tmp_path):
    file = tmp_path / "model.json"  # not a checkpoint file name: a folder or Hub id was meant
    file.write_bytes(b"{}")
    code, err = train(capsys, "--teacher", str(file), "--prompts", str(prompts), "--output", str(tmp_path / "r"))
    assert code == 2 and f"teacher {file} is a file; give the diffusers pipeline folder" in one_line(err)
