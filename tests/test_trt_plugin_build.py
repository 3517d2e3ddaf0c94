"""The TensorRT plugin libraries in a real TensorRT: load them both ways, build a one-node network, compare.

Skipped unless `tensorrt` is importable and the plugin libraries have been built (CMake targets
capa_contrib_topk_plugin / capa_contrib_topk_plugin_autoreg, see plugins/contrib_topk/README.md);
the engine tests also need a GPU. Never run in this repository's CI (no TensorRT there): this file
is for a developer machine with TensorRT. tests/test_plugin_glue.py covers what can be checked
without a TensorRT runtime.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from capa_export.ops import native, spec

REPO = Path(__file__).resolve().parent.parent
TORCH_TO_ONNX = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16}  # onnx.TensorProto codes
VC_LIBRARY = "libcapa_contrib_topk_plugin.so"  # getCreators: loadLibrary, plugins_to_serialize
AUTOREG_LIBRARY = "libcapa_contrib_topk_plugin_autoreg.so"  # registers itself under ctypes.CDLL


def plugin_library_path(name: str = VC_LIBRARY) -> Path | None:
    """$CAPA_TRT_PLUGIN (the loadLibrary one), else a built library under the package or build/."""
    if name == VC_LIBRARY and os.environ.get("CAPA_TRT_PLUGIN"):
        return Path(os.environ["CAPA_TRT_PLUGIN"])
    candidates = [REPO / "capa_export" / name]
    candidates += [Path(p) for p in sorted(glob.glob(str(REPO / "build" / "**" / name), recursive=True))]
    return next((p for p in candidates if p.is_file()), None)


def _require_tensorrt(name: str = VC_LIBRARY) -> Path:
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("tensorrt not installed")
    lib = plugin_library_path(name)
    if lib is None:
        pytest.skip(f"{name} not built (configure with -DTensorRT_ROOT=..., or set CAPA_TRT_PLUGIN)")
    return lib


def _require_trt() -> Path:
    lib = _require_tensorrt()
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU (torch.cuda.is_available() is False)")
    return lib


def register_plugin(lib: Path) -> None:
    """IPluginRegistry::loadLibrary, once per process (a second load of a registered creator fails)."""
    import tensorrt as trt

    registry = trt.get_plugin_registry()
    if registry.get_creator(spec.OP_NAME, spec.PLUGIN_VERSION, spec.PLUGIN_NAMESPACE) is None:
        assert registry.load_library(str(lib)) is not None, f"load_library({lib}) failed"
    assert registry.get_creator(spec.OP_NAME, spec.PLUGIN_VERSION, spec.PLUGIN_NAMESPACE) is not None


def make_plugin_node(inputs: list[str], output: str, k: int, variant: str):
    """The plugin node as the exporter emits it: op_type and domain from the op's manifest; inputs
    probs, values, o_weight, k with k named a shape input (attribute k = 0: k is that input's value)."""
    from onnx import helper

    return helper.make_node(
        spec.OP_NAME, inputs, [output], name=spec.OP_NAME, domain=spec.ONNX_DOMAIN, k=int(k),
        variant=native.variant_code(variant), plugin_version=spec.PLUGIN_VERSION, plugin_namespace=spec.PLUGIN_NAMESPACE,
        **{spec.SHAPE_INPUT_ATTRIBUTE: list(spec.SHAPE_INPUT_INDICES)},
    )


def _k_input_nodes(k: int | None, n_divisor: int | None) -> list:
    """Nodes computing the int64 [1] tensor "k": the constant k, or N // n_divisor from probs' shape
    (integer arithmetic: TensorRT evaluates it as a shape tensor)."""
    from onnx import TensorProto, helper

    if n_divisor is None:
        return [helper.make_node("Constant", [], ["k"], value=helper.make_tensor("k_value", TensorProto.INT64, [1], [k]))]
    return [
        helper.make_node("Shape", ["probs"], ["n"], start=3, end=4),
        helper.make_node("Constant", [], ["n_divisor"],
                         value=helper.make_tensor("n_divisor_value", TensorProto.INT64, [1], [n_divisor])),
        helper.make_node("Div", ["n", "n_divisor"], ["k"]),
    ]


def run_plugin_engine(probs: torch.Tensor, values: torch.Tensor, o_weight: torch.Tensor, k: int, variant: str) -> np.ndarray:
    """Build a one-node CapaContribTopK engine from ONNX with Polygraphy and run it. int32 [B, k]."""
    return run_plugin_engine_shapes([(probs, values)], o_weight, variant, k=k)[0]


def run_plugin_engine_shapes(cases: list[tuple[torch.Tensor, torch.Tensor]], o_weight: torch.Tensor, variant: str,
                             k: int | None = None, n_divisor: int | None = None) -> list[np.ndarray]:
    """One engine whose profile spans every (probs, values) of `cases` (N may differ), run on each.
    k fixed (attribute and constant input) or, with `n_divisor`, computed in the graph as
    N // n_divisor (attribute k = 0). int32 [B, k] per case."""
    lib = _require_trt()
    from onnx import helper
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, TrtRunner

    register_plugin(lib)
    probs0, values0 = cases[0]
    elem = TORCH_TO_ONNX[probs0.dtype]
    graph = helper.make_graph(
        [*_k_input_nodes(k, n_divisor),
         make_plugin_node(["probs", "values", "o_weight", "k"], "keep", k=0 if n_divisor else k, variant=variant)],
        "capa_contrib_topk",
        [
            helper.make_tensor_value_info("probs", elem, ["B", probs0.shape[1], probs0.shape[2], "N"]),
            helper.make_tensor_value_info("values", elem, ["B", values0.shape[1], "N", values0.shape[3]]),
            helper.make_tensor_value_info("o_weight", elem, list(o_weight.shape)),
        ],
        [helper.make_tensor_value_info("keep", 6, ["B", "K" if n_divisor else k])],  # INT32
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(spec.ONNX_DOMAIN, 1)])
    profile = Profile()
    for name, index in (("probs", 0), ("values", 1)):
        shapes = sorted((tuple(case[index].shape) for case in cases), key=lambda shape: shape[0] * shape[2] * shape[3])
        profile.add(name, min=tuple(map(min, zip(*shapes))), opt=shapes[-1], max=tuple(map(max, zip(*shapes))))
    kept = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "contrib_topk.onnx")
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        engine = EngineFromNetwork(NetworkFromOnnxPath(path), config=CreateConfig(profiles=[profile]))
        with TrtRunner(engine) as runner:
            for probs, values in cases:
                out = runner.infer({"probs": probs.cuda(), "values": values.cuda(), "o_weight": o_weight.cuda()})["keep"]
                kept.append(out.cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out))
    return kept


