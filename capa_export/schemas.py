"""JSON Schemas (draft 2020-12) of the JSON files capa-export reads back from a folder.

They describe what the current code writes (`build`, `calibrate`, the backends) and check types,
required keys and the shape of every path a file names, so that a hand-edited or hostile file is
refused with one line (`capa_export.folders.check_schema`) before any field is used.

Each schema may carry an `expect` keyword (ignored by JSON Schema itself): the words that finish
"<key> must be ..." in the error message. Paths are matched with `\\Z`, not `$`: in Python's `re`,
`$` also matches before a final newline.
"""

from __future__ import annotations

_NAME_CHARS = r"[^/\x00-\x1f\x7f]"
_FIRST_CHAR = r"[^/.\x00-\x1f\x7f]"  # no '.', '..' or hidden names

#: A relative POSIX path inside a folder: no leading '/', no empty, '.', '..' or hidden component,
#: no control character. `folders.confined_file` checks the same on the filesystem.
RELATIVE_PATH = {
    "type": "string", "minLength": 1, "maxLength": 1024,
    "pattern": rf"^{_FIRST_CHAR}{_NAME_CHARS}*(/{_FIRST_CHAR}{_NAME_CHARS}*)*\Z",
    "expect": "a relative path inside the folder (no leading '/', no '..', no hidden or empty names)",
}
#: One file name (no directory part) inside a backend directory.
FILE_NAME = {
    "type": "string", "minLength": 1, "maxLength": 255,
    "pattern": rf"^{_FIRST_CHAR}{_NAME_CHARS}*\Z",
    "expect": "a plain file name inside the folder (no '/', no '..', not hidden)",
}
DIRECTORY_NAME = {**FILE_NAME, "expect": "a directory name inside the folder (no '/', no '..', not hidden)"}
SHA256 = {"type": "string", "minLength": 64, "maxLength": 64, "pattern": r"^[0-9a-f]{64}\Z",
          "expect": "a 64-hex string (lowercase sha256)"}
SHORT_STRING = {"type": "string", "maxLength": 1024}
NATURAL = {"type": "integer", "minimum": 0}
POSITIVE = {"type": "integer", "minimum": 1}
LAYER_LIST = {"type": "array", "items": NATURAL, "maxItems": 4096, "expect": "a list of layer indices (integers >= 0)"}
#: a prune stage's keep: a count of visual tokens or a fraction of them
KEEP = {"anyOf": [POSITIVE, {"type": "number", "exclusiveMinimum": 0, "maximum": 1}]}
SHAPE_RANGE = {"type": "array", "items": POSITIVE, "minItems": 3, "maxItems": 3,
               "expect": "[min, opt, max], three integers >= 1"}
NULLABLE_NUMBER = {"type": ["number", "null"]}
TOOL = {
    "type": "object", "required": ["name", "version"],
    "properties": {"name": {"const": "capa-export", "expect": "\"capa-export\""}, "version": SHORT_STRING},
}
GRAPH_NAMES = ("vision", "embed", "prefill", "decode")

#: `capa_config.json` (CapaConfig.to_dict); values are range-checked by CapaConfig itself.
CAPA_CONFIG = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "prune": {"type": "array", "maxItems": 64,
                  "items": {"type": "array", "prefixItems": [POSITIVE, KEEP], "minItems": 2, "maxItems": 2,
                            "expect": "a [layer K, keep] pair: K an integer >= 1, keep a count (an integer >= 1) "
                                      "or a fraction in (0, 1]"}},
        "variant": SHORT_STRING,
        "queries": SHORT_STRING,
        "ffn_layers": {"anyOf": [LAYER_LIST, {"const": "auto"}], "expect": "a list of layer indices or \"auto\""},
        "ffn_threshold": {"type": "number"},
        "ffn_range": {"anyOf": [{"type": "null"}, {"type": "array", "prefixItems": [NATURAL, NATURAL],
                                                  "minItems": 2, "maxItems": 2}],
                      "expect": "null or [first, last] layer indices"},
        "ffn_ridge": {"type": "number", "minimum": 0},
        "ffn_rank": {"type": ["integer", "null"], "minimum": 1},
        "prune_layout_tokens": {"type": "boolean"},
    },
}

