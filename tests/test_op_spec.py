"""CapaContribTopK_PluginConfig.yaml is the op's one description: spec.py reads it, the C++ agrees.

The C++ side is read from its sources here (no compiler needed, so this runs in CI); the built
plugin's creator is checked against the same manifest in tests/test_plugin_glue.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from capa_export.method import scoring
from capa_export.errors import CapaError
from capa_export.ops import spec

REPO = Path(__file__).resolve().parent.parent
OP_DIR = REPO / "plugins" / "contrib_topk"
SOURCE_SPEC = OP_DIR / "CapaContribTopK_PluginConfig.yaml"
CXX_FIELD_TYPES = {"kINT32": "int32", "kCHAR": "char", "kINT64": "int64", "kFLOAT32": "float32"}


def _cxx_constants() -> dict[str, str]:
    header = (OP_DIR / "trt_plugin.h").read_text()
    return dict(re.findall(r'constexpr char const\* (k\w+) = "([^"]*)";', header))


def _cxx_int_constants() -> dict[str, int]:
    header = (OP_DIR / "trt_plugin.h").read_text()
    return {name: int(value) for name, value in re.findall(r"constexpr int32_t (k\w+) = (\d+);", header)}


def _enum(name: str) -> dict[str, int]:
    header = (OP_DIR / "contrib_topk.h").read_text()
    body = re.search(rf"typedef enum {name} \{{(.*?)\}} {name};", header, re.S)
    assert body, f"enum {name} not found in contrib_topk.h"
    return {m: int(v) for m, v in re.findall(r"(CAPA_\w+)\s*=\s*(\d+)", body.group(1))}


def test_constants_come_from_the_manifest() -> None:
    import yaml

    doc = yaml.safe_load(SOURCE_SPEC.read_text())
    assert spec.OP_NAME == doc["name"] == "CapaContribTopK"
    assert spec.PLUGIN_NAMESPACE == doc["namespace"] and spec.ONNX_DOMAIN == doc["onnx_domain"]
    assert spec.PLUGIN_VERSION in doc["versions"]
    body = doc["versions"][spec.PLUGIN_VERSION]
    assert list(spec.ATTRIBUTES) == body["attributes"]
    assert spec.VARIANTS == body["variants"] and spec.DTYPES == body["dtypes"]
    assert spec.INPUTS == tuple(body["inputs"]) and spec.OUTPUTS == tuple(body["outputs"])
    assert spec.ATTRIBUTES["k"].required and spec.ATTRIBUTES["k"].onnx_type == "INT"
    assert spec.ATTRIBUTES["plugin_version"].default == spec.PLUGIN_VERSION
    assert spec.ATTRIBUTES["plugin_namespace"].default == spec.PLUGIN_NAMESPACE
    assert spec.SHAPE_INPUT_INDICES == tuple(body["shape_input_indices"])
    assert spec.SHAPE_INPUT_ATTRIBUTE == body["onnx_shape_input_attribute"]


def test_k_is_a_shape_input_named_to_the_onnx_parser() -> None:
    # Version 2: the fourth input k (int64 [1]) sizes the output; TensorRT's ONNX parser reads the
    # indices of shape inputs from this INTS node attribute (onnx-tensorrt, addPluginWithCreator).
    assert spec.INPUTS == ("probs", "values", "o_weight", "k")
    assert spec.SHAPE_INPUT_INDICES == (spec.INPUTS.index("k"),)
    assert spec.SHAPE_INPUT_ATTRIBUTE == "tensorrt_plugin_shape_input_indices"
    # Not a creator field: the parser passes only the attributes the creator names.
    assert spec.SHAPE_INPUT_ATTRIBUTE not in spec.ATTRIBUTES
    # Attribute k: 0 = from the input, else the count fixed at build time.
    assert spec.ATTRIBUTES["k"].options == {"min": "0", "max": str(2**31 - 1)}


def test_installed_copy_is_the_source_copy() -> None:
    path = spec.spec_path()
    if path == SOURCE_SPEC:
        pytest.skip("the package was not installed with its data files; spec.py reads the source tree's copy")
    assert path.read_bytes() == SOURCE_SPEC.read_bytes(), f"{path} is stale: reinstall (pip install -e .)"


def test_plugin_header_matches_the_manifest() -> None:
    c = _cxx_constants()
    assert (c["kPluginName"], c["kPluginVersion"], c["kPluginNamespace"]) == (
        spec.OP_NAME, spec.PLUGIN_VERSION, spec.PLUGIN_NAMESPACE)
    assert [c["kFieldK"], c["kFieldVariant"], c["kFieldPluginVersion"], c["kFieldPluginNamespace"]] == list(spec.ATTRIBUTES)
    n = _cxx_int_constants()
    assert n["kShapeInputK"] == spec.SHAPE_INPUT_INDICES[0]
    # Device inputs: every input but the shape inputs (TensorRT hands those to getOutputShapes only).
    assert n["kNbDeviceInputs"] == len(spec.INPUTS) - len(spec.SHAPE_INPUT_INDICES)


def test_creator_fields_match_the_manifest() -> None:
    # The creator's getFieldNames(), as written in its constructor: names (via the header's
    # constants), order and types.
    source = (OP_DIR / "trt_plugin.cpp").read_text()
    ctor = re.search(r"ContribTopKPluginCreator::ContribTopKPluginCreator\(\) \{(.*?)\n\}", source, re.S).group(1)
    fields = re.findall(r"mFields\.emplace_back\((k\w+), nullptr, PluginFieldType::(k\w+), (-?\d+)\)", ctor)
    c = _cxx_constants()
    assert [c[name] for name, _, _ in fields] == list(spec.ATTRIBUTES)
    assert [CXX_FIELD_TYPES[t] for _, t, _ in fields] == [a.type for a in spec.ATTRIBUTES.values()]
    # Serialised fields (runtime phase): the integer attributes.
    serial = re.findall(r"mSerialFields\.emplace_back\((k\w+), &\w+, PluginFieldType::(k\w+), 1\)", source)
    assert [(c[n], CXX_FIELD_TYPES[t]) for n, t in serial] == [
        (a.name, a.type) for a in spec.ATTRIBUTES.values() if a.type == "int32"]


def test_c_api_codes_match_the_manifest() -> None:
    variants = _enum("capa_variant")
    assert {name.removeprefix("CAPA_VARIANT_").lower(): code for name, code in variants.items()} == spec.VARIANTS
    dtypes = _enum("capa_dtype")
    spelled = {"FP32": "float32", "FP16": "float16", "BF16": "bfloat16"}
    assert {spelled[name.removeprefix("CAPA_DTYPE_")]: code for name, code in dtypes.items()} == spec.DTYPES


def test_variant_names_match_the_python_definition() -> None:
    # capa_export/method/scoring.py defines the semantics; its order is the codes' order.
    assert list(scoring.VARIANTS) == sorted(spec.VARIANTS, key=spec.VARIANTS.get)


def test_manifest_options_agree_with_the_codes() -> None:
    assert spec.ATTRIBUTES["variant"].options == sorted(spec.VARIANTS.values())
    assert spec.ATTRIBUTES["variant"].default in spec.VARIANTS.values()
    assert spec.ATTRIBUTES["plugin_version"].options == [spec.PLUGIN_VERSION]
    assert spec.ATTRIBUTES["plugin_namespace"].options == [spec.PLUGIN_NAMESPACE]


@pytest.mark.parametrize(
    "text,message",
    [
        ("name: X\n", "missing key 'versions'"),
        ("name: X\nnamespace: n\nonnx_domain: n\ninterface: I\nversions: {'1': {attributes: [k]}}\n",
         "missing key 'attribute_types'"),
        ("name: X\nnamespace: n\nonnx_domain: n\ninterface: I\nversions: {'1': {attributes: [k], "
         "attribute_types: {k: int32}, variants: {a: 0}, dtypes: {float32: 0}}}\n", "neither required nor given a default"),
        ("name: X\nnamespace: n\nonnx_domain: n\ninterface: I\nversions: {'1': {attributes: [k], attribute_types: "
         "{k: int32}, attributes_required: [k], variants: {a: 1}, dtypes: {float32: 0}, inputs: [], outputs: []}}\n",
         "variant codes must be 0..0"),
        ("versions: [", "cannot read the op manifest"),
        ("name: X\nnamespace: n\nonnx_domain: n\ninterface: I\nversions: {'2': {attributes: [k], attribute_types: "
         "{k: int32}, attributes_required: [k], variants: {a: 0}, dtypes: {float32: 0}, inputs: [a, k], outputs: [o], "
         "shape_input_indices: [2], onnx_shape_input_attribute: s}}\n", "shape_input_indices must list indices of inputs 0..1"),
        ("name: X\nnamespace: n\nonnx_domain: n\ninterface: I\nversions: {'2': {attributes: [k], attribute_types: "
         "{k: int32}, attributes_required: [k], variants: {a: 0}, dtypes: {float32: 0}, inputs: [a, k], outputs: [o], "
         "shape_input_indices: [1]}}\n", "without onnx_shape_input_attribute"),
    ],
    ids=["no_versions", "no_attribute_types", "attribute_without_default", "variant_codes_gap", "bad_yaml",
         "shape_input_out_of_range", "shape_input_without_attribute"],
)
def test_bad_manifest_is_a_capa_error_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(CapaError, match=message) as info:
        spec.load_spec(path)
    assert str(path) in str(info.value)
