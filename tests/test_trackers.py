"""``--report-to``: TensorBoard event files with the losses, learning rates and validation grids; none; wandb
offline into the run (through a stand-in package) and refused in one line when it is not installed."""

import importlib.util
import sys

import pytest

from fewstep.cli import main

TRAIN = ["--max-steps", "2", "--gen-rank", "4", "--fake-rank", "4", "--dfake-gen-update-ratio", "2",
         "--checkpoint-every", "0", "--warmup-steps", "1"]  # fmt: skip


def train(teacher, prompts, run, *extra):
    return main(["train", "--teacher", str(teacher), "--output", str(run), "--prompts", str(prompts), *TRAIN, *extra])


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_report_to_tensorboard_writes_losses_learning_rates_and_grids(teacher, prompts, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert train(teacher, prompts, tmp_path / "run", "--report-to", "tensorboard", "--validate-every", "2") == 0
    logs = tmp_path / "run" / "logs" / "fewstep"  # (the config, as hparams, is in a sub-folder of its own)
    assert list(logs.glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(logs), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(accumulator.Tags()["scalars"])
    assert {"train/loss_dm", "train/loss_fake", "lr/generator", "lr/fake_score"} <= scalars
    assert [event.step for event in accumulator.Scalars("train/loss_fake")] == [1, 2]
    assert "validation/student" in " ".join(accumulator.Tags()["images"])


def test_report_to_none_writes_no_logs(teacher, prompts, tmp_path, capsys):
    assert train(teacher, prompts, tmp_path / "run", "--report-to", "none", "--validate-every", "0") == 0
    assert not (tmp_path / "run" / "logs").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_report_to_wandb_without_wandb_is_one_line(teacher, prompts, tmp_path, capsys):
    capsys.readouterr()
    assert train(teacher, prompts, tmp_path / "run", "--report-to", "wandb") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--report-to wandb needs wandb: pip install wandb" in err


def fake_wandb():
    """A stand-in for the wandb package (not installed here): records what accelerate's WandBTracker sends."""
    import importlib.machinery
    import types

    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.calls = {"init": [], "log": [], "config": []}

    class Run:
        def log(self, values, step=None):
            module.calls["log"].append((step, values))

        def finish(self):
            pass

    def init(**kwargs):
        module.calls["init"].append(kwargs)
        return Run()

    module.init = init
    module.config = types.SimpleNamespace(update=lambda values, **kw: module.calls["config"].append(values))
    module.Image = lambda image: ("Image", tuple(image.shape))
    return module


def test_report_to_wandb_logs_offline_into_the_run_unless_logged_in(teacher, prompts, tmp_path, monkeypatch, capsys):
    wandb = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert train(teacher, prompts, tmp_path / "run", "--report-to", "wandb", "--validate-every", "2") == 0
    (init,) = wandb.calls["init"]
    assert init["mode"] == "offline" and init["dir"] == str(tmp_path / "run" / "logs")
    assert "wandb logs offline" in capsys.readouterr().out
    assert wandb.calls["config"][0]["report_to"] == "wandb"
    logged = {key for _, values in wandb.calls["log"] for key in values}
    assert {"train/loss_fake", "lr/generator", "lr/fake_score", "validation/student"} <= logged
