"""Typed configs: CLI and YAML values are typed and checked at the boundary, before any model loads."""

import argparse

import pytest

from fewstep.cli import build_parser, main
from fewstep.training.loop.config import load_yaml
from fewstep.training.methods.dmd2 import DMD2TrainConfig
from fewstep.training.loop.trainer import make_config


def train_error(capsys, *argv):
    """``fewstep train ARGV`` fails with one line on stderr and a non-zero status; returns that line."""
    capsys.readouterr()
    try:
        code = main(["train", *argv])
    except SystemExit as exit_info:  # argparse
        code = exit_info.code
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------------ YAML
def test_yaml_scientific_notation_is_read_as_a_number(tmp_path):
    """PyYAML reads ``1e-3`` (no dot) as a string; most people write it so."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nmax_steps: 1e3\nema-decay: '0.5'\ntimesteps: 999,499\nbackward_simulation: 'no'\n")
    config = make_config(DMD2TrainConfig, {}, str(path))
    assert config.lr == 0.001 and isinstance(config.lr, float)
    assert config.max_steps == 1000 and isinstance(config.max_steps, int)
    assert config.ema_decay == 0.5 and config.timesteps == [999, 499] and config.backward_simulation is False


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr: fast\n", "lr in {path} must be a number > 0, got 'fast'"),
        ("batch_size: [1, 2]\n", "batch_size in {path} must be an integer ≥ 1, got [1, 2]"),
        ("max_steps: 2.5\n", "max_steps in {path} must be an integer ≥ 1, got 2.5"),
        ("teacher: {a: 1}\n", "teacher in {path} must be text, got {{'a': 1}}"),
        ("gradient_checkpointing: maybe\n", "gradient_checkpointing in {path} must be true or false, got 'maybe'"),
        ("lr:\n", "lr in {path} needs a value"),
        ("mixed_precision: fp8\n", "mixed_precision in {path} must be one of "),
    ],
)
def test_yaml_values_of_the_wrong_type_name_the_option_and_the_file(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        make_config(DMD2TrainConfig, {}, str(path))
    assert str(error.value).startswith(message.format(path=path))


def test_yaml_syntax_error_names_the_file_and_the_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nmax_steps: [1, 2\nseed: 3\n")
    err = train_error(capsys, "--config", str(path))
    assert f"config file {path} is not valid YAML at line" in err


def test_a_binary_or_non_mapping_config_file_is_one_line(tmp_path, capsys):
    binary, listed = tmp_path / "c.yaml", tmp_path / "l.yaml"
    binary.write_bytes(b"\xff\xfe\x00lr")
    listed.write_text("- lr\n- 1\n")
    assert f"config file {binary} is not UTF-8 text" in train_error(capsys, "--config", str(binary))
    assert f"config file {listed} must hold a mapping" in train_error(capsys, "--config", str(listed))
    with pytest.raises(ValueError, match="is a directory"):
        load_yaml(tmp_path)


# ------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "argument --batch-size: must be an integer ≥ 1, got '0'"),
        (["--dfake-gen-update-ratio", "0"], "argument --dfake-gen-update-ratio: must be an integer ≥ 1, got '0'"),
        (["--gradient-accumulation-steps", "0"], "argument --gradient-accumulation-steps: must be an integer ≥ 1"),
        (["--max-steps", "0"], "argument --max-steps: must be an integer ≥ 1, got '0'"),
        (["--resolution", "0"], "argument --resolution: must be an integer ≥ 1, got '0'"),
        (["--resolution", "-32"], "argument --resolution: must be an integer ≥ 1, got '-32'"),
        (["--checkpoints-total-limit", "0"], "argument --checkpoints-total-limit: must be an integer ≥ 1, got '0'"),
        (["--timesteps", ","], "argument --timesteps: needs at least one integer, e.g. 999,499; got ','"),
        (["--timesteps", "a,b"], "argument --timesteps: must be integers ≥ 0 and ≤ 999 separated by commas"),
        (["--lr", "0"], "argument --lr: must be a number > 0, got '0'"),
        (["--lr", "nan"], "argument --lr: must be a number > 0, got 'nan'"),
        (["--ema-decay", "1"], "argument --ema-decay: must be a number ≥ 0 and < 1, got '1'"),
        # The methods' own options (DMD, PD, DMD2's warm start) are typed and checked the same way.
        (["--method", "progressive", "--start-steps", "0"], "argument --start-steps: must be an integer ≥ 1"),
        (["--method", "dmd", "--regression-weight", "-1"], "argument --regression-weight: must be a number ≥ 0"),
        (["--method", "dmd", "--num-pairs", "0"], "argument --num-pairs: must be an integer ≥ 1, got '0'"),
        (["--init-regression-steps", "-2"], "argument --init-regression-steps: must be an integer ≥ 0"),
        (["--method", "dmd", "--regression-loss", "lpips"], "argument --regression-loss: invalid choice: 'lpips'"),
    ],
)
def test_nonsense_option_values_are_refused_with_one_line(capsys, argv, message):
    err = train_error(capsys, *argv)
    assert message in err and "<lambda>" not in err


def test_cli_accepts_scientific_notation():
    args = build_parser().parse_args(["train", "--lr", "5e-5", "--max-steps", "2e3", "--timesteps", "999, 499"])
    assert args.lr == 5e-5 and args.max_steps == 2000 and args.timesteps == [999, 499]


def test_a_config_built_in_code_is_checked_too(tmp_path):
    from fewstep.training.methods.dmd2 import train_dmd2

    config = DMD2TrainConfig(teacher="t", output=str(tmp_path / "r"), prompts="p", checkpoints_total_limit=0)
    with pytest.raises(ValueError, match="checkpoints_total_limit in the DMD2TrainConfig must be an integer ≥ 1"):
        train_dmd2(config)
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------ help
def _all_parsers(parser, prog="fewstep"):
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, f"{prog} {name}")


def test_every_option_of_every_command_has_help_and_no_empty_default():
    for prog, parser in _all_parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{prog} {action.option_strings or action.dest} has no help"
            assert "(default: )" not in action.help, f"{prog} {action.option_strings}: {action.help}"


def test_required_options_say_so():
    parsers = dict(_all_parsers(build_parser()))
    helps = {action.dest: action.help for action in parsers["fewstep train"]._actions}
    assert "required for a new run" in helps["teacher"] and "(required" in helps["output"]
    for prog, parser in parsers.items():
        for action in parser._actions:
            if action.required and action.option_strings:
                assert "required" in action.help, f"{prog} {action.option_strings}: {action.help}"


def test_limits_come_from_field_metadata_so_new_fields_get_them_too():
    from dataclasses import dataclass, field

    from fewstep.training.loop.config import build_config

    @dataclass
    class Options:
        count: int = 1  # no metadata: integers are ≥ 0
        workers: int = field(default=1, metadata={"min": 1})
        rate: float = field(default=0.1, metadata={"above": 0, "below": 1})
        steps: list[int] | None = field(default=None, metadata={"max": 9})

    assert build_config(Options, {"count": "0", "rate": "5e-1", "steps": "9,3"}) == Options(0, 1, 0.5, [9, 3])
    for bad, message in [
        ({"count": -1}, "--count must be an integer ≥ 0, got -1"),
        ({"workers": 0}, "--workers must be an integer ≥ 1, got 0"),
        ({"rate": "1"}, "--rate must be a number > 0 and < 1, got '1'"),
        ({"steps": [10]}, "--steps must be integers ≥ 0 and ≤ 9 separated by commas, got [10]"),
    ]:
        with pytest.raises(ValueError) as error:
            build_config(Options, bad)
        assert str(error.value) == message