#: A build profile as stored in the manifest (BuildProfile.to_dict).
PROFILE = {
    "type": "object",
    "required": ["shapes"],
    "properties": {
        "name": SHORT_STRING, "description": {"type": "string"},
        "precision": {"enum": ["fp32", "fp16", "bf16"]},
        "backend": SHORT_STRING,
        "pruning": {"enum": ["function", "inline"]},
        "attention_blocks": POSITIVE,
        "prune": {"anyOf": [{"type": "null"}, CAPA_CONFIG["properties"]["prune"]]},
        "providers": {"type": "array", "items": SHORT_STRING},
        "workspace_mib": POSITIVE,
        "optimization_level": SHORT_STRING,
        "shapes": {"type": "object", "required": ["batch", "sequence", "past"],
                   "additionalProperties": SHAPE_RANGE},
        "tensorrt": {"type": "object"},
    },
}

FILE_ENTRY = {
    "type": "object", "required": ["bytes", "sha256"], "additionalProperties": False,
    "properties": {"bytes": {**NATURAL, "expect": "the file size, an integer >= 0"}, "sha256": SHA256},
}

#: `manifest.json` of an engine folder (manifest.write_manifest, build.build_engine).
ENGINE_MANIFEST = {
    "type": "object",
    "required": ["format_version", "tool", "model", "capa_config", "profile", "backend", "backend_dir", "dtype",
                 "pruning", "k", "layer_segment", "libraries", "complete", "files"],
    "properties": {
        "format_version": {**POSITIVE, "expect": "an integer >= 1"},
        "tool": TOOL,
        "model": {
            "type": "object",
            # ModelAdapter.describe(): the shared fields; a family adds its own vision geometry
            "required": ["family", "image_token_id", "vocab_size", "hidden_size", "num_layers", "num_kv_heads",
                         "head_dim"],
            "properties": {"name": SHORT_STRING, "family": SHORT_STRING, "model_type": SHORT_STRING,
                           "name_or_path": SHORT_STRING, "num_layers": POSITIVE, "hidden_size": POSITIVE,
                           "image_token_id": NATURAL, "vocab_size": POSITIVE, "num_heads": POSITIVE,
                           "num_kv_heads": POSITIVE, "head_dim": POSITIVE},
        },
        "capa_config": CAPA_CONFIG,
        "ffn_layers": LAYER_LIST,
        "profile": PROFILE,
        "backend": {"enum": ["onnxruntime", "tensorrt"]},
        "backend_dir": DIRECTORY_NAME,
        "backend_description": {"type": "object"},
        "dtype": {"enum": ["fp32", "fp16", "bf16"]},
        "pruning": {"enum": ["function", "inline"]},
        "attention_blocks": POSITIVE,
        "k": {"anyOf": [{"type": "null"}, KEEP], "expect": "null, a count >= 1 or a fraction in (0, 1]"},
        # ModelFamily.dim_ranges: the derived dimensions' [min, opt, max] (visual_tokens, patches, pixels)
        "vision_dims": {"type": "object", "maxProperties": 16, "additionalProperties": SHAPE_RANGE},
        "layer_segment": {**LAYER_LIST, "minItems": 1, "expect": "a non-empty list of segment indices (integers >= 0)"},
        "graph_contract": {"type": "object", "required": ["graphs"]},
        "libraries": {"type": "object", "additionalProperties": SHORT_STRING},
        "build_seconds": NULLABLE_NUMBER,
        "validation": {
            "type": "object", "required": ["passed"],
            "properties": {"passed": {"type": "boolean"}, "agreement": {"type": "array", "items": NULLABLE_NUMBER},
                           "graphs": {"type": "object", "additionalProperties": {"type": "boolean"}}},
        },
        "complete": {"type": "boolean"},
        "files": {"type": "object", "minProperties": 1, "maxProperties": 10000,
                  "propertyNames": RELATIVE_PATH, "additionalProperties": FILE_ENTRY,
                  "expect": "an object of {relative path: {bytes, sha256}} (at least one file)"},
    },
}

_GRAPH_FILES = {"type": "object", "required": list(GRAPH_NAMES), "additionalProperties": False,
                "properties": {name: FILE_NAME for name in GRAPH_NAMES},
                "expect": f"an object naming the file of each graph ({', '.join(GRAPH_NAMES)})"}

