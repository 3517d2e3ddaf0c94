"""The Triton Python-backend model of a capa-export model repository (its model.py imports
TritonPythonModel from here): one CapaEngine per model instance; the requests that Triton's dynamic
batcher delivers together are checked one by one and run as batches (serving.requests).

Inputs (one per request, shape [1, 1]): image (BYTES, encoded picture), prompt (BYTES, UTF-8),
max_new_tokens (INT32, optional). Outputs: text (BYTES [1]), tokens (INT32 [-1]), keep_indices
(INT32 [-1]: the visual tokens the engine kept), prompt_tokens (INT32 [1]), timings (FP32 [4]:
vision, prefill, time to first token, decode per token, in seconds) and batch_size (INT32 [1]: how
many requests shared the engine run). A refused request gets an
INVALID_ARG error (HTTP 400, gRPC INVALID_ARGUMENT) with one line; it never fails the others."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ..errors import CapaError
from ..runtime import CapaEngine
from .requests import answer, check_request, parse_request

TIMINGS = ("vision", "prefill", "time_to_first_token", "decode_per_token")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _error(exc: BaseException):
    if isinstance(exc, CapaError):
        return pb_utils.TritonError(_one_line(exc), pb_utils.TritonError.INVALID_ARG)
    return pb_utils.TritonError(f"{type(exc).__name__}: {_one_line(exc)}", pb_utils.TritonError.INTERNAL)


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        model_dir = Path(args["model_repository"])  # relative parameters are relative to the model's folder
        engine_dir = model_dir / params["engine_dir"]
        trust = model_dir / params["trust"] if params.get("trust") else None
        threads = int(params["threads"]) if params.get("threads") else None
        # CapaEngine checks the folder (manifest, every file's sha256, the signature with trust) before loading it
        self.engine = CapaEngine(engine_dir, trust=trust, threads=threads, provider=params.get("provider") or None)
        self.default_max_new_tokens = int(params.get("default_max_new_tokens", "32"))
        pb_utils.Logger.log_info(f"capa: instance {args['model_instance_name']} serves {engine_dir} "
                                 f"({self.engine.manifest['backend']} {self.engine.manifest['dtype']}, "
                                 f"batch up to {self.engine.max_batch})")

    def execute(self, requests):
        responses = [None] * len(requests)
        accepted, parsed = [], []
        for index, request in enumerate(requests):
            try:
                item = parse_request(_input(request, "image"), _input(request, "prompt"),
                                     _input(request, "max_new_tokens"), self.default_max_new_tokens)
                check_request(self.engine, item)
            except Exception as exc:  # a refusal answers this request only; raising would fail the whole batch
                responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=_error(exc))
                continue
            accepted.append(index)
            parsed.append(item)
        results = answer(self.engine, parsed)
        sizes = {}
        for index, result in zip(accepted, results):  # how many requests shared each engine run
            if not isinstance(result, BaseException):
                sizes[id(result.timings)] = sizes.get(id(result.timings), 0) + 1
        for index, result in zip(accepted, results):
            if isinstance(result, BaseException):
                responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=_error(result))
                continue
            responses[index] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("text", np.array([[result.text.encode("utf-8")]], dtype=np.object_)),
                pb_utils.Tensor("tokens", np.array([result.tokens], dtype=np.int32)),
                pb_utils.Tensor("keep_indices", np.array([result.keep_indices], dtype=np.int32)),
                pb_utils.Tensor("prompt_tokens", np.array([[result.prompt_tokens]], dtype=np.int32)),
                pb_utils.Tensor("timings", np.array([[result.timings[k] for k in TIMINGS]], dtype=np.float32)),
                pb_utils.Tensor("batch_size", np.array([[sizes[id(result.timings)]]], dtype=np.int32)),
            ])
        return responses

    def finalize(self):
        self.engine.close()


class TritonPythonStreamModel(TritonPythonModel):
    """The decoupled model (capa_stream): one response per piece of text as tokens arrive (gRPC
    streaming), then an empty final one; requests run one at a time."""

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()

            def piece(text: str, sender=sender):
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("text", np.array([text.encode("utf-8")], dtype=np.object_))]))

            try:
                item = parse_request(_input(request, "image"), _input(request, "prompt"),
                                     _input(request, "max_new_tokens"), self.default_max_new_tokens)
                check_request(self.engine, item)
                self.engine.generate(item.image, item.prompt, item.max_new_tokens, stream=piece)
            except Exception as exc:
                sender.send(pb_utils.InferenceResponse(output_tensors=[], error=_error(exc)),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
