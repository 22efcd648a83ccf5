"""Prefix reuse through `mixtral serve`, as a chat client sees it: time to first token at every turn of a
conversation sent whole each turn (the OpenAI client, greedy), with the prefix cache and without it, in one run.

    python bench/prefix_chat.py                     # the shipped model, then "small" random weights
    python bench/prefix_chat.py --model DIR --turns 10 --repeat 3

Phase 1: 10-turn conversations (`--repeat` of them, each with other questions) against two servers on the same
model, one with `--prefix-cache-memory 0`: TTFT per turn (the median over the conversations) as the client sees
it (from its call, and from the moment its request is sent: the OpenAI client's own preparation of a request,
which grows with the conversation, is the difference) and as the server measures it (submission to first token,
from /metrics: what the cache saves, without the fixed cost of HTTP and the client), the cached tokens the server
reported (usage.prompt_tokens_details.cached_tokens), and whether the replies are identical; then the last
conversation's final turn is sent again as it was, which leaves nothing to prefill: its TTFT is the floor that the
client, HTTP and the server's handling of a request set, and the turn's TTFT without the cache over it is the
largest speed-up any cache could show here. Phase 2 (the server with
the cache, a small budget): 8 conversations at a time, all sharing one long system prompt, interleaved turn by turn:
how many prompt tokens came from the cache, evictions, and the cache's peak size against its budget, from
/metrics.

Each server is a `mixtral serve` subprocess on a free loopback port. "small" is the benchmark shape of
bench/decode.py (hidden 512, 8 layers, 8 experts top-2, random bf16), with the shipped model's tokenizer and
chat template.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

QUESTIONS = ["Who goes there?", "What news from the court?", "How fares the king?", "And what of the queen?",
             "Where is the prince tonight?", "Why does he walk the battlements?", "Who saw the ghost?",
             "What did it say to him?", "Shall we tell the king?", "What must we do now?", "Speak plainly, friend.",
             "Is there more?"]
SYSTEM = ("You are a player in a company of actors at the Globe. Answer in the manner of the plays: in verse where "
          "it suits, with courtesy to lords and ladies, plain speech to soldiers, and never break the scene. ") * 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(model: str, prefix_memory: str, extra: list[str]):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "mixtral", "serve", "--model", model, "--port", str(port),
                                "--prefix-cache-memory", prefix_memory, *extra],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited: {process.stderr.read()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.time() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(30)


def turn(client, messages: list[dict], max_tokens: int) -> tuple[float, str, int, float]:
    """One streamed chat completion: (seconds to the first content, the reply, cached prompt tokens, seconds from
    the moment the request left the client to the first content). The OpenAI client's own preparation of a request
    (checking and converting the messages, ~5 ms for a 19-message conversation on a 2-core Xeon) is the gap."""
    start, first, parts, cached = time.perf_counter(), None, [], 0
    client.sent = None
    stream = client.chat.completions.create(model="mixtral", messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            details = chunk.usage.prompt_tokens_details
            cached = (details.cached_tokens or 0) if details is not None else 0
        for choice in chunk.choices:
            if choice.delta.content:
                first = first if first is not None else time.perf_counter()
                parts.append(choice.delta.content)
    first = first if first is not None else time.perf_counter()
    return first - start, "".join(parts), cached, first - (client.sent or start)


def openai_client(url: str):
    """The OpenAI client, on an httpx client that notes when each request is sent (`client.sent`); closing the
    OpenAI client closes it."""
    from openai import OpenAI

    def sent(request):
        client.sent = time.perf_counter()

    client = OpenAI(base_url=f"{url}/v1", api_key="none", http_client=httpx.Client(event_hooks={"request": [sent]}))
    return client


def server_ttft_total(url: str) -> float:
    """The server's own sum of times from submission to first token (/metrics), over all requests so far."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("mixtral_time_to_first_token_seconds_sum "):
            return float(line.split()[1])
    raise RuntimeError("the server's /metrics has no mixtral_time_to_first_token_seconds")


def conversation(url: str, turns: int, max_tokens: int, system: str | None = None, offset: int = 0,
                 server_side: bool = False, last_prompt: list | None = None) -> list[tuple]:
    """(client TTFT, reply, cached tokens, server TTFT or None, TTFT from the request sent) per turn; the last turn's
    messages (before its reply) go into `last_prompt` when it is given."""
    messages = [{"role": "system", "content": system}] if system else []
    results = []
    with openai_client(url) as client:
        for i in range(turns):
            messages.append({"role": "user", "content": QUESTIONS[(i + offset) % len(QUESTIONS)]})
            if last_prompt is not None and i == turns - 1:
                last_prompt[:] = list(messages)
            results.append(timed_turn(url, client, messages, max_tokens, server_side))
            messages.append({"role": "assistant", "content": results[-1][1]})
    return results


def timed_turn(url: str, client, messages: list[dict], max_tokens: int, server_side: bool) -> tuple:
    before = server_ttft_total(url) if server_side else None
    ttft, reply, cached, from_sent = turn(client, messages, max_tokens)
    inside = server_ttft_total(url) - before if server_side else None
    return ttft, reply, cached, inside, from_sent


