"""The public Python API: one function per command, named so that no submodule import replaces
it, and the README's example runs as written."""

import importlib
import json
import re
from pathlib import Path

import capa_export as ce

ROOT = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_every_command_has_a_function_that_submodules_do_not_shadow():
    for module in ("capa_export.export", "capa_export.validate", "capa_export.analysis", "capa_export.pipeline",
                   "capa_export.runtime", "capa_export.api"):
        importlib.import_module(module)  # importing a submodule sets a package attribute of its name
    for name in ("analyze", "calibrate", "generate", "export_onnx", "build", "validate_engine"):
        assert callable(getattr(ce, name)) and getattr(ce, name).__module__ == "capa_export.api", name
    assert ce.CapaEngine.__name__ == "CapaEngine" and set(ce.__all__) <= set(dir(ce)) | {"CapaEngine"}


def test_the_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(readme_example(), "README.md (Python API)", "exec"), namespace)
    answer, report = namespace["answer"], namespace["report"]
    assert report["passed"] and (tmp_path / "engines/api-demo/revalidation.json").is_file()
    assert len(answer.keep_indices) == 32 and answer.tokens
    analysis = json.loads((namespace["folder"] / "report.json").read_text())
    manifest = json.loads((tmp_path / "engines/api-demo/manifest.json").read_text())
    assert manifest["capa_config"]["prune"] == [[analysis["suggested"]["prune_layer"], 32]]
