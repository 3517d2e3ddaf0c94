"""`CapaContribTopK` as an ONNX local function: one prefill graph for every runtime.

The exported prefill graph holds one node `capa::CapaContribTopK` (op_type = the TensorRT plugin's
name, domain = its namespace, attributes = the creator's fields, from the op's YAML manifest) and,
in the model's `functions`, a FunctionProto of that name whose body computes the same selection with
standard ops:

- ONNX Runtime inlines the function and runs the body (no custom-op library);
- TensorRT >= 10.7 with the plugin library loaded runs the plugin instead of the body ("prioritizes
  using plugins over local functions when a corresponding plugin is available in the registry";
  since 10.10 the plugin's namespace is read from the node's domain);
- TensorRT without the plugin imports the body.

The body is the variant the graph was exported with (the node's `variant` attribute names it for the
plugin; `check_node` verifies they agree). It computes in fp32 whatever the graph's dtype (the one
fp32 constant it adds, W_O^T W_O, is [H*d, H*d]: 4 MiB at H*d = 1024, 64 MiB at 4096):

    contrib     G_j[h, h'] = v_j^h (W_O^h W_O^h'^T) v_j^h'^T per key [B, N, H, H], from the constant
                M = W_O^T W_O [H*d, H*d] (fp32; runtimes fold it at build): Y = v M per head
                [B, H, N, H*d], G = sum over d of Y * v; c_ij^2 = a_ij^T G_j a_ij;
                scores = sum_i sqrt(max(c_ij^2, 0))
    value_norm  scores = sum_{h,i} a_ij^h ||v_j^h||
    attention   scores = sum_{h,i} a_ij^h
    then TopK(k) (ties to the lower index, as ONNX specifies), the kept indices sorted ascending
    (a second TopK), int32 [B, k] as the plugin returns.

k is the node's fourth input (int64 [1]): a constant for a count keep (the `k` attribute then holds
the same count, a build-time constant for the plugin), computed from N inside the graph for a
keep fraction (the attribute is then 0 and the plugin reads k as a TensorRT shape input).

Why the constant-M form of the Gram product: the per-head product U = v W_O is [B, H, N, D] and
its per-key Gram needs it as [B, N, H, D] and [B, N, D, H], two transposes of the largest tensor of
the body (measured with ONNX Runtime 1.32 on 2 cores, 2026-11-25: the body took 56 ms at N=576 and
228 ms at N=2880 with them, 34 / 140 ms in this form; Einsum was slower still). Here the large
intermediate Y is reduced where it lies and only the small G [B, H, N, H] is transposed.

Limits of the body (not of the plugin): TopK's k <= 3840 on TensorRT; the Y intermediate is
B*H*N*H*d elements.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from .spec import SPEC

#: the op's inputs: probs, values, o_weight, k
INPUTS = tuple(SPEC.inputs)

#: lowest opset of the function body (TopK with k as an input, Shape with start/end); a model
#: gets the body at its own default-domain opset (a function's imports must agree with the model's)
BODY_OPSET = 18


class _Body:
    """Collects a function body's nodes with generated value names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def __call__(self, op: str, inputs: list[str], outputs: int = 1, **attrs) -> list[str] | str:
        names = [f"_{op.lower()}{self._count}_{i}" for i in range(outputs)]
        self._count += 1
        self.nodes.append(helper.make_node(op, inputs, names, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, values: list[int]) -> str:
        return self("Constant", [], value=helper.make_tensor(f"c{self._count}", TensorProto.INT64, [len(values)], values))

    def attribute_int(self, name: str) -> str:
        """A [1] int64 tensor holding the node's INT attribute `name`."""
        node = helper.make_node("Constant", [], [f"_attr_{name}"], value_int=0)
        node.attribute[0].ref_attr_name = name
        node.attribute[0].ClearField("i")
        self.nodes.append(node)
        return self("Unsqueeze", [f"_attr_{name}", self.const([0])])

    def dim(self, tensor: str, axis: int) -> str:
        return self("Shape", [tensor], start=axis, end=axis + 1)


def _expand_kv_heads(body: _Body, values: str, heads: str) -> str:
    """[B, H_kv, N, d] -> [B, H, N, d], head h reading kv head h // (H / H_kv) (grouped-query)."""
    group = body("Div", [heads, body.dim(values, 1)])
    one = body.const([1])
    expanded = body("Expand", [body("Unsqueeze", [values, body.const([2])]),
                               body("Concat", [one, one, group, one, one], axis=0)])
    return body("Reshape", [expanded, body("Concat", [body.const([0]), heads, body.const([-1]),
                                                      body.dim(values, 3)], axis=0)])


def _scores(body: _Body, variant: str) -> str:
    """fp32 [B, N] scores from probs [B, H, Q, N], values [B, H_kv, N, d], o_weight [D, H*d]."""
    probs32 = body("Cast", ["probs"], to=TensorProto.FLOAT)
    if variant == "attention":
        return body("ReduceSum", [probs32, body.const([1, 2])], keepdims=0)
    heads = body.dim("probs", 1)
    values = _expand_kv_heads(body, "values", heads)
    if variant == "value_norm":
        v32 = body("Cast", [values], to=TensorProto.FLOAT)
        norms = body("Sqrt", [body("ReduceSum", [body("Mul", [v32, v32]), body.const([-1])], keepdims=0)])
        weighted = body("Mul", [probs32, body("Unsqueeze", [norms, body.const([2])])])
        return body("ReduceSum", [weighted, body.const([1, 2])], keepdims=0)
    # M = W_O^T W_O, rows grouped by head: M_rows[h] = W_O^h^T W_O [d, H*d] (constant: folded at build)
    head_dim = body.dim("values", 3)
    w32 = body("Cast", ["o_weight"], to=TensorProto.FLOAT)  # [D, H*d]
    m = body("MatMul", [body("Transpose", [w32], perm=[1, 0]), w32])  # [H*d, H*d]
    m_rows = body("Reshape", [m, body("Concat", [heads, head_dim, body.const([-1])], axis=0)])  # [H, d, H*d]
    v32 = body("Cast", [values], to=TensorProto.FLOAT)  # [B, H, N, d]
    y = body("MatMul", [v32, m_rows])  # [B, H, N, H*d]: y[h, j, (h', e)] = v_j^h M_hh'[:, e]
    y_heads = body("Reshape", [y, body("Concat", [body.const([0, 0, 0]), heads, head_dim], axis=0)])  # [B, H, N, H', d]
    v_keys = body("Unsqueeze", [body("Transpose", [v32], perm=[0, 2, 1, 3]), body.const([1])])  # [B, 1, N, H', d]
    gram_heads = body("ReduceSum", [body("Mul", [y_heads, v_keys]), body.const([-1])], keepdims=0)  # [B, H, N, H']
    gram = body("Transpose", [gram_heads], perm=[0, 2, 1, 3])  # [B, N, H, H']
    a_keys = body("Transpose", [probs32], perm=[0, 3, 2, 1])  # [B, N, Q, H]
    quad = body("ReduceSum", [body("Mul", [body("MatMul", [a_keys, gram]), a_keys]), body.const([-1])], keepdims=0)
    zero = body("Constant", [], value=helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]))
    return body("ReduceSum", [body("Sqrt", [body("Max", [quad, zero])]), body.const([-1])], keepdims=0)


