"""The README cannot rot: every command and option it shows exists in the CLI, and the two
Makefile targets it names are the ones CI and newcomers use."""

import re
from pathlib import Path

from capa_export.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def subcommand_options():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    return {name: {s for action in sub._actions for s in action.option_strings} for name, sub in subparsers.items()}


def test_every_cli_command_and_option_in_the_readme_exists():
    known = subcommand_options()
    readme = (ROOT / "README.md").read_text()
    shown = re.findall(r"^capa-export ([\w-]+)(.*)$", readme, flags=re.M)
    assert {name for name, _ in shown} >= {"analyze", "calibrate", "export", "build", "validate", "run"}
    current = None
    for line in readme.splitlines():
        match = re.match(r"^capa-export ([\w-]+)(.*)$", line)
        if match:
            current = match.group(1)
            assert current in known, f"README shows `capa-export {current}`, which does not exist"
        elif not line.startswith(" " * 10):
            current = None
        if current:
            for option in re.findall(r"(--[a-z][a-z0-9-]*)", line):
                assert option in known[current], f"README shows {option} for `{current}`, which it does not take"


def test_readme_commands_are_the_makefile_targets_ci_runs():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "make demo" in readme and "make test" in readme
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