def floor(url: str, messages: list[dict], max_tokens: int, repeat: int = 7) -> tuple[float, float, float]:
    """Median (client, sent, server) TTFT of a prompt sent again as it was: every token but the last comes from the
    cache, so nothing is left to prefill. What the client, HTTP and the server's own handling cost whatever the
    cache does: the cache cannot bring a turn's time to first token below it."""
    with openai_client(url) as client:
        runs = [timed_turn(url, client, messages, max_tokens, True) for _ in range(repeat)]
    return tuple(statistics.median(run[k] for run in runs) for k in (0, 4, 3))


def metrics(url: str) -> dict[str, float]:
    found = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        match = re.match(r"(mixtral_prefix_cache_\w+?)(?:_total)? ([0-9.e+]+)$", line)
        if match:
            found[match.group(1)] = float(match.group(2))
    return found


def phase_one(model: str, turns: int, max_tokens: int, extra: list[str], repeat: int) -> None:
    runs, last = {}, []
    for label, memory in (("cache", "256MiB"), ("off", "0")):
        with server(model, memory, extra) as url:
            conversation(url, 1, 4)  # warm-up (kernels, first allocations), a different conversation
            runs[label] = [conversation(url, turns, max_tokens, offset=1 + r, server_side=True,
                                        last_prompt=last if label == "cache" else None) for r in range(repeat)]
            if label == "cache":
                lowest = floor(url, last, max_tokens)
    print(f"{repeat} conversation(s) of {turns} turns; each TTFT is the median over the conversations: as the "
          f"client saw it (from its call), from the moment its request was sent (without the OpenAI client's own "
          f"preparation of the request), and as the server measured it (submission to first token, /metrics):")
    columns = (("client", 0), ("sent", 4), ("server", 3))
    print("turn" + "".join(f"  {name + ': cache s':>16}{'off s':>8}{'speed-up':>9}" for name, _ in columns)
          + f"{'cached tokens':>15}")
    for i in range(turns):
        line = f"{i + 1:>4}"
        for _, k in columns:
            on, off = (statistics.median(run[i][k] for run in runs[label]) for label in ("cache", "off"))
            line += f"  {on:>16.3f}{off:>8.3f}{off / on:>8.1f}x"
        print(line + f"{statistics.median(run[i][2] for run in runs['cache']):>15.0f}")
    last = [off[-1][0] / on[-1][0] for on, off in zip(runs["cache"], runs["off"])]
    print(f"turn {turns} client speed-up of each conversation: " + ", ".join(f"{x:.1f}x" for x in last))
    sent = [off[-1][4] / on[-1][4] for on, off in zip(runs["cache"], runs["off"])]
    print(f"turn {turns} speed-up from the request sent, each conversation: " + ", ".join(f"{x:.1f}x" for x in sent))
    off_last = [statistics.median(run[-1][k] for run in runs["off"]) for k in (0, 4, 3)]
    print(f"turn {turns} of the last conversation sent again as it was (nothing left to prefill), the cache's floor: "
          f"client {lowest[0]:.3f} s, sent {lowest[1]:.3f} s, server {lowest[2]:.3f} s; so no cache can make turn "
          f"{turns} more than " + ", ".join(f"{off / low:.1f}x" for off, low in zip(off_last, lowest))
          + " faster as the client, the request sent and the server see it")
    same = [on[1] == off[1] for a, b in zip(runs["cache"], runs["off"]) for on, off in zip(a, b)]
    print(f"replies identical with and without the cache: {sum(same)}/{len(same)}")


def phase_two(model: str, max_tokens: int, extra: list[str], budget: str) -> None:
    with server(model, budget, extra + ["--max-batch-size", "8"]) as url:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: conversation(url, 3, max_tokens, SYSTEM, offset=i), range(8)))
        found = metrics(url)
    first_turns = [r[0][2] for r in results]
    print(f"8 conversations x 3 turns sharing a {len(SYSTEM)}-character system prompt, 8 at a time, budget {budget}:")
    print(f"  cached tokens of each conversation's first turn: {first_turns}")
    print(f"  cached tokens of later turns: {[t[2] for r in results for t in r[1:]]}")
    print("  /metrics: " + ", ".join(f"{k.removeprefix('mixtral_prefix_cache_')} {v:,.0f}" for k, v in found.items()))


def small_checkpoint(out: Path) -> str:
    sys.path.insert(0, str(Path(__file__).parent))
    from decode import model_args, write_random_checkpoint

    from mixtral.loading import default_model_path

    write_random_checkpoint(model_args("small"), out)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(default_model_path() / name, out / name)
    return str(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model directory (default: the shipped model, then small)")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=3, help="phase 1's conversations (different questions)")
    parser.add_argument("--budget", default="2MiB", help="phase 2's prefix cache budget (small: evictions happen)")
    parser.add_argument("--exact", action="store_true", help="serve with --exact (prompts on the fp32 kernels)")
    opts = parser.parse_args()
    extra = ["--exact"] if opts.exact else []
    with tempfile.TemporaryDirectory() as tmp:
        if opts.model:
            models = [(opts.model, opts.model)]
        else:
            from mixtral.loading import default_model_path

            models = [("shipped model", str(default_model_path())), ("small", small_checkpoint(Path(tmp)))]
        for name, path in models:
            print(f"== {name}")
            phase_one(path, opts.turns, opts.max_tokens, extra, opts.repeat)
            phase_two(path, opts.max_tokens, extra, opts.budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
