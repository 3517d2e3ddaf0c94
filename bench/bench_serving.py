"""Throughput and latency of an engine served by Triton (capa-export serve) against the same engine
called directly, at several client concurrencies.

Served: C client threads, each with its own gRPC client, send requests back to back to the
tritonserver of nvidia-pytriton (model repository written by triton-repo, dynamic batching).
Direct: C threads share one CapaEngine in this process and call generate() one at a time (a lock:
what callers get without a server; the engine's sessions are not shared between concurrent runs).
Latency: from a request's submission to its answer. Every served answer is compared with the
direct one for the same input (text and tokens) before its time counts.

Usage: python bench/bench_serving.py ENGINE_DIR [--requests 32] [--concurrency 1 4 16]
       [--max-new-tokens 8] [--out bench/results/serving-<date>.json]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def workload(count: int, max_new_tokens: int):
    from capa_export.inputs import synthetic_image

    prompts = ["What is in the picture?", "Describe the colours.", "How many shapes are there?",
               "Is there any text in the image?"]
    cases = []
    for i in range(count):
        buffer = io.BytesIO()
        synthetic_image(i % 8, seed=i % 8).save(buffer, format="PNG")
        cases.append((buffer.getvalue(), prompts[i % 4], max_new_tokens))
    return cases


def run_clients(concurrency: int, cases, call) -> tuple[float, list[float]]:
    """Wall seconds and per-request latencies of len(cases) calls issued by `concurrency` threads."""
    latencies = [0.0] * len(cases)
    next_case = iter(range(len(cases)))
    lock = threading.Lock()

    def worker(slot: int):
        state = {}
        while True:
            with lock:
                index = next(next_case, None)
            if index is None:
                return
            start = time.perf_counter()
            call(state, index, cases[index])
            latencies[index] = time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return time.perf_counter() - start, latencies


def summary(wall: float, latencies: list[float]) -> dict:
    ms = np.array(latencies) * 1e3
    return {"requests": len(latencies), "wall_s": round(wall, 3), "answers_per_s": round(len(latencies) / wall, 3),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import tritonclient.grpc as grpcclient
    from PIL import Image

    from capa_export.runtime import CapaEngine
    from capa_export.serving.serve import TritonServer
    from capa_export.serving.triton_repo import TRITON_VERSION, write_repository

    cases = workload(args.requests, args.max_new_tokens)
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "engine": args.engine,
              "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
              "requests_per_level": args.requests, "max_new_tokens": args.max_new_tokens,
              "triton": TRITON_VERSION, "instances": args.instances, "direct": {}, "served": {}}
    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data, _, _ in cases]
    with CapaEngine(args.engine) as engine:
        engine_lock = threading.Lock()

        def direct(_state, index, case):
            with engine_lock:
                return engine.generate(decoded[index], case[1], case[2])

        expected = [direct(None, i, c) for i, c in enumerate(cases)]  # also the warm-up
        for concurrency in args.concurrency:
            report["direct"][concurrency] = summary(*run_clients(concurrency, cases, direct))
            print("direct", concurrency, report["direct"][concurrency], flush=True)

    with tempfile.TemporaryDirectory(prefix="capa-bench-serving-") as tmp:
        repository = write_repository(args.engine, Path(tmp) / "repo", instances=args.instances)
        server = TritonServer(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=0,
                              log=Path(tmp) / "triton.log")
        with server:
            report["ready_s"] = round(server.start(), 2)
            sizes = []

            def served(state, index, case):
                client = state.setdefault("client", grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}"))
                inputs = []
                for name, value, kind in (("image", case[0], "BYTES"), ("prompt", case[1].encode(), "BYTES"),
                                          ("max_new_tokens", case[2], "INT32")):
                    inputs.append(grpcclient.InferInput(name, [1, 1], kind))
                    inputs[-1].set_data_from_numpy(np.array([[value]], dtype=object if kind == "BYTES" else np.int32))
                result = client.infer("capa", inputs)
                if (result.as_numpy("text")[0, 0].decode() != expected[index].text
                        or result.as_numpy("tokens")[0].tolist() != expected[index].tokens):
                    raise AssertionError(f"request {index}: the served answer differs from the engine's")
                sizes.append(int(result.as_numpy("batch_size")[0, 0]))

            run_clients(2, cases[:4], served)  # warm-up
            for concurrency in args.concurrency:
                sizes.clear()
                report["served"][concurrency] = summary(*run_clients(concurrency, cases, served))
                report["served"][concurrency]["mean_batch"] = round(float(np.mean(sizes)), 2)
                print("served", concurrency, report["served"][concurrency], flush=True)
    out = Path(args.out or f"bench/results/serving-{report['date'][:10]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"| concurrency | direct answers/s | direct p50 / p99 ms | served answers/s | served p50 / p99 ms | "
          f"mean batch |\n|---|---|---|---|---|---|")
    for c in args.concurrency:
        d, s = report["direct"][c], report["served"][c]
        print(f"| {c} | {d['answers_per_s']} | {d['p50_ms']} / {d['p99_ms']} | {s['answers_per_s']} | "
              f"{s['p50_ms']} / {s['p99_ms']} | {s['mean_batch']} |")
    print(f"results in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
