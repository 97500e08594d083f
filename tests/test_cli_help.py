"""`svfseg --help` and `svfseg COMMAND --help` for every command: exit 0, help printed, no traceback.

argparse %-formats every help string (``help % params``), so a bare ``%`` in one (``95% intervals``)
crashes only when that help is printed. The commands are discovered from the parser itself, so a
command added later is checked without editing this file.
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

import svfseg
from svfseg.cli import COMMANDS, build_parser, main


def _command_paths(parser, prefix=()):
    """Every (sub)command path of the parser tree, nested subcommands included: ('prepare',), ..."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from _command_paths(sub, prefix + (name,))


COMMAND_PATHS = sorted(set(_command_paths(build_parser())))


def test_every_command_is_discovered():
    # The discovery must find the commands main() dispatches, or the help tests below check nothing.
    assert {path[0] for path in COMMAND_PATHS} == set(COMMANDS)


def _help_exit(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_top_level_help(capsys):
    code, out, err = _help_exit(["--help"], capsys)
    assert code == 0, err
    assert out.startswith("usage: svfseg") and "Traceback" not in out + err
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=" ".join)
def test_command_help(path, capsys):
    code, out, err = _help_exit([*path, "--help"], capsys)
    assert code == 0, err
    assert out.startswith(f"usage: svfseg {' '.join(path)}") and "Traceback" not in out + err


def test_python_m_svfseg_help_in_a_subprocess():
    # What a new user types first, through the real interpreter start (no pytest capture, no in-process state).
    src = str(Path(svfseg.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "svfseg", "--help"], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: svfseg") and "Traceback" not in proc.stdout + proc.stderr
