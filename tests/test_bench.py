"""`capa-export bench`: the smoke run's report (every peer, step, floor, check and target present and
well formed), the FLOP counts against PyTorch's own FlopCounterMode, the peak-RSS readings against
known allocations, and the summaries against hand-computed values. Nothing here times anything or
asserts anything about speed."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from capa_export.bench import (CAPA_ENGINES, PEERS, Settings, cache_lengths, decode_flops, format_markdown,
                               make_checks, make_targets, prefill_flops, run_benchmark, run_measured, save,
                               update_benchmarks)
from capa_export.bench_peers import PHASES, summarize, summarize_profile
from capa_export.config import CapaConfig
from capa_export.method.capa_model import apply_capa
from capa_export.method.ffn import FfnApproximation, LayerFit
from capa_export.models import adapter_for
from tests.test_cli import run


#: the decode peer needs the `bench` extra; without it the run must say so and run the others
HAS_GENAI = importlib.util.find_spec("onnxruntime_genai") is not None
EXPECTED_PEERS = set(PEERS) if HAS_GENAI else set(PEERS) - {"genai"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    report = run_benchmark(Settings.for_smoke(work=str(work / "work")), log=lambda *_: None)
    return report, work


def test_smoke_run_reports_every_peer(smoke):
    report, _ = smoke
    assert report["failed"] == {}
    if HAS_GENAI:
        assert report["skipped"] == {}
    else:
        assert set(report["skipped"]) == {"genai"} and "capa-export[bench]" in report["skipped"]["genai"]
    settings = report["settings"]
    assert {r["peer"] for r in report["rows"]} == EXPECTED_PEERS
    for row in report["rows"]:
        for phase in PHASES:
            stats = row[phase]
            if stats is None:  # GenAI has no vision stage
                assert row["peer"] == "genai" and phase == "vision_ms"
                continue
            assert stats["runs"] == settings["repeats"]
            assert stats["p10"] <= stats["median"] <= stats["p90"]
        ratio = row["ratio_to_flop_floor"]["prefill"]
        assert ratio == pytest.approx(row["prefill_ms"]["median"] / row["flop_floor_ms"]["prefill"])
        assert row["peak_rss_bytes"] > 0 and row["run_peak_rss_bytes"] > 0
        load = row["load_average"]  # what the peer's times were measured under on a shared machine
        assert len(load["before"]) == len(load["after"]) == 3 and min(load["before"] + load["after"]) >= 0
    floors = report["floors"]
    assert floors["matmul_flops_per_s"] > 0 and floors["copy_bytes_per_s"] > 0
    assert floors["threads"] == settings["threads"]


def test_smoke_run_counts_less_work_for_pruned_peers(smoke):
    report, _ = smoke
    flops = {r["peer"]: r["flops"]["prefill"] for r in report["rows"]}
    assert flops["hf_sdpa"] == flops["ort_unpruned"] == flops.get("genai", flops["hf_sdpa"])
    assert flops["capa_engine"] == flops["capa_eager"] == flops["fastv_eager"] < flops["hf_sdpa"] / 2
    assert flops["capa_engine_affine"] < flops["capa_engine"]


def test_smoke_run_measures_every_command_and_validates_every_engine(smoke):
    report, _ = smoke
    memory = report["memory"]
    expected = {"calibrate unpruned", "calibrate capa", "calibrate capa_affine", "export", "build unpruned",
                "build capa", "build capa_affine"} | ({"genai model builder"} if HAS_GENAI else set())
    assert set(memory) == expected
    weights = report["dims"]["checkpoint_weight_bytes"]
    for entry in memory.values():
        assert entry["returncode"] == 0 and entry["peak_rss_bytes"] > weights / 4
        assert entry["ratio_to_weights"] == pytest.approx(entry["peak_rss_bytes"] / weights)
    assert set(report["validation"]) == {"unpruned", "capa", "capa_affine"}
    assert all(v["passed"] for v in report["validation"].values())
    # every engine equals its eager reference on the benchmark's own inputs; GenAI equals the HF decoder
    pairs = {(c["peer"], c["against"]) for c in report["checks"]}
    assert pairs == {("ort_unpruned", "hf_sdpa"), ("capa_engine", "capa_eager"),
                     ("capa_engine_affine", "capa_eager_affine")} | ({("genai", "hf_sdpa")} if HAS_GENAI else set())
    assert all(c["passed"] for c in report["checks"])
    assert all(c["keep_equal"] for c in report["checks"] if c["peer"] != "genai")


def test_smoke_run_states_targets_and_profiles(smoke):
    report, _ = smoke
    named = {(t["peer"], t["target"]) for t in report["targets"]}
    for peer in CAPA_ENGINES:
        assert (peer, "prefill speed-up over HF SDPA unpruned") in named
        assert (peer, "prefill / its FLOP floor") in named
        assert ((peer, "decode ms/token vs ONNX Runtime GenAI") in named) == HAS_GENAI
    for peer in CAPA_ENGINES:
        summary = report["profiles"][peer]["profiles"]["576"]
        assert summary["kernel_ms"] > 0 and summary["by_op_type"]
        assert abs(sum(o["share"] for o in summary["by_op_type"]) - 1) < 1e-6 or len(summary["by_op_type"]) == 12


def test_smoke_run_saves_json_png_markdown(smoke, tmp_path):
    report, _ = smoke
    out = save(report, tmp_path / "r.json")
    assert json.loads(out.read_text())["rows"]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    text = out.with_suffix(".md").read_text()
    for peer, (_, label, _, _) in PEERS.items():
        assert label in text  # a skipped peer is listed with its reason
    assert report["machine"]["cpu"] in text and "transformers" in text
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    update_benchmarks(doc, report, out)
    once = doc.read_text()
    update_benchmarks(doc, report, out)  # a second run replaces its section
    assert doc.read_text() == once and once.startswith("# Benchmarks\n\nintro\n") and once.count("begin -->") == 1


# --- FLOP counts: the analytic formulas against PyTorch's FlopCounterMode on the tiny model ----------------
def _dims(model):
    adapter = adapter_for(model)
    layer = adapter.layer(0)
    return {"hidden": adapter.hidden_size, "layers": adapter.num_layers, "heads": layer.num_heads,
            "kv_heads": layer.num_kv_heads, "head_dim": layer.head_dim,
            "intermediate": layer.mlp.gate_proj.weight.shape[0], "vocab": adapter.vocab_size}


def _visual_tokens(model, batch) -> int:
    return int(adapter_for(model).family.visual_positions(batch["input_ids"]).shape[1])


def _counted(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _random_ffn(adapter, layers):
    gen = torch.Generator().manual_seed(0)
    dim = adapter.hidden_size
    fits = {i: LayerFit(torch.randn(dim, dim, generator=gen) / dim**0.5, torch.zeros(dim)) for i in layers}
    return FfnApproximation(fits, list(layers), adapter.fingerprint(), {})


@pytest.mark.parametrize("prune, ffn_layers", [([], []), ([(2, 64)], []), ([(2, 64)], [3, 4, 5]),
                                               ([(2, 128), (5, 32)], [])])
def test_prefill_flops_equal_the_counted_matmuls(tiny, tiny_batch, prune, ffn_layers):
    """The eager CapaModel computes the full score matrix (no causal skipping): the formula's
    non-causal count must equal every matmul PyTorch counts (the rotary frequencies' tiny matmul aside)."""
    model, _ = tiny
    adapter = adapter_for(model)
    # FastV's score (attention) has no matmul of its own, so the count is the decoder's alone
    capa = apply_capa(model, CapaConfig(prune=prune, variant="attention", ffn_layers=ffn_layers),
                      _random_ffn(adapter, ffn_layers) if ffn_layers else None)
    features = adapter.image_features(**{k: tiny_batch[k] for k in adapter.family.vision_keys})
    counted = _counted(lambda: capa(tiny_batch["input_ids"], attention_mask=tiny_batch["attention_mask"],
                                    image_features=features, last_logits_only=True))
    length, visual = tiny_batch["input_ids"].shape[1], _visual_tokens(model, tiny_batch)
    slots = adapter.family.visual_positions(tiny_batch["input_ids"])
    scoring_rows = length - 1 - int(slots.max())  # the text after the image scores
    expected = prefill_flops(_dims(model), length, visual, prune, ffn_layers, causal=False, scoring_rows=scoring_rows)
    assert counted == pytest.approx(expected, rel=1e-4)
    assert prefill_flops(_dims(model), length, visual, prune, ffn_layers, scoring_rows=scoring_rows) < expected


def test_decode_flops_equal_the_counted_matmuls(tiny, tiny_batch):
    model, _ = tiny
    capa = apply_capa(model, CapaConfig(prune=[(2, 64)], variant="attention", ffn_layers=[]))
    out = capa(**tiny_batch, use_cache=True, last_logits_only=True)
    cache = out.past_key_values
    length = tiny_batch["input_ids"].shape[1]
    lengths = cache_lengths(_dims(model), length, _visual_tokens(model, tiny_batch), [(2, 64)])
    assert lengths == [cache.length(i) for i in range(len(lengths))]
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    counted = _counted(lambda: capa(token, past_key_values=cache, last_logits_only=True))
    assert counted == pytest.approx(decode_flops(_dims(model), [n + 1 for n in lengths]), rel=1e-4)


# --- memory readings against known allocations ------------------------------------------------------------
def test_peak_rss_of_a_child_covers_what_it_touched(tmp_path):
    """...and not the parent's: the parent holds a larger block while the child runs."""
    size = 256 << 20
    parent_block = bytearray(3 * size)  # touched: zero-filled by the allocator's calloc or written below
    parent_block[:: 4096] = b"x" * len(parent_block[:: 4096])
    script = tmp_path / "child.py"
    script.write_text(f"import numpy as np, sys\na = np.ones({size} // 8)\nsys.exit(3 if a.sum() else 4)\n")
    measured = run_measured([str(script)], tmp_path / "child.log", {})
    assert measured["returncode"] == 3
    assert size <= measured["peak_rss_bytes"] < size + (150 << 20)
    del parent_block


PEAK_RSS_CHECK = """
import numpy as np
from capa_export.bench_peers import peak_rss_bytes, reset_peak_rss

size = 200 << 20
reset_peak_rss()
baseline = peak_rss_bytes()
block = np.ones(size // 8)  # a fresh mmap'd block: every page touched
grown = peak_rss_bytes()
del block  # munmap'd: resident memory falls back
reset_peak_rss()
print(baseline, grown, peak_rss_bytes(), size)
"""


def test_peak_rss_reset_forgets_a_freed_allocation():
    """In a fresh process (in this one the allocator may hand back pages still resident from
    earlier tests, and then the peak does not move)."""
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_CHECK], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    baseline, grown, after_reset, size = map(int, result.stdout.split())
    assert grown >= baseline + size * 0.9
    assert after_reset < baseline + size / 2


