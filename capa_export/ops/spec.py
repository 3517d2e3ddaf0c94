"""The CapaContribTopK op's one description: `CapaContribTopK_PluginConfig.yaml`.

The manifest sits in plugins/contrib_topk/ (the layout of TensorRT's `*_PluginConfig.yaml`) and is
installed next to this module. Everything that names the op -- the ONNX exporter, the ONNX Runtime
op, the TensorRT backend, the native bindings -- reads these constants instead of repeating them;
tests check the C++ headers and the built plugin against the same file.

    OP_NAME           plugin name and ONNX op_type: "CapaContribTopK"
    PLUGIN_VERSION    "2"
    PLUGIN_NAMESPACE  "capa"
    ONNX_DOMAIN       domain of the ONNX local function / node ("capa": TensorRT >= 10.10 takes the
                      plugin namespace from the node's domain)
    ATTRIBUTES        name -> Attribute(type, onnx_type, default, required, options)
    VARIANTS          name -> code (the `variant` attribute and the C API)
    DTYPES            input element type name (torch/numpy spelling) -> C API code
    INPUTS, OUTPUTS   tensor names, in order (version 2: probs, values, o_weight, k)
    SHAPE_INPUT_INDICES      indices into INPUTS that TensorRT takes as shape inputs ((3,): k)
    SHAPE_INPUT_ATTRIBUTE    the node attribute (INTS) that names them to TensorRT's ONNX parser:
                             "tensorrt_plugin_shape_input_indices"; not a creator field, so not in
                             ATTRIBUTES
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from capa_export.errors import CapaError

SPEC_FILE = "CapaContribTopK_PluginConfig.yaml"
#: The source-tree copy, used when the package was not installed with its data files.
SOURCE_SPEC = Path(__file__).resolve().parents[2] / "plugins" / "contrib_topk" / SPEC_FILE

#: Manifest attribute types -> ONNX AttributeProto type names.
_ONNX_ATTRIBUTE_TYPES = {"int32": "INT", "int64": "INT", "float32": "FLOAT", "char": "STRING"}


@dataclass(frozen=True)
class Attribute:
    name: str
    type: str  # manifest type: int32 | char (| int64 | float32)
    onnx_type: str  # INT | STRING | FLOAT
    default: Any  # None when required
    required: bool
    options: Any  # list of allowed values, or {"min": ..., "max": ...}, or None


@dataclass(frozen=True)
class OpSpec:
    name: str
    version: str
    namespace: str
    onnx_domain: str
    interface: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict[str, Attribute]
    variants: dict[str, int]
    dtypes: dict[str, int]
    output_types: dict[str, str]
    source: Path
    #: indices into `inputs` that TensorRT takes as shape inputs (their values size the output)
    shape_input_indices: tuple[int, ...] = ()
    #: the ONNX node attribute (INTS) listing `shape_input_indices` for TensorRT's ONNX parser
    shape_input_attribute: str | None = None


def spec_path() -> Path:
    """The installed manifest when present, else the source tree's; CapaError when neither exists."""
    try:
        installed = importlib.resources.files("capa_export.ops") / SPEC_FILE
        if installed.is_file():
            return Path(str(installed))
    except (ModuleNotFoundError, OSError, TypeError):
        pass
    if SOURCE_SPEC.is_file():
        return SOURCE_SPEC
    raise CapaError(
        f"{SPEC_FILE} not found (neither installed in capa_export/ops nor at {SOURCE_SPEC}); "
        "reinstall capa-export: pip install --no-build-isolation -e ."
    )


def _need(mapping: dict, key: str, where: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise CapaError(f"{where}: missing key {key!r}")
    return mapping[key]


def load_spec(path: Path | str | None = None, version: str | None = None) -> OpSpec:
    """Parse the manifest (default: `spec_path()`); `version` defaults to the highest listed."""
    path = Path(path) if path is not None else spec_path()
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CapaError(f"{path}: cannot read the op manifest ({exc})") from exc
    where = str(path)
    versions = _need(doc, "versions", where)
    if not isinstance(versions, dict) or not versions:
        raise CapaError(f"{where}: versions must map a version string to its description")
    if version is None:
        version = max(versions, key=lambda v: tuple(int(p) for p in str(v).split(".")))
    body = _need(versions, version, where)
    where = f"{path} (version {version})"
    names = [str(a) for a in _need(body, "attributes", where)]
    types = _need(body, "attribute_types", where)
    options = body.get("attribute_options") or {}
    required = set(body.get("attributes_required") or [])
    defaults = body.get("attribute_defaults") or {}
    attributes: dict[str, Attribute] = {}
    for name in names:
        kind = str(_need(types, name, f"{where}: attribute_types"))
        if kind not in _ONNX_ATTRIBUTE_TYPES:
            raise CapaError(f"{where}: attribute {name} has type {kind!r}; expected one of {', '.join(_ONNX_ATTRIBUTE_TYPES)}")
        if name not in required and name not in defaults:
            raise CapaError(f"{where}: attribute {name} is neither required nor given a default")
        attributes[name] = Attribute(
            name=name,
            type=kind,
            onnx_type=_ONNX_ATTRIBUTE_TYPES[kind],
            default=None if name in required else defaults[name],
            required=name in required,
            options=options.get(name),
        )
    variants = {str(k): int(v) for k, v in _need(body, "variants", where).items()}
    dtypes = {str(k): int(v) for k, v in _need(body, "dtypes", where).items()}
    if sorted(variants.values()) != list(range(len(variants))):
        raise CapaError(f"{where}: variant codes must be 0..{len(variants) - 1}, got {variants}")
    inputs = tuple(str(x) for x in _need(body, "inputs", where))
    shape_inputs = body.get("shape_input_indices") or []
    if not isinstance(shape_inputs, list) or not all(isinstance(i, int) and 0 <= i < len(inputs) for i in shape_inputs):
        raise CapaError(f"{where}: shape_input_indices must list indices of inputs 0..{len(inputs) - 1}, got {shape_inputs}")
    shape_attribute = body.get("onnx_shape_input_attribute")
    if shape_inputs and not shape_attribute:
        raise CapaError(f"{where}: shape_input_indices given without onnx_shape_input_attribute")
    return OpSpec(
        name=str(_need(doc, "name", str(path))),
        version=str(version),
        namespace=str(_need(doc, "namespace", str(path))),
        onnx_domain=str(_need(doc, "onnx_domain", str(path))),
        interface=str(_need(doc, "interface", str(path))),
        inputs=inputs,
        outputs=tuple(str(x) for x in _need(body, "outputs", where)),
        attributes=attributes,
        variants=variants,
        dtypes=dtypes,
        output_types={str(k): str(v) for k, v in (body.get("output_types") or {}).items()},
        source=path,
        shape_input_indices=tuple(shape_inputs),
        shape_input_attribute=str(shape_attribute) if shape_attribute else None,
    )


SPEC = load_spec()
OP_NAME: str = SPEC.name
PLUGIN_VERSION: str = SPEC.version
PLUGIN_NAMESPACE: str = SPEC.namespace
ONNX_DOMAIN: str = SPEC.onnx_domain
ATTRIBUTES: dict[str, Attribute] = SPEC.attributes
VARIANTS: dict[str, int] = SPEC.variants
DTYPES: dict[str, int] = SPEC.dtypes
INPUTS: tuple[str, ...] = SPEC.inputs
OUTPUTS: tuple[str, ...] = SPEC.outputs
SHAPE_INPUT_INDICES: tuple[int, ...] = SPEC.shape_input_indices
SHAPE_INPUT_ATTRIBUTE: str | None = SPEC.shape_input_attribute
