"""Every command of the README's first session runs, in order, as a newcomer would type it (in a
fresh working directory, on the embedded model), and says what the README says it does."""

import json
import re
import shlex
from pathlib import Path

from capa_export.cli import main

ROOT = Path(__file__).resolve().parent.parent


def first_session() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"### A first session, command by command\n\n```bash\n(.*?)```", readme, flags=re.S).group(1)
    commands = [shlex.split(line) for line in block.splitlines() if line.strip()]
    assert commands and all(c[0] == "capa-export" for c in commands)
    return [c[1:] for c in commands]


def test_every_first_session_command_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in first_session():
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0, f"`capa-export {shlex.join(argv)}` exited {code}: {err[-400:]}"
        if argv[0] == "build":
            assert "validation PASSED" in out
            analysis = json.loads((tmp_path / "out/analysis/report.json").read_text())
            manifest = json.loads((tmp_path / "engines/first/manifest.json").read_text())
            keep = int(argv[argv.index("--keep") + 1])
            assert manifest["capa_config"]["prune"] == [[analysis["suggested"]["prune_layer"], keep]]
        if argv[0] == "validate":
            assert (tmp_path / "engines/first/revalidation.json").is_file()
    assert (tmp_path / "keys").is_dir()
