"""Serving with Triton Inference Server: the model repository `triton-repo` writes (checked against
Triton's own ModelConfig schema), request checks, and the real tritonserver of nvidia-pytriton
started by `capa-export serve` on the default engine, whose answers must equal CapaEngine.generate
on the same input alone. The server runs on free loopback ports, once per session, and is stopped
with SIGTERM (the last test checks that it exits cleanly and leaves no process behind)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capa_export.cli import main
from capa_export.errors import CapaError
from capa_export.inputs import synthetic_image
from capa_export.serving.requests import Request, decode_image, parse_request, plan_batches

HAS_CLIENT = importlib.util.find_spec("tritonclient") is not None
HAS_SERVER = importlib.util.find_spec("pytriton") is not None
needs_client = pytest.mark.skipif(not HAS_CLIENT, reason="tritonclient is not installed (pip install 'capa-export[serve]')")
needs_server = pytest.mark.skipif(not (HAS_CLIENT and HAS_SERVER),
                                  reason="tritonserver (nvidia-pytriton) or tritonclient is not installed "
                                         "(pip install 'capa-export[serve]')")
READY_TIMEOUT_S = 240
PROMPTS = ["What is in the picture?", "Describe the colours.", "How many shapes are there?",
           "Is there any text in the image?"]


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- without a server -----------------------------------------------------------------------------
def test_decode_image_refuses_bytes_that_are_no_image_in_one_line():
    with pytest.raises(CapaError, match=r"^image: 9 bytes in no format") as info:
        decode_image(b"not a png")
    assert "\n" not in str(info.value)
    truncated = encoded(synthetic_image(0))[:200]
    with pytest.raises(CapaError, match=r"^image: 200 bytes"):
        decode_image(truncated)
    with pytest.raises(CapaError, match=r"^image: 40 x 30 = 1200 pixels; at most 1000"):
        decode_image(encoded(Image.new("RGB", (40, 30))), max_pixels=1000)


def test_decode_image_gives_the_pixels_pil_reads():
    image = synthetic_image(3)
    assert np.array_equal(np.asarray(decode_image(encoded(image))), np.asarray(image.convert("RGB")))


@pytest.mark.parametrize("image, prompt, count, message", [
    (None, [[b"hi"]], [[4]], r"^image: missing"),
    ([[b"a"], [b"b"]], [[b"hi"]], [[4]], r"^image: shape \[2, 1\] holds 2 values"),
    ([[b"png"]], None, [[4]], r"^prompt: missing"),
    ([[b"png"]], [[b"\xff\xfe"]], [[4]], r"^prompt: not UTF-8"),
    ([[b"png"]], [[b"  "]], [[4]], r"^prompt: empty"),
    ([[b"png"]], [[b"hi"]], [[0]], r"^max_new_tokens: 0; ask for at least 1"),
    ([[b"png"]], [[b"hi"]], [[-3]], r"^max_new_tokens: -3"),
])
def test_parse_request_names_the_bad_input(image, prompt, count, message):
    as_array = lambda v, t: None if v is None else np.array(v, dtype=t)  # noqa: E731
    with pytest.raises(CapaError, match=message):
        parse_request(as_array(image, object), as_array(prompt, object), as_array(count, np.int32))


def test_parse_request_defaults_the_new_token_count():
    data = encoded(synthetic_image(1))
    request = parse_request(np.array([[data]], dtype=object), np.array([["Say hi".encode()]], dtype=object), None,
                            default_max_new_tokens=7)
    assert (request.prompt, request.max_new_tokens) == ("Say hi", 7)


def test_plan_batches_groups_by_new_token_count_in_arrival_order():
    counts = [4, 6, 4, 4, 6, 4, 4, 4]
    requests = [Request(None, "q", n) for n in counts]
    plan = plan_batches(requests, max_batch=3)
    # brute force: every index once; each run one count, at most 3, indices increasing
    assert sorted(i for run in plan for i in run) == list(range(len(counts)))
    for run in plan:
        assert len({counts[i] for i in run}) == 1 and 1 <= len(run) <= 3 and run == sorted(run)
    assert len(plan) == 3  # six 4s in two runs of three, two 6s in one


@needs_client
def test_triton_repo_config_is_a_valid_triton_model_config(cpu_engine, tmp_path, capsys):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    engine, _ = cpu_engine
    assert main(["triton-repo", str(engine), str(tmp_path / "repo"), "--instances", "2", "--max-batch", "3",
                 "--max-queue-delay-us", "700", "--threads", "1", "--max-new-tokens", "9", "--stream"]) == 0
    assert "tested with Triton 2.51.0" in capsys.readouterr().out
    config = text_format.Parse((tmp_path / "repo/capa/config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == ("capa", "python", 3)
    assert config.dynamic_batching.max_queue_delay_microseconds == 700
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    types = {i.name: (i.data_type, list(i.dims)) for i in config.input}
    assert types == {"image": (model_config_pb2.TYPE_STRING, [1]), "prompt": (model_config_pb2.TYPE_STRING, [1]),
                     "max_new_tokens": (model_config_pb2.TYPE_INT32, [1])}
    assert [o.name for o in config.output] == ["text", "tokens", "keep_indices", "prompt_tokens", "timings",
                                               "batch_size"]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params == {"engine_dir": str(Path(engine).resolve()), "default_max_new_tokens": "9", "threads": "1"}
    assert "capa_export.serving.triton_model" in (tmp_path / "repo/capa/1/model.py").read_text()
    stream = text_format.Parse((tmp_path / "repo/capa_stream/config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (stream.name, stream.max_batch_size, stream.model_transaction_policy.decoupled) == ("capa_stream", 0, True)
    assert {k: v.string_value for k, v in stream.parameters.items()} == params


@pytest.mark.parametrize("extra, message", [
    (["--max-batch", "99"], "max_batch=99: the engine's profile runs batches of 1 to"),
    (["--instances", "0"], "instances=0 must be >= 1"),
    (["--max-new-tokens", "0"], "default_max_new_tokens=0 must be >= 1"),
])
def test_triton_repo_refuses_bad_options_in_one_line(cpu_engine, tmp_path, capsys, extra, message):
    engine, _ = cpu_engine
    assert main(["triton-repo", str(engine), str(tmp_path / "repo"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "repo").exists()


def test_triton_repo_refuses_an_occupied_folder_and_a_bad_engine(cpu_engine, tmp_path, capsys):
    engine, _ = cpu_engine
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/keep.txt").write_text("mine")
    assert main(["triton-repo", str(engine), str(tmp_path / "busy")]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "busy/keep.txt").read_text() == "mine"
    assert main(["triton-repo", str(tmp_path / "nowhere"), str(tmp_path / "repo")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# --- the real server ------------------------------------------------------------------------------
class Served:
    def __init__(self, process, http_port, grpc_port, log):
        self.process, self.http_port, self.grpc_port, self.log = process, http_port, grpc_port, log

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="session")
def served(cpu_engine, signing_keys, tmp_path_factory):
    """`capa-export serve` on the default engine (signature checked), started once on free loopback ports."""
    engine, _ = cpu_engine
    http_port, grpc_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-m", "capa_export.cli", "serve", str(engine), "--http-port", str(http_port),
               "--grpc-port", str(grpc_port), "--metrics-port", "0", "--trust", str(signing_keys[1]),
               "--max-queue-delay-us", "20000", "--max-new-tokens", "6", "--stream",
               "--ready-timeout", str(READY_TIMEOUT_S)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Served(process, http_port, grpc_port, log)
    deadline = time.monotonic() + READY_TIMEOUT_S + 10
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"capa-export serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"capa-export serve not ready after {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def reference(cpu_engine):
    from capa_export.runtime import CapaEngine

    with CapaEngine(cpu_engine[0]) as engine:
        yield engine


def http_inputs(client_module, image: bytes | None, prompt: str, count: int | None):
    inputs = []
    for name, value, kind in (("image", image, "BYTES"), ("prompt", prompt.encode(), "BYTES"),
                              ("max_new_tokens", count, "INT32")):
        if value is None:
            continue
        tensor = client_module.InferInput(name, [1, 1], kind)
        tensor.set_data_from_numpy(np.array([[value]], dtype=object if kind == "BYTES" else np.int32))
        inputs.append(tensor)
    return inputs


def expect_equal(result, generation, tag):
    assert result.as_numpy("text")[0, 0].decode() == generation.text, tag
    assert result.as_numpy("tokens")[0].tolist() == generation.tokens, tag
    assert result.as_numpy("keep_indices")[0].tolist() == generation.keep_indices, tag
    assert int(result.as_numpy("prompt_tokens")[0, 0]) == generation.prompt_tokens, tag


def success_count(client) -> int:
    stats = client.get_inference_statistics("capa")["model_stats"][0]["inference_stats"]
    return int(stats["success"]["count"])


@pytest.mark.slow
@needs_server
def test_sixteen_concurrent_requests_equal_the_engine_alone(served, reference):
    import queue

    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    cases = []
    for i in range(16):  # different images (PNG and JPEG bytes) and prompts; two new-token counts
        data = encoded(synthetic_image(i, seed=i), "JPEG" if i % 5 == 4 else "PNG")
        cases.append((data, PROMPTS[i % len(PROMPTS)] + f" ({i})", 4 if i % 3 else 7))
    http = httpclient.InferenceServerClient(f"127.0.0.1:{served.http_port}", concurrency=16, network_timeout=300)
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    before = success_count(http)
    # twelve over HTTP (tritonclient.http is gevent based: concurrency through async_infer) and
    # four over gRPC, all in flight together
    pending = {i: http.async_infer("capa", http_inputs(httpclient, *cases[i]), request_id=str(i)) for i in range(12)}
    answers: queue.Queue = queue.Queue()
    for i in range(12, 16):
        grpc.async_infer("capa", http_inputs(grpcclient, *cases[i]), request_id=str(i),
                         callback=lambda result, error, i=i: answers.put((i, result, error)))
    results = {i: request.get_result() for i, request in pending.items()}
    for _ in range(4):
        i, result, error = answers.get(timeout=300)
        assert error is None, error
        results[i] = result
    assert sorted(results) == list(range(16))
    for i, result in results.items():
        response_id = result.get_response()["id"] if i < 12 else result.get_response().id
        assert response_id == str(i), "a response came back for another request"
        data, prompt, count = cases[i]
        expect_equal(result, reference.generate(Image.open(io.BytesIO(data)).convert("RGB"), prompt, count), i)
    assert success_count(http) - before == 16, "the server ran a request more or less than once"
    sizes = [int(r.as_numpy("batch_size")[0, 0]) for r in results.values()]
    assert max(sizes) > 1, f"16 requests in flight together never shared an engine run: {sizes}"


def raw_infer(port: int, inputs: list[dict]) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/capa/infer",
                                     data=json.dumps({"inputs": inputs}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode())["error"]


GOOD_PNG = encoded(synthetic_image(2, size=64))


def json_tensor(name, value, kind="BYTES"):
    return {"name": name, "shape": [1, 1], "datatype": kind, "data": [value]}


@pytest.mark.slow
@needs_server
@pytest.mark.parametrize("case, inputs, message", [
    ("missing image", [json_tensor("prompt", "What is it?"), json_tensor("max_new_tokens", 3, "INT32")],
     r"^image: missing"),
    ("undecodable image", [json_tensor("image", "this is not a picture"), json_tensor("prompt", "What is it?")],
     r"^image: 21 bytes in no format this server decodes"),
    ("prompt longer than the profile", None, r"^the prompt has \d+ tokens but the engine's profile allows at most"),
    ("max_new_tokens <= 0", None, r"^max_new_tokens: 0; ask for at least 1"),
    ("wrong tensor type", None, r"max_new_tokens' data-type is 'FP32', but model 'capa' expects 'INT32'"),
])
def test_bad_requests_get_400_with_one_line_and_the_server_keeps_serving(served, reference, case, inputs, message):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(f"127.0.0.1:{served.http_port}", network_timeout=300)
    if inputs is not None:
        status, text = raw_infer(served.http_port, inputs)
    else:
        long_prompt = "word " * (reference.max_sequence + 10)
        prompt, count, kind = {"prompt longer than the profile": (long_prompt, 3, "INT32"),
                               "max_new_tokens <= 0": ("What is it?", 0, "INT32"),
                               "wrong tensor type": ("What is it?", 3, "FP32")}[case]
        tensors = http_inputs(httpclient, GOOD_PNG, prompt, None)
        tensors.append(httpclient.InferInput("max_new_tokens", [1, 1], kind))
        tensors[-1].set_data_from_numpy(np.array([[count]], dtype=np.int32 if kind == "INT32" else np.float32))
        with pytest.raises(InferenceServerException) as info:
            client.infer("capa", tensors)
        status, text = int(info.value.status()), info.value.message()
    assert status == 400, (case, status, text)
    assert "\n" not in text.strip(), text
    assert re.search(message, text), (case, text)
    result = client.infer("capa", http_inputs(httpclient, GOOD_PNG, "What is it?", 3))
    expect_equal(result, reference.generate(Image.open(io.BytesIO(GOOD_PNG)).convert("RGB"), "What is it?", 3), case)


@pytest.mark.slow
@needs_server
def test_a_bad_request_batched_with_good_ones_fails_alone(served, reference):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(f"127.0.0.1:{served.http_port}", concurrency=4, network_timeout=300)
    images = [encoded(synthetic_image(i, seed=20 + i)) for i in range(3)]
    pending = [client.async_infer("capa", http_inputs(httpclient, images[0], "First?", 5)),
               client.async_infer("capa", http_inputs(httpclient, b"\x89PNG broken", "Bad?", 5)),
               client.async_infer("capa", http_inputs(httpclient, images[1], "Second?", 5)),
               client.async_infer("capa", http_inputs(httpclient, images[2], "Third?", None))]  # default: 6
    for index, (request, image, prompt, count) in enumerate(
            [(pending[0], images[0], "First?", 5), (pending[2], images[1], "Second?", 5),
             (pending[3], images[2], "Third?", 6)]):
        expect_equal(request.get_result(), reference.generate(Image.open(io.BytesIO(image)).convert("RGB"), prompt,
                                                              count), index)
    with pytest.raises(InferenceServerException) as info:
        pending[1].get_result()
    assert info.value.status() == "400" and info.value.message().startswith("image: 11 bytes in no format")
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    with pytest.raises(InferenceServerException) as info:
        grpc.infer("capa", http_inputs(grpcclient, images[0], "Fine?", 0))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and info.value.message().startswith("max_new_tokens: 0")


@pytest.mark.slow
@needs_server
def test_the_stream_model_sends_the_answer_piece_by_piece(served, reference):
    import queue

    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))

    def stream(image: bytes, prompt: str, count: int, request_id: str):
        inputs = []
        for name, value, kind in (("image", image, "BYTES"), ("prompt", prompt.encode(), "BYTES"),
                                  ("max_new_tokens", count, "INT32")):
            inputs.append(grpcclient.InferInput(name, [1], kind))
            inputs[-1].set_data_from_numpy(np.array([value], dtype=object if kind == "BYTES" else np.int32))
        client.async_stream_infer("capa_stream", inputs, request_id=request_id, enable_empty_final_response=True)
        pieces = []
        while True:
            result, error = responses.get(timeout=120)
            if error is not None:
                return pieces, error
            response = result.get_response()
            assert response.id == request_id
            if result.as_numpy("text") is not None:
                pieces.append(result.as_numpy("text")[0].decode())
            if response.parameters["triton_final_response"].bool_param:
                return pieces, None

    try:
        data = encoded(synthetic_image(7, seed=5))
        pieces, error = stream(data, "Describe the picture.", 8, "s1")
        assert error is None, error
        expected = reference.generate(Image.open(io.BytesIO(data)).convert("RGB"), "Describe the picture.", 8)
        assert "".join(pieces) == expected.text and len(pieces) > 1, pieces
        pieces, error = stream(data, "Describe the picture.", 0, "s2")
        assert not pieces and error.message().startswith("max_new_tokens: 0"), error
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.slow
@needs_server
def test_a_copied_repository_loads_in_the_bare_tritonserver(cpu_engine, reference, tmp_path):
    import tritonclient.http as httpclient

    from capa_export.serving.serve import TritonServer

    engine, _ = cpu_engine
    assert main(["triton-repo", str(engine), str(tmp_path / "repo"), "--copy", "--max-batch", "2"]) == 0
    config = (tmp_path / "repo/capa/config.pbtxt").read_text()
    assert 'string_value: "1/engine"' in config and str(engine) not in config
    server = TritonServer(tmp_path / "repo", http_port=free_port(), grpc_port=free_port(), metrics_port=0,
                          log=tmp_path / "triton.log")
    with server:
        server.start(READY_TIMEOUT_S)
        client = httpclient.InferenceServerClient(server.url, network_timeout=300)
        assert client.get_server_metadata()["version"] == "2.51.0"
        assert client.get_model_config("capa")["max_batch_size"] == 2
        data = encoded(synthetic_image(6, seed=3))
        result = client.infer("capa", http_inputs(httpclient, data, "What do you see?", 5))
        expect_equal(result, reference.generate(Image.open(io.BytesIO(data)).convert("RGB"), "What do you see?", 5),
                     "copied")
        client.close()  # Triton waits for open connections when it stops (up to its exit timeout, then status 1)
        runtime = server.runtime
    assert server.returncode == 0
    assert not server.leftover_processes() and not runtime.exists()


@pytest.mark.slow
@needs_server
def test_serve_stops_cleanly_on_sigterm(served):
    """Runs last in this file: it stops the session's server."""
    assert served.process.poll() is None, "the server died during the tests"
    pid = served.process.pid
    assert served.stop() == 0, served.log.read_text()[-3000:]
    log = served.log.read_text()
    assert "stopped (tritonserver status 0)" in log
    marker = f"capa-triton-{pid}-"
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and marker in _cmdline(p)]
    assert not left, f"processes of the stopped server are still running: {left}"
    assert not list(Path("/dev/shm").glob(marker + "*")), "shared-memory regions left behind"


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