# --- summaries against hand-computed values ----------------------------------------------------------------
def test_summarize_reports_median_and_nearest_rank_percentiles():
    stats = summarize([50.0, 10.0, 40.0, 20.0, 30.0, 60.0, 70.0, 80.0, 90.0, 100.0])
    assert stats == {"median": 55.0, "p10": 20.0, "p90": 100.0, "runs": 10}


def test_profile_summary_sums_kernel_time_of_the_last_run_per_operator():
    def node(name, op, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},
              node("m0", "MatMul", 10, 50),  # first run: ignored
              {"cat": "Session", "name": "model_run", "ts": 1000, "dur": 500},
              node("m1", "MatMul", 1010, 300), node("m2", "MatMul", 1320, 100), node("a", "Attention", 1430, 50),
              {"cat": "Node", "name": "m1_fence_before", "ts": 1005, "dur": 1, "args": {"op_name": "MatMul"}}]
    summary = summarize_profile(events, runs=2)
    assert summary["model_run_ms"] == 0.5 and summary["kernel_ms"] == pytest.approx(0.45)
    assert summary["by_op_type"][0] == {"op": "MatMul", "ms": pytest.approx(0.4), "share": pytest.approx(0.4 / 0.45)}
    assert summary["slowest_nodes"][0] == {"node": "m1", "ms": pytest.approx(0.3)}


