"""The ``fewstep`` command line: help, version, every documented subcommand, one-line errors."""

import subprocess
import sys

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
