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


def _serve_load():
    sys.path.insert(0, str(BENCH))
    try:
        import serve_load
    finally:
        sys.path.remove(str(BENCH))
    return serve_load


def test_serve_load_client_counts_what_the_server_streamed():
    """bench/serve_load.py's own HTTP client (one asyncio thread, plain HTTP/1.1) against a real server: the tokens it
    counts are the ones the server says it generated, and a request the server refuses fails with the server's
    reason instead of counting nothing."""
    serve_load = _serve_load()
    args = argparse.Namespace(threads=None, model=None, config="tiny", dtype="float32", max_batch_size=4)

    def generated(url: str) -> float:
        metrics = httpx.get(f"{url}/metrics").text
        return float(re.search(r"^mixtral_generated_tokens_total (\S+)$", metrics, re.M).group(1))

    with serve_load.local_server(args) as (url, _):
        before = generated(url)
        row = asyncio.run(serve_load.run_level(url, 3, 5, 6, timeout=120))
        assert row["requests"] == 5 and 5 <= row["tokens"] <= 30 and row["ttft_p50"] > 0
        assert row["tokens"] == generated(url) - before
        with pytest.raises(RuntimeError, match="422.*max_new_tokens"):
            asyncio.run(asyncio.wait_for(serve_load.one_request(url, "hi", 10**7), 120))


def _chunked(*pieces: bytes, trailer: bytes = b"") -> bytes:
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n" + trailer + b"\r\n"


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
EVENT = b'data:{"token":{"id":5,"text":"\\"error\\"","logprob":-1.0,"special":false}}\r\n\r\n'


@pytest.mark.parametrize("response, outcome", [
    # chunked, with chunk extensions, an event split across chunks, CRLF line ends and a trailer after the last chunk
    (SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n"
     + _chunked(EVENT + EVENT[:20], EVENT[20:], EVENT, trailer=b"x-trailer: 1\r\n"), 3),
    (SSE_HEAD + b"content-length: %d\r\n\r\n" % (2 * len(EVENT)) + 2 * EVENT, 2),  # a Content-Length body
    (SSE_HEAD + b"\r\n" + 2 * EVENT, 2),  # a body that ends when the connection closes
    (SSE_HEAD + b"content-length: %d\r\n\r\n" % (2 * len(EVENT)) + EVENT, "before the end"),  # a body cut short
    (SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n"
     + _chunked(EVENT, b'data:{"error":"boom","error_type":"generation"}\n\n'), "server error: boom"),
    (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 16\r\n\r\n{\"error\":\"busy\"}", "503.*busy"),
    (SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (len(EVENT), EVENT), "in the middle"),
])
def test_serve_load_client_reads_http_as_servers_may_send_it(response, outcome):
    """The client against hand-made responses: what it counts is the number of events sent, whatever the framing,
    and an error (in the stream, as a status, or a connection cut short) is raised with its reason."""
    serve_load = _serve_load()
    requests = []

    async def handler(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
        requests.append((head, await reader.readexactly(length)))
        writer.write(response)
        await writer.drain()
        writer.close()

    async def run():
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await asyncio.wait_for(serve_load.one_request(f"http://127.0.0.1:{port}/prefix/", "hi", 4,
                                                                 api_key="s3cret"), 30)

    if isinstance(outcome, int):
        first, tokens = asyncio.run(run())
        assert tokens == outcome and first is not None
    else:
        with pytest.raises((RuntimeError, ConnectionError), match=outcome):
            asyncio.run(run())
    head, body = requests[0]
    assert head.startswith(b"POST /prefix/generate_stream HTTP/1.1\r\n") and b"\r\nHost: 127.0.0.1:" in head
    assert b"\r\nAuthorization: Bearer s3cret\r\n" in head
    assert json.loads(body) == {"inputs": "hi", "parameters": {"max_new_tokens": 4}}


def test_serve_load_refuses_urls_it_cannot_speak_to():
    serve_load = _serve_load()
    for url in ("https://example.com", "127.0.0.1:8080"):
        with pytest.raises(ValueError, match="http://"):
            serve_load.endpoint(url)
    assert serve_load.endpoint("http://[::1]:9000/v") == ("::1", 9000, "/v/generate_stream", "[::1]:9000")