def make_function(variant: str, opset: int = BODY_OPSET) -> onnx.FunctionProto:
    """The FunctionProto `capa::CapaContribTopK` whose body selects by `variant`."""
    if variant not in SPEC.variants:
        raise ValueError(f"variant {variant!r} is unknown; expected one of {', '.join(SPEC.variants)}")
    body = _Body()
    scores = _scores(body, variant)
    k = INPUTS[3]
    _, top = body("TopK", [scores, k], outputs=2, axis=-1, largest=1, sorted=1)  # ties: lower index first
    ascending, _ = body("TopK", [top, k], outputs=2, axis=-1, largest=0, sorted=1)
    body.nodes.append(helper.make_node("Cast", [ascending], [SPEC.outputs[0]], to=TensorProto.INT32))
    return helper.make_function(SPEC.onnx_domain, SPEC.name, list(INPUTS), list(SPEC.outputs), body.nodes,
                                [helper.make_opsetid("", opset)], attributes=list(SPEC.attributes))


def node_attributes(k: int, variant: str) -> dict:
    """The node's attributes: the plugin creator's fields (k: the count when it is a build-time
    constant, 0 when it comes from the k input), and for TensorRT's ONNX parser the list of inputs
    it passes to the plugin as shape inputs (k). The parser hands the creator only its own fields;
    the function body does not use the extra attribute, which ONNX allows on a function call."""
    attributes = {"k": int(k), "variant": SPEC.variants[variant], "plugin_version": SPEC.version,
                  "plugin_namespace": SPEC.namespace}
    if SPEC.shape_input_attribute:
        attributes[SPEC.shape_input_attribute] = list(SPEC.shape_input_indices)
    return attributes


def make_node(inputs: list[str], output: str, k: int, variant: str = "contrib", name: str | None = None):
    return helper.make_node(SPEC.name, inputs, [output], name=name or SPEC.name, domain=SPEC.onnx_domain,
                            **node_attributes(k, variant))


def is_op_node(node: onnx.NodeProto) -> bool:
    return node.op_type == SPEC.name and node.domain == SPEC.onnx_domain


def variant_of(node: onnx.NodeProto) -> str:
    code = next(a.i for a in node.attribute if a.name == "variant")
    return next(name for name, c in SPEC.variants.items() if c == code)


def attach_function(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give a model holding CapaContribTopK nodes the local function they call (one variant per
    model: a graph is exported with one) and the opset import of its domain."""
    variants = {variant_of(n) for n in model.graph.node if is_op_node(n)}
    if not variants:
        return model
    if len(variants) > 1:
        raise ValueError(f"one prefill graph scores with one variant; found {sorted(variants)}")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), BODY_OPSET)
    del model.functions[:]
    model.functions.append(make_function(variants.pop(), max(opset, BODY_OPSET)))
    if not any(o.domain == SPEC.onnx_domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(SPEC.onnx_domain, 1))
    return model


def single_op_model(k: int, variant: str, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """A model of one CapaContribTopK node (dynamic B, H, Q, N, d, D; k a constant), for tests and tools."""
    names = list(INPUTS)
    inputs = [helper.make_tensor_value_info(names[0], dtype, ["B", "H", "Q", "N"]),
              helper.make_tensor_value_info(names[1], dtype, ["B", "H_kv", "N", "d"]),
              helper.make_tensor_value_info(names[2], dtype, ["D", "Hd"])]
    output = helper.make_tensor_value_info(SPEC.outputs[0], TensorProto.INT32, ["B", k])
    k_value = helper.make_tensor(names[3], TensorProto.INT64, [1], [k])
    graph = helper.make_graph([make_node(names, SPEC.outputs[0], k, variant)], "capa_contrib_topk", inputs, [output],
                              initializer=[k_value])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", BODY_OPSET)])
    return attach_function(model)