@pytest.mark.parametrize("how", ["load_library", "ctypes_autoreg"])
def test_each_library_registers_the_creator_once(how: str) -> None:
    # A fresh interpreter per path: a registered creator stays registered for the process.
    lib = _require_tensorrt(VC_LIBRARY if how == "load_library" else AUTOREG_LIBRARY)
    load = (f"assert registry.load_library({str(lib)!r}) is not None" if how == "load_library"
            else f"import ctypes; ctypes.CDLL({str(lib)!r})")
    code = (
        "import tensorrt as trt\n"
        "registry = trt.get_plugin_registry()\n"
        f"{load}\n"
        f"assert registry.get_creator({spec.OP_NAME!r}, {spec.PLUGIN_VERSION!r}, {spec.PLUGIN_NAMESPACE!r}) is not None\n"
        "print('registered')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "registered" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("variant", ["contrib", "value_norm", "attention"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_plugin_engine_matches_reference(variant: str, dtype: torch.dtype) -> None:
    _require_trt()
    from capa_export.method.scoring import contrib_topk

    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(1, 8, 4, 96, generator=gen), dim=-1).to(dtype)
    values = torch.randn(1, 2, 96, 32, generator=gen).to(dtype)
    o_weight = (torch.randn(64, 8 * 32, generator=gen) / 16).to(dtype)
    kept = run_plugin_engine(probs, values, o_weight, 16, variant)
    expected = contrib_topk(probs, values, o_weight, 16, variant).numpy()
    # Same set unless a near-tie at the boundary: compare the kept scores then.
    if not np.array_equal(kept, expected):
        from capa_export.method.scoring import contribution_scores

        scores = contribution_scores(probs, values, o_weight, variant=variant)[0]
        np.testing.assert_allclose(
            np.sort(scores[kept[0]].numpy()), np.sort(scores[expected[0]].numpy()), rtol=1e-3
        )


@pytest.mark.parametrize("variant", ["attention", "contrib"])
def test_plugin_engine_k_computed_from_n(variant: str) -> None:
    # Version 2: attribute k = 0, input k = N // 6 computed in the graph (a shape input); one engine
    # over N in [60, 96] keeps N // 6 tokens at each N.
    _require_trt()
    from capa_export.method.scoring import contrib_topk

    gen = torch.Generator().manual_seed(1)
    o_weight = torch.randn(64, 8 * 32, generator=gen) / 16
    cases = []
    for n in (60, 96):
        probs = torch.softmax(torch.randn(2, 8, 4, n, generator=gen), dim=-1)
        cases.append((probs, torch.randn(2, 2, n, 32, generator=gen)))
    for (probs, values), kept in zip(cases, run_plugin_engine_shapes(cases, o_weight, variant, n_divisor=6)):
        n = probs.shape[-1]
        np.testing.assert_array_equal(kept, contrib_topk(probs, values, o_weight, n // 6, variant).numpy())