def test_checks_flag_an_engine_that_differs_from_its_reference():
    settings = Settings(visual=[576], peers=["capa_eager", "capa_engine"])

    def result(tokens, keep):
        return {"visual": {"576": {"tokens": tokens, "keep_indices": keep}}}

    same = make_checks({"capa_eager": result([[1, 2, 3]], [[0, 5]]), "capa_engine": result([[1, 2, 3]], [[0, 5]])},
                       settings)
    assert same == [{"peer": "capa_engine", "against": "capa_eager", "visual": 576, "token_agreement": 1.0,
                     "keep_equal": True, "passed": True}]
    other_keep = make_checks({"capa_eager": result([[1, 2, 3]], [[0, 5]]),
                              "capa_engine": result([[1, 2, 3]], [[0, 6]])}, settings)
    other_token = make_checks({"capa_eager": result([[1, 2, 3]], [[0, 5]]),
                               "capa_engine": result([[1, 2, 4]], [[0, 5]])}, settings)
    assert not other_keep[0]["passed"] and not other_token[0]["passed"]
    assert other_token[0]["token_agreement"] == pytest.approx(2 / 3)


def test_targets_compare_with_the_issue_thresholds():
    def row(peer, prefill, decode, floor_ratio=1.0):
        return {"peer": peer, "visual": 576, "prefill_ms": {"median": prefill}, "decode_per_token_ms": {"median": decode},
                "ratio_to_flop_floor": {"prefill": floor_ratio}}

    rows = [row("hf_sdpa", 1000, 50), row("genai", 900, 40), row("capa_engine", 200, 39, 1.2),
            row("capa_engine_affine", 300, 41, 1.4)]
    targets = {(t["peer"], t["target"]): t for t in make_targets(rows, Settings(visual=[576]))}
    assert targets[("capa_engine", "prefill speed-up over HF SDPA unpruned")]["value"] == 5.0
    assert targets[("capa_engine", "prefill speed-up over HF SDPA unpruned")]["met"] is True
    assert targets[("capa_engine_affine", "prefill speed-up over HF SDPA unpruned")]["met"] is False  # 3.33 < 4
    assert targets[("capa_engine", "prefill / its FLOP floor")]["met"] is True
    assert targets[("capa_engine_affine", "prefill / its FLOP floor")]["met"] is False
    assert targets[("capa_engine", "decode ms/token vs ONNX Runtime GenAI")]["met"] is True
    assert targets[("capa_engine_affine", "decode ms/token vs ONNX Runtime GenAI")]["met"] is False


