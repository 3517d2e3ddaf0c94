"""The benchmark's path (what CI runs as the smoke mode): it runs every peer and reports floors.
Nothing here asserts anything about speed."""

import json

from capa_export.bench import format_table, run_benchmark, save


def test_smoke_benchmark_runs_every_peer(tmp_path):
    report = run_benchmark(size="tiny", keeps=(64,), ffn_modes=("none", "affine"), repeats=2, warmup=1, smoke=True,
                           with_compile=False, with_engine=True)
    runtimes = {r["runtime"] for r in report["results"]}
    assert runtimes == {"hf_sdpa_unpruned", "fastv_eager", "capa_eager", "ort_engine"}
    assert report["floors"]["matmul_flops_per_s"] > 0 and report["floors"]["copy_bytes_per_s"] > 0
    for row in report["results"]:
        assert row["runs"] == 2 and row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["flops"] > 0
    pruned = next(r for r in report["results"] if r["runtime"] == "capa_eager" and r["ffn"] == "none")
    full = next(r for r in report["results"] if r["runtime"] == "hf_sdpa_unpruned")
    assert pruned["flops"] < full["flops"] / 2  # 64 of 576 visual tokens after layer 2 of 8
    out = save(report, tmp_path / "r.json")
    assert json.loads(out.read_text())["device"] and out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "capa_eager" in format_table(report)
