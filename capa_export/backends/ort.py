"""ONNX Runtime backend: an "engine" is each graph optimised by ONNX Runtime for the profile's
providers and written to disk (`optimized_model_filepath`), plus the session options to load it.

ONNX Runtime runs the CapaContribTopK node's ONNX local function (its standard-op body): no custom-op
library is registered.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from ..artifacts import write_json
from ..errors import CapaError
from ..folders import check_external_data, confined_file, load_graph_proto, read_json
from ..schemas import ORT_SESSION
from .base import Backend, EngineGraph, check_graph_io, register_backend

SESSION_FILE = "session.json"
LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(level: str = "all", optimized_path: Path | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
        # weights of the optimised graph go to a side file, as any graph over 2 GB must
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         optimized_path.with_suffix(".data").name)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return options


def usable_providers(wanted: list[str]) -> list[str]:
    available = ort.get_available_providers()
    usable = [p for p in wanted if p in available]
    if not usable:
        raise CapaError(f"none of the profile's providers {wanted} is available in this onnxruntime "
                        f"({', '.join(available)}); install onnxruntime-gpu for CUDAExecutionProvider")
    return usable


def with_options(providers: list[str], workspace_mib: int) -> list:
    """Provider entries with their options: the CUDA arena is capped at the profile's workspace."""
    return [(p, {"gpu_mem_limit": str(int(workspace_mib) << 20)}) if p == "CUDAExecutionProvider" else p
            for p in providers]