def test_markdown_marks_a_busy_machine_and_a_smoke_run():
    report = {"settings": {**Settings.for_smoke().__dict__, "threads": 2}, "date": "2026-11-24T10:00:00",
              "machine": {"cpu": "Some CPU", "cores": 2, "load_average_before": [3.0, 0, 0],
                          "load_average_after": [3.0, 0, 0]},
              "versions": {"torch": "2.13.0"}, "dims": {"visual_tokens_per_image": 576, "checkpoint_weight_bytes": 1},
              "ffn_layers": [3, 4], "floors": {"matmul_flops_per_s": 1e11, "copy_bytes_per_s": 1e10, "threads": 2},
              "seconds": 60, "rows": [], "targets": [], "memory": {}, "validation": {}, "checks": [], "profiles": {}}
    text = format_markdown(report)
    assert "shared, loaded machine" in text and "Smoke run" in text
    quiet = {**report["machine"], "load_average_before": [0.5, 0, 0], "load_average_after": [0.9, 0, 0]}
    assert "loaded machine" not in format_markdown({**report, "machine": quiet})


# --- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["bench", "--visual", "600"], "--visual 600 must be a positive multiple of 576"),
    (["bench", "--threads", "0"], "--threads 0 must be >= 1"),
    (["bench", "--dtype", "bf16"], "--dtype bf16 needs --device cuda"),
    (["bench", "--new-tokens", "0"], "--new_tokens 0 must be >= 1".replace("_", "-")),
    (["bench", "--keep", "600", "--visual", "576", "1152"], "k must be in [1, 576]"),
    (["bench", "--update", "table.txt", "--smoke"], "--update table.txt must be a Markdown file"),
    (["bench", "--out", "results.txt", "--smoke"], "--out results.txt must be a .json path or an existing folder"),
])
def test_bench_refuses_bad_arguments_before_any_work(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "bench").exists()


def test_genai_peer_is_not_charged_with_torch():
    """Peers run as a file: the GenAI peer's process must not import torch (the package does)."""
    from capa_export.bench import PEERS_SCRIPT

    code = (f"import runpy, sys; runpy.run_path({str(PEERS_SCRIPT)!r}, run_name='peers'); "
            f"print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_a_run_is_quiet_when_nothing_else_ran():
    """The load before the run says whether other work ran; the load after it still holds the
    run's own threads (a quiet 2-thread run ends near 2), so only more than that marks it loaded."""
    from capa_export.bench import is_quiet

    def info(before, after):
        return {"cores": 2, "load_average_before": [before, 0, 0], "load_average_after": [after, 0, 0]}

    assert is_quiet(info(0.35, 1.7), threads=2)
    assert not is_quiet(info(9.49, 11.97), threads=2)   # the 2026-11-24 run: other sessions' work
    assert not is_quiet(info(0.3, 4.0), threads=2)      # something started during the run
    assert not is_quiet(info(0.3, 1.7), threads=1)      # a 1-thread run cannot raise the load to 1.7


def test_default_prompts_fit_the_sizes_picture():
    """With no --visual, every size gets prompts its pictures can make: LLaVA-1.5's one and five
    pictures (576, 2880), LLaVA-NeXT's one anyres picture (its most tokens, 2928)."""
    from capa_export.bench import check_settings

    assert check_settings(Settings(size="mid")).visual == [576, 2880]
    assert check_settings(Settings(size="llava-next-mid")).visual == [2928]
