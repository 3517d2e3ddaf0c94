"""The TensorRT plugin library: load it, build a one-node network through Polygraphy, compare.

Skipped unless `tensorrt` is importable, the plugin library has been built (CMake target
capa_contrib_topk_plugin, see plugins/contrib_topk/README.md) and a GPU is present. Never run in
this repository's CI (no TensorRT there): this file is for a developer machine with TensorRT.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TORCH_TO_ONNX = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16}  # onnx.TensorProto codes


def plugin_library_path() -> Path | None:
    """$CAPA_TRT_PLUGIN, else a built libcapa_contrib_topk_plugin.so under the package or build/."""
    if os.environ.get("CAPA_TRT_PLUGIN"):
        return Path(os.environ["CAPA_TRT_PLUGIN"])
    candidates = [REPO / "capa_export" / "libcapa_contrib_topk_plugin.so"]
    candidates += [Path(p) for p in sorted(glob.glob(str(REPO / "build" / "**" / "libcapa_contrib_topk_plugin.so"), recursive=True))]
    return next((p for p in candidates if p.is_file()), None)


def _require_trt() -> Path:
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("tensorrt not installed")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU (torch.cuda.is_available() is False)")
    lib = plugin_library_path()
    if lib is None:
        pytest.skip("libcapa_contrib_topk_plugin.so not built (configure with -DTensorRT_ROOT=..., or set CAPA_TRT_PLUGIN)")
    return lib


def run_plugin_engine(probs: torch.Tensor, values: torch.Tensor, o_weight: torch.Tensor, k: int, variant: str) -> np.ndarray:
    """Build a one-node CapaContribTopK engine from ONNX with Polygraphy and run it. int32 [B, k]."""
    lib = _require_trt()
    from onnx import helper
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, LoadPlugins, NetworkFromOnnxPath, Profile, TrtRunner

    from capa_export.ops import ort_op

    elem = TORCH_TO_ONNX[probs.dtype]
    graph = helper.make_graph(
        [ort_op.make_contrib_topk_node(["probs", "values", "o_weight"], "keep", k=k, variant=variant)],
        "capa_contrib_topk",
        [
            helper.make_tensor_value_info("probs", elem, ["B", probs.shape[1], probs.shape[2], "N"]),
            helper.make_tensor_value_info("values", elem, ["B", values.shape[1], "N", values.shape[3]]),
            helper.make_tensor_value_info("o_weight", elem, list(o_weight.shape)),
        ],
        [helper.make_tensor_value_info("keep", 6, ["B", k])],  # INT32
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ort_op.DOMAIN, 1)])
    profile = Profile()
    profile.add("probs", min=tuple(probs.shape), opt=tuple(probs.shape), max=tuple(probs.shape))
    profile.add("values", min=tuple(values.shape), opt=tuple(values.shape), max=tuple(values.shape))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "contrib_topk.onnx")
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        network = LoadPlugins(plugins=[str(lib)], obj=NetworkFromOnnxPath(path))
        engine = EngineFromNetwork(network, config=CreateConfig(profiles=[profile]))
        with TrtRunner(engine) as runner:
            feed = {"probs": probs.cuda(), "values": values.cuda(), "o_weight": o_weight.cuda()}
            out = runner.infer(feed)["keep"]
    return out.cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


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
