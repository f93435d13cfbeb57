"""A method is one class plus one registry entry: a method registered from outside fewstep's files shows up in
``fewstep train --help`` with its own options and trains through ``fewstep train --method KEY``."""

import json
from dataclasses import dataclass, field

import pytest

from fewstep.cli import main
from fewstep.training.methods import get_method, method_names, register_method, unregister_method
from fewstep.training.methods.base import Method
from fewstep.training.methods.dmd2 import DMD2, DMD2TrainConfig

KEY = "toy-dmd2"


@dataclass
class ToyConfig(DMD2TrainConfig):
    """DMD2's options plus one of the toy's own."""

    toy_label: str = field(default="toy", metadata={"help": "a word the toy method writes to RUN_DIR/toy-label"})


class ToyDMD2(DMD2):
    """DMD2 under another key, with an option of its own that reaches its ``build``."""

    key = KEY
    name = "Toy"
    title = "Toy DMD2"
    paper = "Toy DMD2 (a test's own method)"
    summary = "Toy DMD2: DMD2 registered by tests/test_method_registry.py, with one option of its own."
    config_class = ToyConfig

    def build(self, ctx):
        (ctx.run_dir / "toy-label").write_text(ctx.config.toy_label)
        return super().build(ctx)


@pytest.fixture
def toy_method():
    register_method(ToyDMD2)
    yield ToyDMD2
    unregister_method(KEY)


def test_the_built_in_methods_are_registered_in_order():
    assert method_names()[:3] == ("dmd2", "dmd", "progressive")
    assert [get_method(name).title for name in method_names()[:3]] == ["DMD2", "DMD", "Progressive Distillation"]


def test_a_key_is_registered_once_and_only_methods_are(toy_method):
    with pytest.raises(ValueError, match="already registered"):
        register_method(ToyDMD2)
    with pytest.raises(TypeError, match="subclass"):
        register_method(object)
    assert issubclass(toy_method, Method) and method_names()[-1] == KEY


def test_a_registered_method_is_in_train_help_with_its_own_option_group(toy_method, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert f"{{dmd2,dmd,progressive,{KEY}}}" in out  # the --method choices
    assert f"  {KEY:<13}{ToyDMD2.summary}" in out  # the methods list of the description
    own_group = out.split(f"\n{KEY} only:\n")[1]
    assert own_group.lstrip().startswith("--toy-label TOY_LABEL")
    assert "\ndmd2, dmd and toy-dmd2 (DMD defaults:" in out  # DMD2's options are the toy's too


def test_a_registered_method_is_unknown_once_unregistered(capsys):
    register_method(ToyDMD2)
    unregister_method(KEY)
    assert KEY not in method_names()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert KEY not in capsys.readouterr().out


def test_a_registered_method_trains_from_the_command_line(toy_method, teacher, prompts, tmp_path, capsys):
    run = tmp_path / "run"
    code = main([
        "train", "--method", KEY, "--toy-label", "hello", "--teacher", str(teacher), "--prompts", str(prompts),
        "--output", str(run), "--max-steps", "2", "--gen-rank", "4", "--fake-rank", "4", "--dfake-gen-update-ratio",
        "2", "--warmup-steps", "1", "--lr", "1e-3", "--checkpoint-every", "2", "--validate-every", "0",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert (run / "method").read_text().strip() == KEY
    assert (run / "toy-label").read_text() == "hello"
    for name in ("pytorch_lora_weights.safetensors", "fewstep_comfyui.safetensors"):
        assert (run / "lora" / name).is_file()
    assert json.loads((run / "lora" / "fewstep_recipe.json").read_text())["method"] == KEY
    # Another method's option is refused, naming the methods that have it.
    assert main(["train", "--method", "dmd", "--toy-label", "x", "--output", str(tmp_path / "other")]) == 2
    assert f"--toy-label is an option of --method {KEY}, not of --method dmd" in capsys.readouterr().err
