"""The benchmarks run end to end on CI-sized inputs (their numbers are not asserted: this machine is shared)."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from mixtral.kernels import native_lib
from mixtral.data import prepare

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args, "--json"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_decode_bench_compares_engines_side_by_side():
    report = _run("decode.py", "--config", "tiny", "--runs", "ours:bf16,ours:int8,ours:int8+head,ours:int4,hf:bf16",
                  "--prompt-tokens", "16", "--new-tokens", "8", "--threads", "1", "--bandwidth-mb", "64",
                  "--repeat", "2")
    results = {(r["engine"], r["precision"]): r for r in report["results"]}
    assert all("error" not in r for r in results.values()), results
    for r in results.values():
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["load_rss_growth_mb"] >= 0
        assert 0 < r["fraction_of_bound"] and r["decode_vs_hf_bf16"] > 0
    assert report["pack"] and report["checkpoint_mb"] > 0
    # weight bytes a decode token reads: the tiny model's 16-bit lm_head (32000 x 128) outweighs its experts, so
    # int8 with an int8 lm_head < int4 < int8 < bf16
    bytes_read = [results[("ours", p)]["active_bytes"] for p in ("int8+head", "int4", "int8", "bf16")]
    assert bytes_read == sorted(bytes_read) and len(set(bytes_read)) == 4
    expected = "native" if native_lib.available() else "fbgemm"
    assert {results[("ours", p)]["kernels"] for p in ("bf16", "int8")} == {expected}
    # the same weights as transformers reads (ours keeps the small norm and router weights in fp32)
    ours, theirs = results[("ours", "bf16")]["active_bytes"], results[("hf", "bf16")]["active_bytes"]
    assert theirs <= ours <= 1.001 * theirs


def test_decode_bench_reports_a_llama_cpp_failure_in_its_rows(tmp_path):
    """llama.cpp is not in CI: a missing llama-bench gives its three rows an error; the other rows are measured."""
    report = _run("decode.py", "--config", "tiny", "--runs", "ours:bf16", "--prompt-tokens", "8", "--new-tokens", "4",
                  "--threads", "1", "--bandwidth-mb", "16", "--repeat", "1", "--llama-bench", str(tmp_path / "none"))
    rows = [(r["engine"], r["precision"]) for r in report["results"]]
    assert rows == [("ours", "bf16"), ("llama.cpp", "bf16"), ("llama.cpp", "int8"), ("llama.cpp", "int4")]
    assert report["results"][0]["decode_tok_s"] > 0
    assert all("not an executable" in r["error"] for r in report["results"][1:])


def test_quality_bench_reports_quantized_perplexity(tmp_path):
    prepare(tmp_path, plays=["julius_caesar", "macbeth"], progress=False)
    report = _run("quality.py", "--data", str(tmp_path), "--max-tokens", "1500", "--prompts", "2",
                  "--new-tokens", "6", "--threads", "1")
    rows = {r["setting"]: r for r in report["results"]}
    assert list(rows) == ["bf16", "int8", "int8+head", "int4"]
    assert rows["bf16"]["perplexity_change"] == 0 and rows["bf16"]["greedy_token_agreement"] == 1
    for row in rows.values():
        assert 1 < row["perplexity"] < 1000 and 0 <= row["greedy_identical_prefix"] <= 1


def test_serve_load_client_counts_what_the_server_streamed():
    """bench/serve_load.py's own HTTP client (one asyncio thread, plain HTTP/1.1) against a real server: the tokens it
    counts are the ones the server says it generated, and a request the server refuses fails with the server's
    reason instead of counting nothing."""
    sys.path.insert(0, str(BENCH))
    try:
        import serve_load
    finally:
        sys.path.remove(str(BENCH))
    args = argparse.Namespace(threads=None, model=None, config="tiny", dtype="float32", max_batch_size=4)

    def generated(url: str) -> float:
        metrics = httpx.get(f"{url}/metrics").text
        return float(re.search(r"^mixtral_generated_tokens_total (\S+)$", metrics, re.M).group(1))

    with serve_load.local_server(args) as (url, _):
        before = generated(url)
        row = asyncio.run(serve_load.run_level(url, 3, 5, 6))
        assert row["requests"] == 5 and 5 <= row["tokens"] <= 30 and row["ttft_p50"] > 0
        assert row["tokens"] == generated(url) - before
        host, port = url.removeprefix("http://").split(":")
        with pytest.raises(RuntimeError, match="422.*max_new_tokens"):
            asyncio.run(serve_load.one_request(host, int(port), "hi", 10**7))
