"""Export, engines, validation and the runtime on the embedded default (ONNX Runtime, CPU).

Independent references: the CapaModel (itself tested against HF), HF `generate`, and the ONNX
files read back with `onnx` (not through our exporter's own bookkeeping)."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from capa_export import CapaConfig, apply_capa
from capa_export.pipeline import build
from capa_export.inputs import builtin_samples, encode, synthetic_image
from capa_export.method.ffn import FfnApproximation
from capa_export.export.exporter import export_model
from capa_export.models import adapter_for
from capa_export.ops.spec import SPEC
from capa_export.runtime import CapaEngine
from capa_export.export.graphs import graph_inputs
from capa_export.validate import to_feed


def fresh_batch(processor, adapter):
    """Two different pictures and prompts, neither used by the exporter or the validation."""
    prompts = [adapter.prompt_with_image(processor, q) for q in ("What is it?", "Which colours are there?")]
    return processor(images=[synthetic_image(2, seed=11), synthetic_image(4, seed=12)], text=prompts,
                     return_tensors="pt", padding=True)


def prefill_feed(capa, batch):
    contract = capa.family.graph_contract(capa.layer_segments())
    return to_feed(contract["prefill"], graph_inputs(capa, batch)["prefill"], "fp32")


def test_build_validates_and_marks_complete(cpu_engine):
    path, report = cpu_engine
    manifest = json.loads((path / "manifest.json").read_text())
    assert report["passed"] and manifest["complete"]
    assert all(e["agreement"] == 1.0 for e in report["end_to_end"])
    assert set(report["graphs"]) == {"vision", "embed", "prefill", "decode"}
    for name, entry in manifest["files"].items():
        assert (path / name).stat().st_size == entry["bytes"]


def test_one_graph_holds_the_op_as_a_local_function(cpu_engine):
    """One CapaContribTopK node whose op_type, domain and attributes are the plugin creator's
    (the creator's fields are checked against the same YAML manifest in test_op_spec.py), and the
    local function it calls."""
    path, _ = cpu_engine
    model = onnx.load(str(path / "onnx" / "prefill.onnx"), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == "CapaContribTopK"]
    assert len(nodes) == 1 and nodes[0].domain == "capa" == SPEC.onnx_domain == SPEC.namespace
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert set(SPEC.attributes) == {"k", "variant", "plugin_version", "plugin_namespace"}
    assert set(attrs) == set(SPEC.attributes) | {"tensorrt_plugin_shape_input_indices"}
    assert attrs["k"] == 64 and attrs["variant"] == 0 and attrs["tensorrt_plugin_shape_input_indices"] == [3]
    assert attrs["plugin_version"] == b"2" and attrs["plugin_namespace"] == b"capa"
    assert len(nodes[0].input) == 4 == len(SPEC.inputs)  # probs, values, o_weight and k (a constant here)
    (function,) = model.functions
    assert (function.domain, function.name) == ("capa", "CapaContribTopK")
    assert set(function.attribute) == set(SPEC.attributes) and "TopK" in {n.op_type for n in function.node}
    # the weights reach the node in the graph's dtype (no fp32 copy of W_O): one o_proj initializer, used
    # by the layer's projection and by the node
    assert nodes[0].input[2].endswith("o_proj.weight")
    onnx.checker.check_model(str(path / "onnx" / "prefill.onnx"), full_check=True)


def test_polygraphy_inspect_shows_the_op_node_and_its_opset(cpu_engine):
    import subprocess
    import sys

    path, _ = cpu_engine
    polygraphy = Path(sys.executable).with_name("polygraphy")  # the console script installed beside python
    result = subprocess.run([str(polygraphy), "inspect", "model", str(path / "onnx" / "prefill.onnx"), "--show", "layers"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-500:]
    # Polygraphy 0.53 lists the node and the function's opset (it does not print function bodies)
    assert "[Op: CapaContribTopK]" in result.stdout and "Other Opsets: {'capa': 1}" in result.stdout


@pytest.mark.parametrize("lowering", ["function", "inline"])
def test_both_lowerings_match_the_capa_model(llava, cpu_engine, tmp_path, lowering):
    model, processor = llava
    path, _ = cpu_engine
    config = CapaConfig.load(path / "calibration")
    approx = FfnApproximation.load(path / "calibration", model)
    if lowering == "function":
        prefill = path / "onnx" / "prefill.onnx"
    else:
        export_model(model, processor, config, approx, tmp_path / "onnx", pruning="inline", progress=False,
                     graphs=("prefill",))
        prefill = tmp_path / "onnx" / "prefill.onnx"
        inlined = onnx.load(str(prefill), load_external_data=False)
        ops = {n.op_type for n in inlined.graph.node}
        assert "CapaContribTopK" not in ops and "TopK" in ops and not inlined.functions
    capa = apply_capa(model, config, approx)
    batch = fresh_batch(processor, capa.adapter)
    session = ort.InferenceSession(str(prefill), providers=["CPUExecutionProvider"])
    logits, keep = session.run(["logits", "keep_indices"], prefill_feed(capa, batch))
    expected = capa(**batch, last_logits_only=True)
    assert keep.tolist() == expected.keep_indices.tolist()
    np.testing.assert_allclose(logits, expected.logits[:, -1].numpy(), rtol=1e-4, atol=1e-4)


def test_layers_before_pruning_attend_in_query_blocks(cpu_engine):
    """The cpu profile's attention_blocks: each layer that sees the whole prompt before the scoring
    layer holds that many Attention nodes (blocks of query rows); the scoring layer (its kept rows
    over every key) and every later layer one; recorded in the manifest."""
    path, _ = cpu_engine
    manifest = json.loads((path / "manifest.json").read_text())
    blocks, first_stage = manifest["attention_blocks"], manifest["capa_config"]["prune"][0][0]
    assert blocks == manifest["profile"]["attention_blocks"] == 8
    graph = onnx.load(str(path / "onnx" / "prefill.onnx"), load_external_data=False)
    layers = manifest["model"]["num_layers"]
    attention = [n for n in graph.graph.node if n.op_type == "Attention"]
    assert len(attention) == blocks * (first_stage - 1) + (layers - first_stage + 1)


def test_prefill_cache_equals_the_capa_model_on_every_position(llava, cpu_engine):
    """A left-padded batch through the engine's prefill (attention in query blocks before pruning):
    every layer's KV cache equals the CapaModel's at every position, padding positions included
    (a padding row's attention sees itself only, whatever block of keys the runtime is given)."""
    model, processor = llava
    path, _ = cpu_engine
    capa = apply_capa(model, CapaConfig.load(path / "calibration"), FfnApproximation.load(path / "calibration", model))
    batch = fresh_batch(processor, capa.adapter)
    assert batch["attention_mask"][0, 0] == 0  # the first prompt is shorter: left-padded
    session = ort.InferenceSession(str(path / "onnx" / "prefill.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs() if o.name.startswith("present.")]
    outputs = dict(zip(names, session.run(names, prefill_feed(capa, batch))))
    expected = graph_inputs(capa, batch)["decode"]
    for name in names:
        reference = expected[name.replace("present.", "past.")].numpy()
        np.testing.assert_allclose(outputs[name], reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max(), err_msg=name)


def test_folded_ffn_weights_are_in_the_prefill_graph(llava, cpu_engine):
    model, _ = llava
    path, _ = cpu_engine
    approx = FfnApproximation.load(path / "calibration", model)
    layers = json.loads((path / "calibration" / "capa_config.json").read_text())["ffn_layers"]
    assert layers, "the default calibration approximates some layers"
    graph = onnx.load(str(path / "onnx" / "prefill.onnx"))
    arrays = [numpy_helper.to_array(t) for t in graph.graph.initializer]
    for layer in layers:
        folded = approx.layers[layer].weight.numpy()
        assert any(a.shape == folded.shape and np.array_equal(a, folded) for a in arrays), layer


def test_weights_are_stored_once(cpu_engine):
    path, _ = cpu_engine
    directory = path / "onnx"
    spans = {}
    for name in ("vision", "embed", "prefill", "decode"):
        graph = onnx.load(str(directory / f"{name}.onnx"), load_external_data=False).graph
        spans[name] = {(e["offset"], e["length"]) for e in
                       ({x.key: x.value for x in t.external_data} for t in graph.initializer) if e}
        assert all(loc == "weights.data" for t in graph.initializer for x in t.external_data if x.key == "location"
                   for loc in [x.value])
    decoder_bytes = sum(int(length) for _, length in spans["decode"])
    shared = sum(int(length) for span in spans["decode"] & spans["prefill"] for length in [span[1]])
    assert shared > 0.95 * decoder_bytes  # the decode graph reuses the prefill graph's weights
    distinct = sum(int(length) for _, length in set().union(*spans.values()))
    stored = (directory / "weights.data").stat().st_size
    assert distinct <= stored < distinct + 64 * len(set().union(*spans.values())) + 1  # each once (+ alignment)
    for name in ("vision", "embed", "prefill", "decode"):
        onnx.checker.check_model(str(directory / f"{name}.onnx"), full_check=True)


def test_engine_decoding_equals_hf_generate_without_pruning(llava, tmp_path):
    model, processor = llava
    CapaConfig(prune=[], ffn_layers=[]).save(tmp_path)
    path, report = build("tiny-llava-random", "cpu", out=tmp_path / "plain", calibration_dir=str(tmp_path), progress=False,
                                log=lambda *_: None)
    assert report["passed"]
    adapter = adapter_for(model)
    batch = encode(adapter, processor, builtin_samples(1, seed=21)[0])
    with torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1]:]
    with CapaEngine(path) as engine:
        tokens, keep, _ = engine.generate_ids(batch, max_new_tokens=6)
    assert tokens.tolist() == expected.tolist()
    assert keep.shape == (1, 576)


def test_fp16_edge_engine_validates(tmp_path):
    path, report = build("tiny-llava-random", "edge", out=tmp_path / "edge", progress=False, log=lambda *_: None)
    assert report["passed"] and report["dtype"] == "fp16"
    graph = onnx.load(str(path / "onnx" / "prefill.onnx"), load_external_data=False).graph
    assert {i.name: i.type.tensor_type.elem_type for i in graph.input}["inputs_embeds"] == onnx.TensorProto.FLOAT16


def test_runtime_generate_streams_and_times(cpu_engine):
    path, _ = cpu_engine
    pieces = []
    with CapaEngine(path) as engine:
        result = engine.generate(synthetic_image(0), "What is in the picture?", max_new_tokens=5, stream=pieces.append)
    assert len(result.tokens) == 5 and len(pieces) == 5  # one streamed piece per token
    assert len(result.keep_indices) == 64 and result.keep_indices == sorted(result.keep_indices)
    assert {"vision", "prefill", "decode_per_token", "time_to_first_token"} <= set(result.timings)


def test_a_batch_answers_as_each_input_alone(cpu_engine):
    """Left-padded batch of prompts of different lengths and images: every row's tokens and kept
    visual tokens equal the same input run alone (the KV cache kept in ONNX Runtime between steps)."""
    path, _ = cpu_engine
    images = [synthetic_image(1, seed=5), synthetic_image(2, seed=6), synthetic_image(3, seed=7)]
    questions = ["What?", "What is in the picture? Answer in detail, please.", "Colours?"]
    with CapaEngine(path) as engine:
        together = engine.generate_batch(images, questions, max_new_tokens=6)
        alone = [engine.generate(image, question, max_new_tokens=6) for image, question in zip(images, questions)]
    for row, single in zip(together, alone):
        assert row.tokens == single.tokens and row.keep_indices == single.keep_indices and row.text == single.text
        assert row.prompt_tokens == single.prompt_tokens


def test_streamed_text_is_the_answer(cpu_engine):
    path, _ = cpu_engine
    pieces = []
    with CapaEngine(path) as engine:
        result = engine.generate(synthetic_image(4), "Describe it.", max_new_tokens=8, stream=pieces.append)
    assert "".join(pieces) == result.text


def test_validation_gives_the_model_back_before_an_engine_session_opens(cpu_engine, monkeypatch):
    """The fp32 reference and the engine's sessions are never in memory together (a build peaked at
    3x the weight bytes when they were): by the time validation opens any engine session, the model
    handed to it is gone, and the validation still passes."""
    import gc
    import weakref

    import capa_export.backends.ort as ort_backend
    from capa_export.models import load_model
    from capa_export.pipeline import ReferenceModel, validate_engine

    path, _ = cpu_engine
    model, processor = load_model("tiny-llava-random", "fp32")
    model_alive = weakref.ref(model)
    reference = ReferenceModel(model, processor)
    del model
    alive_at_open = []
    load_session = ort_backend.load_session

    def recording_load_session(*args, **kwargs):
        gc.collect()
        alive_at_open.append(model_alive() is not None)
        return load_session(*args, **kwargs)

    monkeypatch.setattr(ort_backend, "load_session", recording_load_session)
    report = validate_engine(path, reference, write=False)
    assert report["passed"]
    assert len(alive_at_open) == 8  # four graphs one at a time, then the engine's four
    assert not any(alive_at_open)


def test_export_keeps_no_reference_to_the_model_weights(tmp_path):
    """Once export returns and the model is deleted, none of its parameters stays alive: onnxscript's
    rewrite rules kept the last exported graph, which wraps the parameters (measured: a mid-size
    build held ~2.7 GB of weights of a deleted model through its later stages)."""
    import gc
    import weakref

    from capa_export.models import load_model

    model, processor = load_model("tiny-llava-random", "fp32")
    weights = [weakref.ref(p) for p in model.parameters()]
    export_model(model, processor, CapaConfig(prune=[(2, 64)]), None, tmp_path / "onnx", progress=False,
                 graphs=("embed", "prefill"))
    del model
    gc.collect()
    assert sum(w() is not None for w in weights) == 0
