"""The ``fewstep`` command line: help, version, every documented subcommand, one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from fewstep import __version__
from fewstep.cli import main

SUBCOMMANDS = ["demo", "train", "export", "sample", "push", "teacher", "eval", "bench"]


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"fewstep {__version__}"


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0 and "usage: fewstep " + name in capsys.readouterr().out


def test_console_script_runs_without_heavy_imports():
    code = "import sys, fewstep.cli; fewstep.cli.build_parser(); print('diffusers' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_import_fewstep_is_cheap():
    code = "import sys, fewstep; print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'comfy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------ bad input, every command
def _bad_inputs(tmp: Path, base: Path, run: Path) -> dict[str, list[list[str]]]:
    """Mistakes a new user makes, per subcommand (each fails before any long computation starts)."""
    a_file, a_dir, empty_dir = tmp / "a_file", tmp / "a_dir", tmp / "empty"
    a_file.write_text("x")
    a_dir.mkdir()
    empty_dir.mkdir()
    bad_yaml, typed_yaml, binary = tmp / "bad.yaml", tmp / "typed.yaml", tmp / "binary.txt"
    bad_yaml.write_text("lr: [1e-3\n")
    typed_yaml.write_text("lr: fast\n")
    binary.write_bytes(bytes(range(256)))
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (corrupt / "0.txt").write_text("a cat")
    prompts = tmp / "prompts.txt"
    prompts.write_text("a cat\n")
    train = ["train", "--teacher", str(base), "--prompts", str(prompts), "--output", str(tmp / "run")]
    return {
        "demo": [["demo", "--out", str(a_file)], ["demo", "--num-steps", "0"], ["demo", "--seed", "one"]],
        "train": [
            ["train", "--batch-size", "0"], ["train", "--timesteps", ","], ["train", "--timesteps", "a"],
            ["train", "--lr", "fast"], ["train", "--resolution", "-32"], ["train", "--max-steps", "0"],
            ["train", "--config", str(bad_yaml)], ["train", "--config", str(typed_yaml)],
            ["train", "--config", str(tmp / "missing.yaml")], ["train", "--output", str(empty_dir), "--resume"],
            ["train", "--resume"], ["train", "--output", str(run), "--resume", "--overwrite"],
            [*train, "--checkpoints-total-limit", "0"], [*train[:2], str(a_file), *train[3:]],
            ["train", "--teacher", str(base), "--prompts", str(binary), "--output", str(tmp / "run")],
            ["train", "--teacher", str(base), "--prompts", str(a_dir), "--output", str(tmp / "run")],
            [*train, "--images", str(corrupt)], [*train, "--images", str(a_file)],
            [*train[:-2], "--output", str(a_file)],
            ["train", "--teacher", str(base), "--output", str(tmp / "run")], [*train, "--timesteps", "499,999"],
            ["train", "--method", "dmd"],
        ],
        "export": [
            ["export", str(tmp / "missing")], ["export", str(empty_dir)], ["export", str(run), "--checkpoint", "99"],
            ["export", str(run), "--format", "kohya"], ["export", str(run), "--out", str(a_file)],
        ],
        "sample": [
            ["sample", "--lora", str(tmp / "missing"), "--prompt", "a cat"], ["sample", "--prompt", "a cat"],
            ["sample", "--lora", str(run), "--prompt", "a cat", "--steps", "0"],
            ["sample", "--lora", str(run), "--prompt", "a cat", "--timesteps", ","],
            ["sample", "--lora", str(run), "--prompt", "a cat", "--out", str(a_file)],
            ["sample", "--lora", str(run), "--prompt", "a cat", "--num-images", "0"],
            ["sample", "--lora", str(run), "--prompt", "a cat", "--teacher", str(a_file)],
        ],
        "push": [
            ["push", str(run), "--repo-id", "no-owner", "--dry-run"],
            ["push", str(tmp / "missing"), "--repo-id", "a/b"],
            ["push", str(run), "--repo-id", "a/b", "--base-model", "a/b", "--dry-run", "--folder", str(a_file)],
            ["push", str(run), "--repo-id", "a/b", "--base-model", "a/b", "--folder", str(a_dir)],
            ["push", str(run), "--repo-id", "a/b", "--base-model", "a/b"],  # HF_HUB_OFFLINE in the tests
            ["push", str(run)],
        ],
        "teacher": [
            ["teacher"], ["teacher", "digits", "--config", str(bad_yaml)], ["teacher", "digits", "--out", str(a_file)],
            ["teacher", "digits", "--config", str(typed_yaml)], ["teacher", "digits", "--seed", "x"],
        ],
        "eval": [
            ["eval", "--n", "7"], ["eval", "--json", str(a_dir)], ["eval", "--n", "ten"],
            ["eval", "--prompts", str(tmp / "missing.txt")], ["eval", "--prompts", str(prompts)],  # 1 image only
            ["eval", "--prompts", str(prompts), "--images-per-prompt", "2", "--teacher-steps", "0"],
            ["eval", "--prompts", str(prompts), "--images-per-prompt", "2", "--distillpp", "a:lam=9", "--lora", str(run)],
            ["eval", "--prompts", str(prompts), "--images-per-prompt", "2", "--distillpp", "a:lam=0.1"],  # no --lora
            ["eval", "--prompts", str(prompts), "--images-per-prompt", "2", "--images", str(empty_dir)],
            ["eval", "--prompts", str(prompts), "--images-per-prompt", "2", "--lora", str(run), "--out", str(a_file)],
            ["eval", "--prompts", str(prompts), "--images-per-prompt", "2", "--lora", str(run),
             "--metric-model", str(tmp / "no-model")],
            ["eval", "--images-per-prompt", "2"], ["eval", "--prompts", str(prompts), "--n", "10"],
        ],
        "bench": [["bench"], ["bench", "nope"], ["bench", "inference", "--resolution", "7"]],
    }  # fmt: skip


def test_no_command_answers_bad_input_with_a_traceback(bases, runs, tmp_path, capsys):
    """Every subcommand, on each mistake: one line on stderr, a non-zero exit status, no traceback."""
    cases = _bad_inputs(tmp_path, bases["sd15"], runs["sd15"])
    assert set(cases) == set(SUBCOMMANDS)
    for name, argvs in cases.items():
        for argv in argvs:
            capsys.readouterr()
            try:
                code = main(argv)
            except SystemExit as exit_info:  # argparse
                code = exit_info.code
            err = capsys.readouterr().err.strip()
            assert code not in (0, None) and len(err.splitlines()) == 1, (argv, code, err)
            assert err.startswith(f"fewstep {name}") and "Traceback" not in err, (argv, err)


def test_transformers_torchvision_hint_is_dropped_and_other_warnings_kept(caplog):
    """transformers suggests installing torchvision when diffusers loads; with the CPU torch build that breaks."""
    import logging

    from fewstep.cli import quiet_torchvision_hint

    quiet_torchvision_hint()
    quiet_torchvision_hint()  # idempotent: main() runs it on every call
    logger = logging.getLogger("transformers.utils.import_utils")
    assert sum(type(f).__name__ == "_NoTorchvisionHint" for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to ...")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