#: The only provider option the ONNX Runtime backend writes. Provider options from a folder reach
#: native code (e.g. TensorRT EP's `trt_extra_plugin_lib_paths` loads libraries), so no other is taken.
_PROVIDER_NAME = {"type": "string", "pattern": r"^[A-Za-z][A-Za-z0-9]*ExecutionProvider\Z",
                  "expect": "an ONNX Runtime provider name (...ExecutionProvider)"}
_PROVIDER = {
    "anyOf": [
        _PROVIDER_NAME,
        {"type": "array", "minItems": 2, "maxItems": 2,
         "prefixItems": [_PROVIDER_NAME, {"type": "object", "additionalProperties": False,
                                          "properties": {"gpu_mem_limit": {"type": "string", "pattern": r"^[0-9]{1,20}\Z"}}}]},
    ],
    "expect": "a provider name, or [name, {\"gpu_mem_limit\": \"<bytes>\"}] (no other provider option is accepted)",
}

#: `onnxruntime/session.json` (backends.ort.build).
ORT_SESSION = {
    "type": "object",
    "required": ["backend", "providers", "graphs"],
    "properties": {
        "backend": {"const": "onnxruntime", "expect": "\"onnxruntime\""},
        "onnxruntime": SHORT_STRING,
        "providers": {"type": "array", "minItems": 1, "maxItems": 16, "items": _PROVIDER},
        "optimization_level_at_build": SHORT_STRING,
        "graphs": _GRAPH_FILES,
        "load_with": {"type": "string"},
    },
}

#: `tensorrt/tensorrt.json` (backends.trt.build). It names no library: the plugin library is the
#: one installed with capa-export (or named by the user), checked against library_sha256.
TENSORRT_ENGINE = {
    "type": "object",
    "required": ["backend", "graphs", "plugin", "embedded_plugins"],
    "additionalProperties": False,
    "properties": {
        "backend": {"const": "tensorrt", "expect": "\"tensorrt\""},
        "tensorrt": SHORT_STRING,
        "graphs": _GRAPH_FILES,
        "timing_cache": {"anyOf": [{"type": "null"}, FILE_NAME], "expect": "null or a plain file name"},
        "plugin": {"anyOf": [{"type": "null"},
                             {"type": "object", "required": ["name", "version", "namespace", "library_sha256"],
                              "additionalProperties": False,
                              "properties": {"name": SHORT_STRING, "version": SHORT_STRING, "namespace": SHORT_STRING,
                                             "library_sha256": SHA256}}],
                   "expect": "null or the plugin's {name, version, namespace, library_sha256} (no library path: "
                             "the plugin library is never taken from an engine folder)"},
        "embedded_plugins": {"type": "boolean"},
    },
}

#: `manifest.json` of a calibration folder (`capa-export calibrate`).
CALIBRATION_MANIFEST = {
    "type": "object",
    "required": ["artifact", "tool", "capa_config"],
    "properties": {
        "artifact": {"const": "calibration", "expect": "\"calibration\""},
        "tool": TOOL,
        "model": SHORT_STRING,
        "calibration_inputs": {"type": "array", "items": {"type": "string"}},
        "capa_config": CAPA_CONFIG,
        "ffn_errors": {"type": "object"},
    },
}

_LAYER_ERRORS = {"type": "object", "required": ["train", "heldout", "text"],
                 "properties": {k: NULLABLE_NUMBER for k in ("train", "heldout", "text")}}

#: `ffn_approx.json`, beside `ffn_approx.safetensors` (capa.ffn.FfnApproximation.save).
FFN_APPROXIMATION = {
    "type": "object",
    "required": ["format_version", "selected_layers", "errors", "fingerprint"],
    "properties": {
        "format_version": POSITIVE,
        "layout": {"type": "string"},
        "selected_layers": LAYER_LIST,
        "errors": {"type": "object", "maxProperties": 4096,
                   "propertyNames": {"type": "string", "pattern": r"^[0-9]{1,4}\Z", "expect": "a layer index"},
                   "additionalProperties": _LAYER_ERRORS},
        "fingerprint": {"type": "object"},
        "settings": {"type": "object"},
    },
}
