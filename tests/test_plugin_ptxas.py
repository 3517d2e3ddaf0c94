"""`make cuda-check`'s spill gate (plugins/contrib_topk/ptxas_report.py) on real ptxas output.

`make cuda-check` (CI) shows the gate passing on the shipped kernels; this shows it can fail: the
contrib kernel compiled for sm_90 with its former launch bounds spills and must be rejected, and
every kernel instantiation must appear in the report. Needs nvcc only (no GPU).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OP_DIR = REPO / "plugins" / "contrib_topk"


def _report_module():
    spec = importlib.util.spec_from_file_location("ptxas_report", OP_DIR / "ptxas_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_spill_gate_rejects_a_spilling_contrib_kernel(tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH (the CUDA toolkit compiles the kernels for this check)")
    # The contrib kernel's launch bounds before the fix, __launch_bounds__(kThreads): ptxas then
    # caps it at 64 registers and spills its accumulators on sm_90 (-maxrregcount cannot force a
    # spill: launch bounds override it). The gate must catch exactly that regression.
    source = (OP_DIR / "contrib_topk_kernels.cu").read_text()
    fixed = "__launch_bounds__(kThreads, 1) contrib_scores_kernel("
    assert fixed in source
    regressed = tmp_path / "contrib_topk_kernels.cu"
    regressed.write_text(source.replace(fixed, "__launch_bounds__(kThreads) contrib_scores_kernel("))
    done = subprocess.run(
        [nvcc, "-std=c++17", "-O3", "-gencode=arch=compute_90,code=sm_90", "--resource-usage", f"-I{OP_DIR}",
         "-c", str(regressed), "-o", str(tmp_path / "kernels.o")],
        capture_output=True, text=True, check=True,
    )
    log = tmp_path / "ptxas.log"
    log.write_text(done.stdout + done.stderr)

    kernels = _report_module().parse(log.read_text())
    names = {k.name for k in kernels}
    dtypes = ("float", "__half", "__nv_bfloat16")
    expected = {f"contrib_scores_kernel<{t}, {jt}>" for t in dtypes for jt in (1, 2, 4, 8)}
    expected |= {f"value_norms_kernel<{t}>" for t in dtypes} | {f"weighted_attention_kernel<{t}>" for t in dtypes}
    expected |= {f"gram_form_kernel<{t}>" for t in dtypes[1:]} | {f"gram_quad_kernel<{t}>" for t in dtypes[1:]}
    expected |= {"topk_kernel"}
    if not shutil.which("c++filt"):
        pytest.skip("c++filt not on PATH: kernel names stay mangled")
    assert names == expected
    assert all(k.registers > 0 for k in kernels)

    gate = subprocess.run(
        [sys.executable, str(OP_DIR / "ptxas_report.py"), str(log), "--no-spill", "contrib_scores_kernel"],
        capture_output=True, text=True,
    )
    assert gate.returncode == 1
    assert "FAIL: contrib_scores_kernel" in gate.stderr and "spills on sm_90" in gate.stderr


def test_spill_gate_fails_when_the_log_has_no_kernel(tmp_path: Path) -> None:
    log = tmp_path / "empty.log"
    log.write_text("[1/2] Building CUDA object ...\n")
    gate = subprocess.run(
        [sys.executable, str(OP_DIR / "ptxas_report.py"), str(log), "--no-spill", "contrib_scores_kernel"],
        capture_output=True, text=True,
    )
    assert gate.returncode == 1 and "no kernel matching" in gate.stderr