def build(onnx_dir: Path, profile, out_dir: Path, graphs) -> dict:
    """Optimise every graph for the profile; write <graph>.opt.onnx (+ .opt.data) and session.json."""
    providers = with_options(usable_providers(profile.providers), profile.workspace_mib)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for graph in graphs:
        optimized = out_dir / f"{graph}.opt.onnx"
        options = session_options(profile.optimization_level, optimized)
        try:
            ort.InferenceSession(str(onnx_dir / f"{graph}.onnx"), options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types; report which graph failed
            raise CapaError(f"ONNX Runtime cannot build {graph}.onnx for {providers}: {str(exc).splitlines()[0]}") from None
        files[graph] = optimized.name
    description = {"backend": OnnxRuntimeBackend.name, "onnxruntime": ort.__version__, "providers": providers,
                   "optimization_level_at_build": profile.optimization_level, "graphs": files,
                   "load_with": "graph optimisations disabled (already applied)"}
    write_json(out_dir / SESSION_FILE, description)
    return description


def check_folder(engine_dir: Path, files: dict | None = None) -> dict:
    """session.json of an engine's onnxruntime/ folder, schema-checked, with every graph it names
    a regular file inside engine_dir (and, given the engine's file table relative to engine_dir,
    one the table lists)."""
    name = f"{engine_dir}/{SESSION_FILE}"
    description = read_json(confined_file(engine_dir, SESSION_FILE, source=str(engine_dir)), schema=ORT_SESSION,
                            name=name)
    for graph, file in description["graphs"].items():
        if files is not None and file not in files:
            raise CapaError(f"{name}: graphs.{graph} names {file!r}, which manifest.json does not list; rebuild "
                            f"the engine")
        confined_file(engine_dir, file, source=f"{name}: graphs.{graph}")
    return description


def _graph_io(model) -> tuple[dict, dict]:
    """({input name: ONNX element type}, {output name: element type}) of a ModelProto; initializers
    listed as inputs (older IR versions) are not inputs a caller feeds."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = {v.name: v.type.tensor_type.elem_type for v in model.graph.input if v.name not in initializers}
    return inputs, {v.name: v.type.tensor_type.elem_type for v in model.graph.output}


def load_session(engine_dir: Path, graph: str, *, spec=None, dtype: str = "fp32", files: dict | None = None,
                 provider: str | None = None, threads: int | None = None) -> ort.InferenceSession:
    """An InferenceSession of one graph of an onnxruntime/ folder, created only after the folder's
    description, the graph's path, its external data (inside engine_dir) and, given the family's
    spec, its inputs and outputs were checked; ONNX Runtime's own refusals as one line."""
    description = check_folder(engine_dir, files)
    file = description["graphs"][graph]
    model = load_graph_proto(engine_dir, file)
    check_external_data(engine_dir, file, model)
    if spec is not None:
        check_graph_io(spec, *_graph_io(model), dtype, f"{engine_dir}/{file}")
    del model
    options = session_options("disable")
    if threads is not None:
        options.intra_op_num_threads = threads
    names = [p if isinstance(p, str) else p[0] for p in description["providers"]]
    usable = set(usable_providers(names))
    if provider is not None:
        if provider not in names:
            raise CapaError(f"provider {provider!r} is not one this engine was built for ({', '.join(names)}); "
                            f"rebuild it with a profile listing {provider}")
        if provider not in usable:
            raise CapaError(f"provider {provider} is not available in this onnxruntime "
                            f"({', '.join(ort.get_available_providers())})")
        usable = {provider}
    providers = [p if isinstance(p, str) else tuple(p) for p in description["providers"]
                 if (p if isinstance(p, str) else p[0]) in usable]
    try:
        return ort.InferenceSession(str(engine_dir / file), options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types; name the graph, not a traceback
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CapaError(f"ONNX Runtime cannot load {engine_dir}/{file} ({reason}); rebuild the engine") from None


def runner(engine_dir: Path, graph: str, *, spec=None, dtype: str = "fp32", files: dict | None = None):
    """A Polygraphy runner for one graph of a built engine (the session is created now)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    return OnnxrtRunner(load_session(engine_dir, graph, spec=spec, dtype=dtype, files=files),
                        name=f"onnxruntime:{graph}")


class OrtGraph(EngineGraph):
    """One graph in an ONNX Runtime session, run with IO binding: inputs reach the session as
    DLPack views of torch tensors (any dtype, bf16 included; no numpy), outputs stay OrtValues on
    the session's device until a caller asks for a tensor, so a decode step's present KV becomes
    the next step's past without leaving ONNX Runtime."""

    def __init__(self, session: ort.InferenceSession, spec, dtype: str):
        import torch

        from ..contract import FLOAT, FLOAT32, INT32
        from ..dtypes import float_type

        self.session, self.spec = session, spec
        cuda = session.get_providers()[0] == "CUDAExecutionProvider"
        self.device = torch.device("cuda") if cuda else torch.device("cpu")
        self.ort_device = "cuda" if cuda else "cpu"
        self.types = {t.name: {FLOAT: float_type(dtype).torch, FLOAT32: torch.float32, INT32: torch.int32}
                      .get(t.dtype, torch.int64) for t in spec.inputs}

    def run(self, inputs: dict) -> dict:
        import torch

        binding = self.session.io_binding()
        alive = []  # the tensors ONNX Runtime reads must outlive the run
        for name, kind in self.types.items():
            value = inputs[name]
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
                continue
            tensor = torch.as_tensor(value).to(device=self.device, dtype=kind).contiguous()
            alive.append(tensor)
            binding.bind_ortvalue_input(name, ort.OrtValue.from_dlpack(tensor))
        for name in self.spec.output_names:
            binding.bind_output(name, self.ort_device)
        if self.device.type == "cuda":
            # ONNX Runtime's CUDA provider computes on its own stream: the inputs torch wrote on its
            # stream (the merged embeddings, the copies above) must be complete before it reads them
            torch.cuda.current_stream().synchronize()
        self.session.run_with_iobinding(binding)
        return dict(zip(self.spec.output_names, binding.get_outputs()))

    def tensor(self, handle):
        import torch

        return torch.from_dlpack(handle) if isinstance(handle, ort.OrtValue) else handle

    def close(self) -> None:
        self.session = None


@register_backend
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    auto_priority = 0

    def check_precision(self, profile) -> None:
        # ONNX Runtime's CPU provider has no bf16 kernels (MatMul, Mul, Add refused); CUDA's has them
        if profile.precision == "bf16" and "CUDAExecutionProvider" not in usable_providers(profile.providers):
            raise CapaError(f"profile {profile.name} is bf16, which ONNX Runtime runs only with CUDAExecutionProvider "
                            f"(onnxruntime-gpu and a GPU); here build the cpu (fp32) or edge (fp16) profile")

    def check(self, profile, config, *, plugin_library=None, max_visual=None) -> None:
        usable_providers(profile.providers)

    def build(self, onnx_dir, profile, out_dir, contract, *, fixed_dims, plugin_library=None) -> dict:
        return build(onnx_dir, profile, out_dir, list(contract.graphs))

    def check_folder(self, backend_dir, files) -> dict:
        return check_folder(backend_dir, files)

    def graph(self, engine_dir, graph, *, spec, dtype="fp32", files=None, provider=None, threads=None,
              plugin_library=None, allow_engine_code=False) -> OrtGraph:
        return OrtGraph(load_session(engine_dir, graph, spec=spec, dtype=dtype, files=files, provider=provider,
                                     threads=threads), spec, dtype)

    def runner(self, engine_dir, graph, *, spec=None, dtype="fp32", files=None, plugin_library=None,
               allow_engine_code=False):
        # no native code besides ONNX Runtime's own: plugin_library / allow_engine_code do not apply
        return runner(engine_dir, graph, spec=spec, dtype=dtype, files=files)
