"""ONNX Runtime custom op `ai.onnx.contrib::CapaContribTopK` (onnxruntime-extensions PyOp, CPU).

Importing this module registers the op with onnxruntime-extensions; sessions see it when created
with `session_options_with_capa_ops()`. Node attributes (those of the TensorRT plugin):
k (int), variant (int: 0=contrib, 1=value_norm, 2=attention), plugin_version ("1"),
plugin_namespace ("capa").

Types: fp32 inputs only. The Python-op API of onnxruntime-extensions has no float16 (checked with
0.15.2: a dt_float16 op aborts the process with "Type float16 not supported by python customops
api") and keys ops by op_type, so one signature. fp16/bf16 graphs are validated by the CUDA op or
TensorRT; for ONNX Runtime on CPU, feed the node fp32 (a Cast before it) or use the plugin-free
lowering.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

from capa_export.method import scoring
from capa_export.ops import native
from capa_export.ops.spec import SPEC

OP_TYPE = SPEC.name
DOMAIN = "ai.onnx.contrib"  # onnxruntime-extensions serves Python ops in this domain only
PLUGIN_VERSION = SPEC.version
PLUGIN_NAMESPACE = SPEC.namespace
ATTRIBUTE_TYPES = {
    "k": PyCustomOpDef.dt_int64,
    "variant": PyCustomOpDef.dt_int64,
    "plugin_version": PyCustomOpDef.dt_string,
    "plugin_namespace": PyCustomOpDef.dt_string,
}


def contrib_topk_numpy(probs: np.ndarray, values: np.ndarray, o_weight: np.ndarray, k: int, variant: int | str) -> np.ndarray:
    """The op on host arrays: the C++ reference when built, else the Python reference. int32 [B, k]."""
    name = native.variant_name(variant)
    tensors = [torch.from_numpy(np.ascontiguousarray(x)) for x in (probs, values, o_weight)]
    # Validate like every other implementation (ValueError naming the argument).
    from capa_export.ops.torch_op import validate_inputs

    validate_inputs(*tensors, int(k), name)
    if native.available():
        return np.asarray(native.module().contrib_topk_cpu(*tensors, int(k), native.variant_code(name)))
    return scoring.contrib_topk(*tensors, int(k), name).numpy()


@onnx_op(
    op_type=OP_TYPE,
    domain=DOMAIN,
    inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float, PyCustomOpDef.dt_float],
    outputs=[PyCustomOpDef.dt_int32],
    attrs=ATTRIBUTE_TYPES,
)
def capa_contrib_topk(probs, values, o_weight, **attrs):
    if "k" not in attrs:
        raise ValueError(f"{OP_TYPE} node has no attribute k")
    return contrib_topk_numpy(probs, values, o_weight, int(attrs["k"]), int(attrs.get("variant", 0)))


def session_options_with_capa_ops(options: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """SessionOptions with onnxruntime-extensions' library (which serves the Python ops) registered."""
    options = options or ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return options


def make_contrib_topk_node(
    inputs: list[str], output: str, k: int, variant: str | int = "contrib", name: str | None = None
):
    """An onnx NodeProto of the op with the plugin's attributes (for tests and hand-made graphs)."""
    from onnx import helper

    return helper.make_node(
        OP_TYPE,
        inputs,
        [output],
        name=name or OP_TYPE,
        domain=DOMAIN,
        k=int(k),
        variant=native.variant_code(variant),
        plugin_version=PLUGIN_VERSION,
        plugin_namespace=PLUGIN_NAMESPACE,
    )
