"""The TensorRT plugin libraries without TensorRT: what they export and need, and their IPluginV3 glue.

Needs TensorRT's public headers (TensorRT_ROOT=<root holding include/NvInfer.h>), nvcc and cmake;
skipped with that reason otherwise (CI has no headers). It builds, in build/plugin-glue:
  libcapa_contrib_topk_plugin.so          (getCreators / setLoggerFinder; loadLibrary, lean runtime)
  libcapa_contrib_topk_plugin_autoreg.so  (registers itself when dlopened; ctypes / Polygraphy)
  capa_plugin_glue_harness + a stand-in libnvinfer.so.N (test doubles of the registry and logger)
then checks the libraries with nm / readelf and ctypes, and runs the harness, which reports what
the plugin did (JSON lines); the expectations here come from the op's manifest
(capa_export/ops/spec.py), TensorRT's documented enums and the documented workspace layout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from capa_export.ops import spec

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build" / "plugin-glue"
VC_LIB = BUILD / "libcapa_contrib_topk_plugin.so"
AUTOREG_LIB = BUILD / "libcapa_contrib_topk_plugin_autoreg.so"

# TensorRT enums (NvInferRuntimeBase.h / NvInferPluginBase.h / NvInferRuntime.h).
TRT_DATA_TYPES = {"float32": 0, "float16": 1, "int8": 2, "int32": 3, "bool": 4, "uint8": 5, "fp8": 6, "bfloat16": 7,
                  "int64": 8}
PLUGIN_FIELD_TYPES = {"int32": 5, "char": 6, "int64": 10}
FORMAT_LINEAR = 0
RUNTIME_LIBRARIES = re.compile(r"^(libc|libm|libdl|librt|libpthread|libgcc_s|libstdc\+\+|ld-linux[-\w]*)\.so(\.\d+)*$")


def _trt_root() -> Path:
    root = os.environ.get("TensorRT_ROOT")
    if not root:
        pytest.skip("TensorRT_ROOT is not set (point it at a TensorRT install or its public headers: <root>/include/NvInfer.h)")
    if not (Path(root) / "include" / "NvInfer.h").is_file():
        pytest.skip(f"TensorRT_ROOT={root} holds no include/NvInfer.h")
    for tool in ("cmake", "nvcc", "nm", "readelf"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not on PATH (needed to build and inspect the plugin libraries)")
    return Path(root)


@pytest.fixture(scope="module")
def built() -> Path:
    root = _trt_root()
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(
        ["cmake", "-S", str(REPO), "-B", str(BUILD), *generator, "-DCMAKE_BUILD_TYPE=Release", f"-DTensorRT_ROOT={root}",
         "-DCAPA_BUILD_PYTHON=OFF", "-DCAPA_REQUIRE_CUDA=ON", "-DCAPA_BUILD_PLUGIN_TESTS=ON",
         f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('CUDAARCHS', '90')}", "-DCMAKE_COMPILE_WARNING_AS_ERROR=ON"],
        check=True, capture_output=True, text=True,
    )
    done = subprocess.run(["cmake", "--build", str(BUILD), "--target", "capa_plugin_glue_harness"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return BUILD


@pytest.fixture(scope="module")
def report(built: Path) -> dict[str, list[dict]]:
    standin = next((built / "trt-standin").glob("libnvinfer.so.*"))
    done = subprocess.run([str(built / "capa_plugin_glue_harness"), str(VC_LIB), str(AUTOREG_LIB), str(standin)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    cases: dict[str, list[dict]] = {}
    for line in done.stdout.splitlines():
        entry = json.loads(line)
        cases.setdefault(entry["case"], []).append(entry)
    return cases


def by_label(report: dict, case: str) -> dict[str, dict]:
    return {entry["label"]: entry for entry in report[case]}


def gpu_present(report: dict) -> bool:
    return report["cuda"][0]["devices"] > 0


# ---- the libraries as files: exports, undefined symbols, DT_NEEDED ------------------------------


def _dynamic_symbols(lib: Path, flag: str) -> list[tuple[str, str]]:
    out = subprocess.run(["nm", "-D", flag, str(lib)], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        rows.append((parts[-2], parts[-1]))  # (type letter, name[@version])
    return rows


def _needed(lib: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


@pytest.mark.parametrize("lib,exports", [(VC_LIB, {"getCreators", "setLoggerFinder"}), (AUTOREG_LIB, set())],
                         ids=["vc", "autoreg"])
def test_library_exports_and_dependencies(built: Path, lib: Path, exports: set[str]) -> None:
    defined = {name for kind, name in _dynamic_symbols(lib, "--defined-only") if kind in "TDBRVWiu"}
    assert defined == exports
    strong_undefined = [name for kind, name in _dynamic_symbols(lib, "--undefined-only") if kind == "U"]
    # Only the C/C++ runtime may be left to the loader: every such symbol carries its version.
    assert [n for n in strong_undefined if "@" not in n] == []
    trt_names = ("getPluginRegistry", "getLogger", "createInfer", "nvinfer1")
    assert [n for n in strong_undefined if any(t in n for t in trt_names)] == []
    needed = _needed(lib)
    assert not any("nvinfer" in n for n in needed), needed
    assert all(RUNTIME_LIBRARIES.match(n) for n in needed), needed


def test_ctypes_loads_both_libraries_without_tensorrt(built: Path) -> None:
    # The reported failure: ctypes.CDLL (Polygraphy's LoadPlugins) -> "undefined symbol:
    # getPluginRegistry". A fresh interpreter, no libnvinfer anywhere in the process.
    code = "import ctypes, sys; [ctypes.CDLL(p) for p in sys.argv[1:]]; print('loaded')"
    done = subprocess.run([sys.executable, "-c", code, str(VC_LIB), str(AUTOREG_LIB)], capture_output=True, text=True)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr
    loadable = subprocess.run([sys.executable, "-c", "import ctypes, sys; ctypes.CDLL(sys.argv[1])",
                               f"libnvinfer.so.{_standin_major(built)}"], capture_output=True)
    if loadable.returncode != 0:  # no TensorRT here: the self-registering library says so, once
        assert "is neither loaded nor loadable" in done.stderr and "not registered" in done.stderr


def _standin_major(built: Path) -> str:
    return next((built / "trt-standin").glob("libnvinfer.so.*")).name.rsplit(".", 1)[1]


# ---- registration paths -------------------------------------------------------------------------

EXPECTED_KEY = [spec.OP_NAME, spec.PLUGIN_VERSION, spec.PLUGIN_NAMESPACE]


def test_load_library_registers_the_creator_once(report: dict) -> None:
    load = report["vc_load_library"][0]
    assert load["loaded"] and load["register_calls"] == 1 and load["registered"] == [EXPECTED_KEY]
    assert report["vc_load_library_again"][0]["loaded"] is False  # the stand-in registry refuses duplicates


def test_ctypes_style_load_self_registers_once_through_the_loaded_libnvinfer(report: dict) -> None:
    auto = report["autoreg_ctypes"][0]
    assert auto["loaded"], auto["error"]
    assert auto["register_calls"] == 1 and auto["registered"] == [EXPECTED_KEY]
    assert not auto["exports_getCreators"] and not auto["exports_setLoggerFinder"]
    # Its errors reach the process's getLogger().
    assert "field k=-1" in report["autoreg_logs"][0]["error"]
    # Both variants in one process conflict, as documented.
    assert report["autoreg_then_vc_load_library"][0]["loaded"] is False


def test_creator_matches_the_manifest(report: dict) -> None:
    creator = report["creator"][0]
    assert creator["kind"] == "PLUGIN CREATOR_V3ONE"
    assert [creator["name"], creator["version"], creator["namespace"]] == EXPECTED_KEY
    assert [f["name"] for f in creator["fields"]] == list(spec.ATTRIBUTES)
    assert [f["type"] for f in creator["fields"]] == [PLUGIN_FIELD_TYPES[a.type] for a in spec.ATTRIBUTES.values()]
    # The parser passes only the attributes the creator names: the shape-input list is not one.
    assert spec.SHAPE_INPUT_ATTRIBUTE not in [f["name"] for f in creator["fields"]]


# ---- createPlugin ---------------------------------------------------------------------------------

K_RANGE = rf"\[{spec.ATTRIBUTES['k'].options['min']}, {spec.ATTRIBUTES['k'].options['max']}\]"

# label -> (k, variant) when the fields are valid, else a regex of the logged error.
CREATE_CASES = {
    "parser_fields": (16, 0),
    "parser_fields_k_from_input": (0, 1),  # k = 0: the shape input's value
    "runtime_fields": (16, 2),
    "int64_fields": (7, 1),
    "k_only": (3, spec.ATTRIBUTES["variant"].default),
    "strings_without_nul": (5, 0),
    "k_max_int32": (2**31 - 1, 0),
    "no_fields": r"field k is missing",
    "null_collection": r"no field collection",
    "k_zero": (0, 0),
    "k_zero_int64": (0, 0),
    "k_negative": r"field k=-5 is out of range " + K_RANGE,
    "k_int64_above_int32": r"field k=2147483648 is out of range",
    "k_int64_negative": r"field k=-1099511627776 is out of range",
    "k_float": r"field k must be INT32 or INT64",
    "k_two_values": r"field k must hold exactly one integer",
    "k_null_data": r"field k must hold exactly one integer",
    "variant_3": r"field variant=3 is out of range \[0, 2\]",
    "variant_negative": r"field variant=-1 is out of range",
    "variant_int64_huge": r"field variant=8589934592 is out of range",
    "plugin_version_1": r"plugin_version='1' but this creator is version " + spec.PLUGIN_VERSION,
    "plugin_namespace_other": r"plugin_namespace='other'",
    "plugin_version_as_int": r"plugin_version must be a CHAR string",
    "unknown_field": r"unknown field 'topk'",
    "duplicate_k": r"field k given twice",
    "null_field_name": r"unknown field",
}


def _serialized(k: int, variant: int) -> list[dict]:
    return [{"name": "k", "type": 5, "length": 1, "value": k}, {"name": "variant", "type": 5, "length": 1, "value": variant}]


@pytest.mark.parametrize("label", list(CREATE_CASES))
def test_create_plugin(report: dict, label: str) -> None:
    entry = by_label(report, "create")[label]
    expected = CREATE_CASES[label]
    if isinstance(expected, tuple):
        assert entry["created"], entry["error"]
        assert entry["serialized"] == _serialized(*expected)
        # Serialisation round trip: the runtime-phase plugin serialises to the same fields.
        assert entry["roundtrip_created"] and entry["roundtrip_serialized"] == entry["serialized"]
    else:
        assert not entry["created"]
        assert re.search(expected, entry["error"]), entry["error"]
        assert entry["error"].startswith("[capa::CapaContribTopK]")


def test_clone_and_attach_to_context(report: dict) -> None:
    entry = report["clone_attach"][0]
    assert entry["clone_distinct"] and entry["attach_distinct"]
    assert entry["original"] == _serialized(16, 0) == entry["clone"] == entry["attached"]
    assert [entry["core_name"], entry["core_version"], entry["core_namespace"]] == EXPECTED_KEY
    assert entry["nb_outputs"] == len(spec.OUTPUTS)
    assert entry["unknown_capability_null"]


# ---- build-time methods ---------------------------------------------------------------------------


def test_output_shapes(report: dict) -> None:
    cases = by_label(report, "output_shapes")
    # keep_indices: [probs_0, k] (the manifest's output_dims): the batch expression itself; k the
    # attribute when > 0 (a constant), else the k shape input's own value expression.
    for label in ("static", "dynamic_batch_and_keys", "attribute_with_equal_input", "attribute_with_symbolic_input"):
        entry = cases[label]
        assert entry["rc"] == 0 and entry["nb_dims"] == 2 and entry["d0_is_input_batch"], entry
        assert entry["d1_constant"] and entry["d1_value"] == 16 and not entry["d1_is_shape_input"], entry
    for label, value in (("from_input_symbolic", None), ("from_input_constant", 12), ("from_input_k_device_input_too", None)):
        entry = cases[label]
        assert entry["rc"] == 0 and entry["nb_dims"] == 2 and entry["d0_is_input_batch"], entry
        assert entry["d1_is_shape_input"], entry
        assert entry["d1_constant"] == (value is not None) and (value is None or entry["d1_value"] == value), entry
    shape_input = spec.INPUTS[spec.SHAPE_INPUT_INDICES[0]]
    errors = {"probs_rank_3": "rank 4", "heads_not_multiple": "not a multiple", "keys_mismatch": "keys",
              "o_weight_columns": "H\\*d", "k_above_n": "k=16 exceeds the number of keys N=8",
              "attribute_disagrees_with_input": "input k holds 8 but attribute k=16",
              "from_input_above_n": "k=200 exceeds the number of keys N=96",
              "from_input_zero": "input k holds 0", "from_input_negative": "input k holds -3",
              "from_input_missing": f"attribute k=0 takes k from the shape input.*{spec.SHAPE_INPUT_ATTRIBUTE}",
              "two_shape_inputs": f"at most one shape input, {shape_input}",
              "shape_input_two_values": "holding one value"}
    for label, pattern in errors.items():
        assert cases[label]["rc"] != 0 and re.search(pattern, cases[label]["error"]), cases[label]


def test_output_types(report: dict) -> None:
    cases = by_label(report, "output_types")
    int32 = TRT_DATA_TYPES[spec.SPEC.output_types["keep_indices"]]
    for label in ("fp32", "fp16", "bf16"):
        assert cases[label]["rc"] == 0 and cases[label]["type"] == int32
    assert cases["mixed"]["rc"] != 0 and cases["int8"]["rc"] != 0
    # k among the device inputs (tolerated, never read): an integer tensor.
    for name in ("int64", "int32"):
        entry = cases[f"fp16_k_device_input_{TRT_DATA_TYPES[name]}"]
        assert entry["rc"] == 0 and entry["type"] == int32
    assert cases[f"fp16_k_device_input_{TRT_DATA_TYPES['float32']}"]["rc"] != 0


def test_supports_format_combination_table(report: dict) -> None:
    entry = report["formats"][0]
    float_types = {TRT_DATA_TYPES[name] for name in spec.DTYPES}
    all_types = set(TRT_DATA_TYPES.values())

    def expected(nb_inputs: int) -> set:
        rows = set()
        for first in all_types:
            if first in float_types:
                rows.add((0, first, first, FORMAT_LINEAR))
            # values / o_weight: the type of probs (the harness sets it), linear.
            rows |= {(1, first, first, FORMAT_LINEAR), (2, first, first, FORMAT_LINEAR)}
            if nb_inputs == 4:  # k as a device input: INT32 or INT64
                rows |= {(3, first, TRT_DATA_TYPES[t], FORMAT_LINEAR) for t in ("int32", "int64")}
            rows.add((nb_inputs, first, TRT_DATA_TYPES["int32"], FORMAT_LINEAR))
        return rows

    # The shape input k is not among the device inputs TensorRT asks about (IPluginV3: shape
    # inputs are seen only by getOutputShapes); a 4th device input k is tolerated.
    assert {tuple(row) for row in entry["supported"]} == expected(len(spec.INPUTS) - len(spec.SHAPE_INPUT_INDICES))
    assert {tuple(row) for row in entry["supported_k_device_input"]} == expected(len(spec.INPUTS))
    assert not entry["pos_out_of_range"] and not entry["wrong_io_count"]


def test_configure_plugin(report: dict) -> None:
    cases = by_label(report, "configure")
    for label in ("attention", "value_norm_fp16", "empty_batch_profile", "from_input", "from_input_k_device_input",
                  "from_input_k_device_input_int32"):
        assert cases[label]["rc"] == 0, cases[label]
    rejections = {
        "mixed_types": "share one type", "int8_inputs": "share one type", "output_not_int32": "INT32",
        "k_above_smallest_n": "k=40 exceeds .*smallest shapes", "heads_not_multiple": "not a multiple",
        "two_inputs": "expects the device inputs probs, values, o_weight",
        # k from the shape input: the profile's k range (the output's second dim) against N's.
        "from_input_smallest_k_above_smallest_n": "k=40 exceeds the number of keys N=32 .*smallest shapes",
        "from_input_largest_k_above_largest_n": "k=120 exceeds the number of keys N=100 .*largest shapes",
        "from_input_k_zero": "k=0: at least one token", "from_input_k_device_input_float": "input 3 \\(k\\)",
    }
    for label, pattern in rejections.items():
        assert cases[label]["rc"] != 0 and re.search(pattern, cases[label]["error"]), cases[label]
    if gpu_present(report):
        assert cases["contrib"]["rc"] == 0, cases["contrib"]
        assert cases["from_input_contrib"]["rc"] == 0, cases["from_input_contrib"]
        # H = 1000 exceeds every GPU's shared memory: refused at build time, not at the first enqueue.
        assert cases["contrib_heads_1000"]["rc"] != 0
        assert re.search(r"H=1000 heads needs \d+ bytes of shared memory", cases["contrib_heads_1000"]["error"])
    else:
        for label in ("contrib", "contrib_heads_1000", "from_input_contrib"):
            assert cases[label]["rc"] != 0 and "cudaGetDevice failed" in cases[label]["error"]


def _align256(n: int) -> int:
    return (n + 255) // 256 * 256


def test_workspace_size_follows_the_profiles_largest_shapes(report: dict) -> None:
    for entry in report["workspace"]:
        # fp32 scores [B, N], plus [B, H_kv, N] fp32 norms for value_norm, each 256-byte aligned.
        expected = _align256(entry["max_b"] * entry["max_n"] * 4)
        if entry["label"].startswith("value_norm"):  # value_norm_k_from_input: the same layout
            expected += _align256(entry["max_b"] * entry["h_kv"] * entry["max_n"] * 4)
        assert entry["bytes"] == expected, entry


def test_on_shape_change(report: dict) -> None:
    # Every actual shape: k (the output's second dim) within [1, N], and equal to the attribute when > 0.
    cases = by_label(report, "on_shape_change")
    for label in ("attribute", "from_input", "from_input_k_device_input", "from_input_k_equals_n"):
        assert cases[label]["rc"] == 0 and cases[label]["error"] == "", cases[label]
    rejections = {"attribute_k_above_n": "k=16 exceeds the number of keys N=8",
                  "attribute_output_disagrees": "must be \\[B, k\\] with k=16",
                  "from_input_k_above_n": "k=100 exceeds the number of keys N=96",
                  "from_input_k_zero": "k=0: at least one token"}
    for label, pattern in rejections.items():
        assert cases[label]["rc"] != 0 and re.search(pattern, cases[label]["error"]), cases[label]


# ---- enqueue --------------------------------------------------------------------------------------


def test_enqueue(report: dict) -> None:
    cases = by_label(report, "enqueue")
    assert cases["empty_batch"]["rc"] == 0 and cases["empty_batch"]["error"] == ""  # B = 0: a no-op
    assert cases["no_workspace"]["rc"] != 0 and "workspace" in cases["no_workspace"]["error"]
    # k is read from the output's dims: [2, 200] over N = 96 keys is refused before any launch.
    assert cases["k_from_output_above_n"]["rc"] != 0
    assert "k not in [1, N]" in cases["k_from_output_above_n"]["error"]
    for label in ("launch_contrib", "launch_attention", "launch_attention_k_from_input"):
        entry = cases[label]
        if entry["on_gpu"]:
            assert entry["rc"] == 0 and entry["sync_error"] == "no error", entry
            # All-zero inputs: every score ties, so each of the 2 rows keeps the k = 16 lowest indices.
            assert entry["kept"] == list(range(16)) * 2, entry
        else:
            # Fails cleanly, naming the CUDA call and CUDA's own error text (not "no error").
            assert entry["rc"] != 0
            assert re.search(r"failed: .+ \(cudaError\w+\)", entry["error"]), entry["error"]
            assert "no error" not in entry["error"]


def test_contrib_head_limit_for_known_shared_memory_sizes(report: dict) -> None:
    # README: the contrib kernel needs JT*(H^2+1) + JT*H*65 + 8448 + 128*JT floats of shared memory
    # per block; one key per block (JT = 1) bounds H.
    def floats(h: int) -> int:
        return (h * h + 1) + h * 65 + 8448 + 128

    for entry in report["max_heads"]:
        limit = entry["smem_kib"] * 1024
        expected = max(h for h in range(1, 1024) if floats(h) * 4 <= limit)
        assert entry["heads"] == expected, entry
