"""The `zoo` command: one entry point whose subcommands are the modules' main(argv), each with --help, and a
clear error for an unknown one; the scripts/ wrappers still run."""
import subprocess
import sys

import pytest

from zoo import cli


def test_every_subcommand_has_help(capsys):
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit) as stop:
            cli.main([name, "--help"])
        assert stop.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: zoo {name} "), (name, out[:80])


def test_no_command_lists_them(capsys):
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"  {name} " in out


def test_unknown_command_is_one_error_line(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: command: unknown 'trian' (did you mean 'train'? known: train, eval,")
    assert err.count("\n") == 1


def test_subcommand_exit_status_passes_through(capsys, tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("model: [1, 2\n")
    assert cli.main(["describe", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {bad}, line 2, column 1: YAML syntax error")


def test_console_script_and_wrapper_run():
    """The installed `zoo` entry point and a kept scripts/ wrapper, as separate processes."""
    zoo_bin = [sys.executable, "-c", "import sys; from zoo.cli import main; sys.exit(main())"]
    out = subprocess.run(zoo_bin + ["describe", "recipes/mamba2.yaml"], capture_output=True, text=True)
    assert out.returncode == 0 and "summary: built 1 recipes" in out.stdout
    out = subprocess.run([sys.executable, "scripts/describe.py", "recipes/mamba2.yaml"], capture_output=True, text=True)
    assert out.returncode == 0 and "summary: built 1 recipes" in out.stdout
