"""The CUDA top-k kernel's algorithm, emulated on the host, against a stable sort.

plugins/contrib_topk/test/topk_emulation.cpp runs topk_kernel's steps sequentially with the very
key map and bin choice the kernel compiles (contrib_topk_select.h). It needs a C++ compiler only
(no GPU, no CUDA, no TensorRT), so this runs in CI; the kernel itself runs in
tests/test_contrib_topk_op.py's `cuda` column on a GPU machine.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.adversarial_topk import ADVERSARIAL, stable_topk

REPO = Path(__file__).resolve().parent.parent
OP_DIR = REPO / "plugins" / "contrib_topk"


@pytest.fixture(scope="module")
def emulation(tmp_path_factory) -> ctypes.CDLL:
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) on PATH to build the top-k emulation")
    lib = tmp_path_factory.mktemp("topk_emulation") / "libcapa_topk_emulation.so"
    subprocess.run(
        [compiler, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", f"-I{OP_DIR}",
         str(OP_DIR / "test" / "topk_emulation.cpp"), "-o", str(lib)],
        check=True, capture_output=True, text=True,
    )
    dll = ctypes.CDLL(str(lib))
    dll.capa_topk_emulate.restype = ctypes.c_int
    dll.capa_topk_emulate.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p]
    return dll


def emulate(dll: ctypes.CDLL, scores: np.ndarray, k: int) -> np.ndarray:
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    b, n = scores.shape
    out = np.full((b, k), -1, dtype=np.int32)
    rc = dll.capa_topk_emulate(scores.ctypes.data, b, n, k, out.ctypes.data)
    assert rc == 0
    return out


@pytest.mark.parametrize("case", list(ADVERSARIAL))
def test_emulated_kernel_matches_stable_sort(emulation, case: str) -> None:
    scores, k = ADVERSARIAL[case]
    np.testing.assert_array_equal(emulate(emulation, scores, k).astype(np.int64), stable_topk(scores, k))


def test_emulation_rejects_k_above_n(emulation) -> None:
    scores = np.zeros((1, 4), np.float32)
    out = np.zeros((1, 5), np.int32)
    assert emulation.capa_topk_emulate(scores.ctypes.data, 1, 4, 5, out.ctypes.data) != 0
