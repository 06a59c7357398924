"""The command line: a thin router that imports only the command it runs, and reports only user errors."""

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import densenet
from densenet import cli
from densenet.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["--help"], ["list"], ["bench", "--help"], ["--version"]])
def test_help_list_and_version_do_not_import_torch(argv):
    """What makes `densenet --help` and `densenet list` answer at once: no torch (seconds to import)."""
    done = _python(textwrap.dedent(f"""
        import sys
        from densenet.cli import main
        try:
            main({argv!r})
        except SystemExit:
            pass
        loaded = sorted(m for m in ('torch', 'numpy', 'torchvision') if m in sys.modules)
        assert not loaded, loaded
        """))
    assert done.returncode == 0, done.stderr


@pytest.mark.slow  # starts a process
def test_a_command_imports_its_own_module_only():
    done = _python(textwrap.dedent("""
        import sys
        from densenet.cli import build_parser
        build_parser(['bench', 'memory'])
        assert 'densenet.bench.memory' in sys.modules
        assert not {'densenet.bench.speed', 'densenet.commands.train'} & set(sys.modules)
        """))
    assert done.returncode == 0, done.stderr


def test_version_is_the_packages(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"densenet {version}" == f"densenet {densenet.__version__}"


def test_every_command_has_help(capsys):
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            cli.main([name, "--help"])
        assert exit_.value.code == 0
        assert f"usage: densenet {name}" in capsys.readouterr().out


def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(capsys, monkeypatch):
    def bad_config(args):
        raise ConfigError("depth 41 is not 3n+4\nsecond line")

    def bug(args):
        raise ValueError("a bug of ours")

    from densenet.commands import models as commands

    monkeypatch.setattr(commands, "run_list", bad_config)
    assert cli.main(["list"]) == 2
    assert capsys.readouterr().err == "densenet list: error: depth 41 is not 3n+4\n"
    monkeypatch.setattr(commands, "run_list", bug)
    with pytest.raises(ValueError, match="a bug of ours"):
        cli.main(["list"])


def test_no_command_prints_the_commands(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)
