"""A Triton Inference Server model repository for a built engine folder.

Layout (OUT):
    capa/config.pbtxt     Python backend, dynamic batching, instance count, typed inputs/outputs,
                          parameters (engine_dir, trust, threads, default_max_new_tokens)
    capa/1/model.py       imports capa_export.serving.triton_model.TritonPythonModel
    capa/1/engine/        the engine folder, with --copy (else engine_dir names the original)
    capa_stream/          with stream: a decoupled model answering piece by piece (gRPC streaming)

The engine is checked here (manifest, sha256 of every file, signature with trust) and again by
CapaEngine in each model instance when Triton loads it. Tested with the tritonserver 2.51.0 that
nvidia-pytriton 0.7.0 ships (serve.py starts it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import CapaError

MODEL_NAME = "capa"
STREAM_MODEL_NAME = "capa_stream"
TRITON_VERSION = "2.51.0"
MODEL_PY = ("# Written by capa-export triton-repo: the model runs in Triton's Python backend, with\n"
            "# capa-export installed in the Python environment of the backend's stub.\n"
            "from capa_export.serving.triton_model import {} as TritonPythonModel  # noqa: F401\n")


def _string(text: str) -> str:
    # protobuf text format takes C-style escapes; json's cover quotes, backslashes and controls
    return json.dumps(text, ensure_ascii=False)


def _parameters(parameters: dict[str, str]) -> str:
    return "\n".join(f'  {{ key: {_string(k)}, value: {{ string_value: {_string(v)} }} }},'
                     for k, v in parameters.items()).rstrip(",")


def stream_model_config(parameters: dict[str, str]) -> str:
    """config.pbtxt of the decoupled model: no batching, one piece of text per response."""
    return f"""name: "{STREAM_MODEL_NAME}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
input [
  {{ name: "image", data_type: TYPE_STRING, dims: [ 1 ], optional: true }},
  {{ name: "prompt", data_type: TYPE_STRING, dims: [ 1 ], optional: true }},
  {{ name: "max_new_tokens", data_type: TYPE_INT32, dims: [ 1 ], optional: true }}
]
output [
  {{ name: "text", data_type: TYPE_STRING, dims: [ 1 ] }}
]
parameters [
{_parameters(parameters)}
]
"""


def model_config(*, max_batch: int, instances: int, queue_delay_us: int, parameters: dict[str, str]) -> str:
    """config.pbtxt of the served model (Triton's ModelConfig in protobuf text format)."""
    params = _parameters(parameters)
    return f"""name: "{MODEL_NAME}"
backend: "python"
max_batch_size: {max_batch}
# requests arriving within the delay run as one batch (one CapaEngine.generate_batch per max_new_tokens)
dynamic_batching {{
  max_queue_delay_microseconds: {queue_delay_us}
}}
instance_group [ {{ count: {instances}, kind: KIND_CPU }} ]
# optional: the model refuses a missing image or prompt itself, with a line naming it (HTTP 400)
input [
  {{ name: "image", data_type: TYPE_STRING, dims: [ 1 ], optional: true }},
  {{ name: "prompt", data_type: TYPE_STRING, dims: [ 1 ], optional: true }},
  {{ name: "max_new_tokens", data_type: TYPE_INT32, dims: [ 1 ], optional: true }}
]
# timings: vision, prefill, time to first token, decode per token (seconds)
output [
  {{ name: "text", data_type: TYPE_STRING, dims: [ 1 ] }},
  {{ name: "tokens", data_type: TYPE_INT32, dims: [ -1 ] }},
  {{ name: "keep_indices", data_type: TYPE_INT32, dims: [ -1 ] }},
  {{ name: "prompt_tokens", data_type: TYPE_INT32, dims: [ 1 ] }},
  {{ name: "timings", data_type: TYPE_FP32, dims: [ 4 ] }},
  {{ name: "batch_size", data_type: TYPE_INT32, dims: [ 1 ] }}
]
parameters [
{params}
]
"""


def write_repository(engine_dir: str | Path, out: str | Path, *, instances: int = 1, max_batch: int | None = None,
                     queue_delay_us: int = 5000, threads: int | None = None, trust=None, copy: bool = False,
                     default_max_new_tokens: int = 32, stream: bool = False) -> Path:
    """Write the model repository for engine_dir into out (a new or empty folder); returns out.

    max_batch: requests per engine run (default: the engine's profile maximum, shapes.batch).
    copy: copy the engine into the repository (self-contained); else reference it by absolute path.
    trust: PEM public key the engine's signature must verify with (copied into the repository).
    stream: add the decoupled model capa_stream (its own engine instance)."""
    from ..artifacts import replace_directory
    from ..manifest import read_manifest

    for name, value, least in (("instances", instances, 1), ("queue_delay_us", queue_delay_us, 0),
                               ("default_max_new_tokens", default_max_new_tokens, 1)):
        if value < least:
            raise CapaError(f"{name}={value} must be >= {least}")
    if threads is not None and threads < 1:
        raise CapaError(f"threads={threads} must be >= 1")
    engine_dir, out = Path(engine_dir).resolve(), Path(out)
    if trust is not None and not Path(trust).is_file():
        raise CapaError(f"trust key {trust} is not a file; give the PEM public key the engine was signed for")
    manifest = read_manifest(engine_dir, verify=True, trust=trust)
    most = manifest["profile"]["shapes"]["batch"][2]
    max_batch = most if max_batch is None else max_batch
    if not 1 <= max_batch <= most:
        raise CapaError(f"max_batch={max_batch}: the engine's profile runs batches of 1 to {most} (shapes.batch)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CapaError(f"{out} exists and is not an empty folder; give a new folder for the model repository")

    def write(tmp: Path) -> None:
        version = tmp / MODEL_NAME / "1"
        version.mkdir(parents=True)
        (version / "model.py").write_text(MODEL_PY.format("TritonPythonModel"))
        parameters = {"engine_dir": str(engine_dir), "default_max_new_tokens": str(default_max_new_tokens)}
        if copy:
            shutil.copytree(engine_dir, version / "engine", symlinks=True)
            read_manifest(version / "engine", verify=True, trust=trust)  # the copy is what will be served
            parameters["engine_dir"] = "1/engine"
        if trust is not None:
            shutil.copyfile(trust, tmp / MODEL_NAME / "trust.pub.pem")
            parameters["trust"] = "trust.pub.pem"
        if threads is not None:
            parameters["threads"] = str(threads)
        (tmp / MODEL_NAME / "config.pbtxt").write_text(model_config(
            max_batch=max_batch, instances=instances, queue_delay_us=queue_delay_us, parameters=parameters))
        if stream:  # relative paths lead back to the batched model's copies
            streaming = tmp / STREAM_MODEL_NAME / "1"
            streaming.mkdir(parents=True)
            (streaming / "model.py").write_text(MODEL_PY.format("TritonPythonStreamModel"))
            shared = {k: (f"../{MODEL_NAME}/{v}" if k in ("trust", "engine_dir") and not v.startswith("/") else v)
                      for k, v in parameters.items()}
            (tmp / STREAM_MODEL_NAME / "config.pbtxt").write_text(stream_model_config(shared))

    return replace_directory(out, write)
