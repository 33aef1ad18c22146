"""The README's `study ...` command lines parse: every sub-command, flag and choice they show exists (the
guide: the README's commands are always the truth). Optional parts in [brackets] are parsed too."""
from __future__ import annotations

import re
import shlex

import pytest

from study.cli import build_parser
from conftest import REPO


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("study ")]


def test_the_readme_shows_study_commands():
    names = {shlex.split(c)[1] for c in readme_commands()}
    assert {"bench", "train", "launch", "status", "collect", "report", "eval", "score"} <= names


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_parses(line):
    argv = shlex.split(line.replace("[", "").replace("]", ""))[1:]
    build_parser().parse_args(argv)  # argparse exits (SystemExit) on an unknown flag or a bad choice
