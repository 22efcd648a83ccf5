"""Load test of `mixtral serve`: aggregate generated tokens/s and time to first token at several concurrencies.

    python bench/serve_load.py --url http://127.0.0.1:8080            # a server that is already running
    python bench/serve_load.py --model path/to/model --dtype float32  # start one here, in this process
    python bench/serve_load.py --config small                         # a random model of decode.py's "small"

Each concurrency level runs `--requests` streamed TGI requests (greedy, `--max-new-tokens` each; short
prompts of different lengths), that many at once, and reports the generated tokens per second of wall time and
the p50/p95 time to first token. The last line is the 8-vs-1 throughput ratio: what continuous batching buys over
serving one request at a time, measured side by side in one run.

The client is one asyncio thread speaking plain HTTP/1.1 to an http:// URL (each event counted as its line arrives;
only a line that names an error is parsed; a request fails after 600 s), because it shares the machine with the
server: 16 httpx streams in threads took a third of a core on 2 cores, and the server's throughput with it (16
streams of "small" bf16 on Zen 4, the same server: 504-575 tokens/s with them, 666-724 with this client, which
takes 4% of a core). A server started here shares this process (and its GIL) with the client; for numbers about
the server alone, run `mixtral serve` separately and pass --url.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import sys
import threading
import time
from urllib.parse import urlsplit

WORDS = ("Now is the winter of our discontent made glorious summer by this sun of York and all the clouds "
         "that lour'd upon our house in the deep bosom of the ocean buried").split()
SHAPES = {  # random models for --config: no download needed (the tokenizer comes from mistral-common); "small" and
    # "medium" are decode.py's (hidden 512 / 1024, ffn 1792 / 3584, 8 / 16 layers, 8 experts top-2), "shipped" the
    # shipped model's shape
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, n_experts=4, top_k=2),
    "shipped": dict(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=32, hidden_dim=128, n_experts=8, top_k=2),
    "small": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=1792, n_experts=8, top_k=2),
    "medium": dict(dim=1024, n_layers=16, n_heads=16, n_kv_heads=4, head_dim=64, hidden_dim=3584, n_experts=8,
                   top_k=2),
}


def endpoint(url: str) -> tuple[str, int, str, str]:
    """(host, port, route, Host header) of a server's TGI streaming route, from its base URL (plain http only)."""
    where = urlsplit(url)
    if where.scheme != "http" or not where.hostname:
        raise ValueError(f"--url must be an http:// URL such as http://127.0.0.1:8080 (got {url!r}); this client "
                         "speaks plain HTTP only")
    return where.hostname, where.port or 80, where.path.rstrip("/") + "/generate_stream", where.netloc


async def _body(reader: asyncio.StreamReader, headers: dict, chunked: bool):
    """The response body's pieces as they arrive: chunked (as uvicorn streams), Content-Length, or to the end."""
    if chunked:
        while True:
            line = await reader.readline()
            if not line.strip():
                raise ConnectionError("the server closed the connection in the middle of the stream")
            size = int(line.split(b";")[0], 16)
            if size == 0:  # the last chunk (any trailers are left unread: the connection closes)
                return
            yield (await reader.readexactly(size + 2))[:-2]
    left = int(headers["content-length"]) if "content-length" in headers else None
    while left is None or left > 0:
        data = await reader.read(1 << 16 if left is None else min(left, 1 << 16))
        if not data:
            if left:
                raise ConnectionError("the server closed the connection before the end of the body")
            return
        left = None if left is None else left - len(data)
        yield data


async def one_request(url: str, prompt: str, max_new_tokens: int, api_key: str | None = None
                      ) -> tuple[float | None, int]:
    """Stream one request over its own connection (with `Authorization: Bearer api_key` where given); return
    (seconds to the first token, tokens received)."""
    host, port, route, host_header = endpoint(url)
    body = json.dumps({"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens}}).encode()
    start, first, tokens = time.perf_counter(), None, 0
    reader, writer = await asyncio.open_connection(host, port)
    try:
        auth = b"Authorization: Bearer %s\r\n" % api_key.encode() if api_key else b""
        writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"%sConnection: close\r\n\r\n%s" % (route.encode(), host_header.encode(), len(body), auth, body))
        status = (await reader.readline()).decode("latin-1").strip()
        headers = {}
        while (line := await reader.readline()).strip():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        chunked = "chunked" in headers.get("transfer-encoding", "")
        if status.split(" ")[1:2] != ["200"]:
            text = b""
            async for data in _body(reader, headers, chunked):
                text += data
                if len(text) > 4000:
                    break
            raise RuntimeError(f"server answered {status or 'nothing'}: {text[:4000].decode(errors='replace')}")
        pending = b""
        async for data in _body(reader, headers, chunked):
            *lines, pending = (pending + data).split(b"\n")  # SSE lines end in LF or CRLF (CR alone: not handled)
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                if b'"error"' in line and "error" in (event := json.loads(line[5:])):
                    raise RuntimeError(f"server error: {event['error']}")
                first = first if first is not None else time.perf_counter() - start
                tokens += 1
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return first, tokens


async def run_level(url: str, concurrency: int, n_requests: int, max_new_tokens: int, timeout: float = 600,
                    api_key: str | None = None) -> dict:
    """`n_requests` requests, `concurrency` at a time; a request that takes longer than `timeout` seconds fails."""
    prompts = [" ".join(WORDS[: 3 + (7 * i) % (len(WORDS) - 3)]) for i in range(n_requests)]
    slots = asyncio.Semaphore(concurrency)

    async def limited(prompt: str) -> tuple[float | None, int]:
        async with slots:
            return await asyncio.wait_for(one_request(url, prompt, max_new_tokens, api_key), timeout)

    start = time.perf_counter()
    results = await asyncio.gather(*(limited(p) for p in prompts))
    wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results if r[0] is not None)
    tokens = sum(r[1] for r in results)
    return {"concurrency": concurrency, "requests": n_requests, "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]}


@contextlib.contextmanager
def local_server(args):
    """Load (or make) a model, start the engine and a uvicorn server on a free loopback port."""
    import torch
    import uvicorn

    from mixtral.engine import Engine
    from mixtral.server import create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        from mixtral import load

        model, tokenizer = load(args.model, dtype=args.dtype, progress=False)
        name = str(args.model)
    else:
        from mixtral import kernels
        from mixtral.config import ModelArgs
        from mixtral.model import Transformer
        from mixtral.tokenizer import load_tokenizer, mistral_v1_tokenizer_path

        torch.manual_seed(0)
        model = Transformer(ModelArgs(**SHAPES[args.config], vocab_size=32000, max_seq_len=1024))
        for param in model.parameters():
            torch.nn.init.normal_(param, std=0.05)
        model = model.to(getattr(torch, args.dtype)).eval()
        kernels.prepare(model)  # on our kernels, as `load` puts a model it loads (without this: torch's reference)
        tokenizer = load_tokenizer(mistral_v1_tokenizer_path())
        name = f"random-{args.config}"
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_queue=256)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, name), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", name
    finally:
        server.should_exit = True
        thread.join(10)
        engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running server (TGI routes)")
    where.add_argument("--model", help="model directory or Hub id to serve in this process")
    where.add_argument("--config", choices=sorted(SHAPES), default="small", help="random model shape (default small)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-batch-size", type=int, default=16, help="engine slots, for a server started here")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads, for a server started here")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per level (default 4 x concurrency, 16 at least)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--api-key", default=None, help="for a server started with --api-key: sent as a bearer token")
    args = parser.parse_args(argv)

    if args.url:
        try:
            endpoint(args.url)
        except ValueError as exc:
            parser.error(str(exc))
    server = contextlib.nullcontext((args.url.rstrip("/"), args.url)) if args.url else local_server(args)
    with server as (url, name):
        try:
            asyncio.run(asyncio.wait_for(one_request(url, "warm up", 4, args.api_key), 600))
            rows = []
            for level in args.concurrency:
                rows.append(asyncio.run(run_level(url, level, args.requests or max(16, 4 * level),
                                                  args.max_new_tokens, api_key=args.api_key)))
                r = rows[-1]
                print(f"  concurrency {level:>3}: {r['tokens_per_s']:8.1f} tok/s", file=sys.stderr, flush=True)
        except (RuntimeError, OSError, EOFError, asyncio.TimeoutError) as exc:  # the server's answer, or no server
            print(f"serve_load.py: error: {str(exc) or type(exc).__name__}", file=sys.stderr)
            return 1
    base = rows[0]["tokens_per_s"]
    print(f"\nserving {name}: {args.max_new_tokens} new tokens per request\n")
    print(f"{'concurrency':>11} {'requests':>8} {'tokens':>7} {'tok/s':>9} {'vs c=1':>7} {'TTFT p50':>9} "
          f"{'TTFT p95':>9}")
    for r in rows:
        print(f"{r['concurrency']:>11} {r['requests']:>8} {r['tokens']:>7} {r['tokens_per_s']:>9.1f} "
              f"{r['tokens_per_s'] / base:>6.2f}x {r['ttft_p50'] * 1000:>7.0f}ms {r['ttft_p95'] * 1000:>7.0f}ms")
    by_level = {r["concurrency"]: r["tokens_per_s"] for r in rows}
    if 1 in by_level and 8 in by_level:
        print(f"\nthroughput at concurrency 8 vs 1: {by_level[8] / by_level[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
