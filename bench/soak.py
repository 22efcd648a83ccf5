"""Soak test of `mixtral serve`: minutes of mixed traffic from many clients, then the books are balanced.

    python bench/soak.py --minutes 20 --clients 64              # the shipped model
    python bench/soak.py --minutes 2 --clients 16 --model DIR --json

A `mixtral serve` subprocess (--max-batch-size 8, --max-concurrent-requests 32, so 64 clients overload it) gets,
from --clients threads at once until the time is up: TGI and OpenAI requests, streamed and not; streams the client
drops part-way (the server must cancel them); bad inputs (malformed JSON, wrong types, out-of-range values, a
text/plain body, a foreign Host header, unknown routes); and every --burst-every seconds a burst in which every
client fires at once. Every request must end as finished, cancelled (by the client), rejected (429, or 503 after
--max-queue-time) or a clean 4xx: none lost (no reply, a broken stream, a timeout), none 5xx otherwise. At the
end the server's /metrics must agree with what the clients saw, and its resident memory (less the prefix cache,
which fills up to its budget by design), threads and open files, sampled every 10 s, must not grow after the
warm-up (the sample at 2 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

PROMPTS = ["Who goes there?", "What news from the battle?", "Wilt thou be my love?", "I am no traitor, sir.",
           "Good morrow, my lord. How fares the king?"]
BAD = [  # (method, route, body bytes, headers): each must get a clean 4xx
    ("POST", "/generate", b'{"inputs": "hi", "parameters": {', {}),
    ("POST", "/generate", b'{"inputs": 5}', {}),
    ("POST", "/generate", b'{"inputs": "hi", "parameters": {"temperature": -1}}', {}),
    ("POST", "/generate", b'{"inputs": "hi", "parameters": {"max_new_tokens": 100000000}}', {}),
    ("POST", "/generate", b'{"inputs": "hi", "parameters": {"top_p": 7}}', {}),
    ("POST", "/generate", b'[1, 2, 3]', {}),
    ("POST", "/generate", b'{"inputs": "hi"}', {"Content-Type": "text/plain"}),
    ("POST", "/v1/chat/completions", b'{"model": "x", "messages": []}', {}),
    ("POST", "/v1/chat/completions", b'{"model": "x", "messages": [{"role": "wizard", "content": "hi"}]}', {}),
    ("POST", "/v1/chat/completions", b'{"model": "x", "messages": "hi"}', {}),
    ("POST", "/v1/completions", b'{"model": "x", "prompt": "hi", "max_tokens": -5}', {}),
    ("POST", "/v1/completions", b'{"model": "x", "prompt": "hi", "n": 1e400}', {}),
    ("GET", "/no/such/route", b"", {}),
    ("GET", "/info", b"", {"Host": "evil.example"}),
]


class Books:
    """What the clients saw, by outcome, and anything that went wrong."""

    def __init__(self):
        self.lock = threading.Lock()
        self.outcomes: Counter = Counter()
        self.statuses: Counter = Counter()
        self.problems: list[str] = []

    def add(self, outcome: str, status: int | None = None, problem: str | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if status is not None:
                self.statuses[status] += 1
            if problem and len(self.problems) < 50:
                self.problems.append(problem)


def tgi_body(rng: random.Random) -> dict:
    parameters = {"max_new_tokens": rng.randint(1, 48), "seed": rng.randint(0, 9)}  # greedy, or sampled:
    parameters.update({"do_sample": True, "temperature": 0.8} if rng.random() < 0.5 else {})
    return {"inputs": rng.choice(PROMPTS), "parameters": parameters}


def chat_body(rng: random.Random, stream: bool) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": rng.randint(1, 48), "stream": stream, "temperature": rng.choice([0, 0.8])}


def refused(books: Books, response: httpx.Response) -> bool:
    """Book a refusal (429, a queue-time 503) or a 5xx; True if the response was one."""
    if response.status_code == 429 or (response.status_code == 503 and "retry-after" in response.headers):
        books.add("rejected", response.status_code)
        return True
    if response.status_code >= 500:
        books.add("server_error", response.status_code, f"{response.status_code}: {response.text[:200]}")
        return True
    return False


def streamed(books: Books, client: httpx.Client, url: str, route: str, body: dict, drop_after: int | None) -> None:
    with client.stream("POST", url + route, json=body, timeout=300) as response:
        if response.status_code != 200:
            response.read()
            if not refused(books, response):
                books.add("client_error", response.status_code, f"unexpected {response.status_code} on {route}")
            return
        events, ended = 0, False
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                ended = True
                break
            event = json.loads(data)
            if "error" in event:
                kind = event.get("error_type") or (event["error"].get("code") if isinstance(event["error"], dict)
                                                   else None)
                books.add("rejected" if kind == "queue_timeout" else "server_error", None,
                          None if kind == "queue_timeout" else f"stream error: {event}")
                return
            events += 1
            if route == "/generate_stream" and event.get("generated_text") is not None:
                ended = True
                break
            if drop_after is not None and events >= drop_after:
                books.add("cancelled")
                return  # leaving the block closes the connection: the server must cancel the request
        if ended:
            books.add("finished", 200)
        else:
            books.add("lost", None, f"stream on {route} ended without its final event")


def one_request(books: Books, client: httpx.Client, url: str, rng: random.Random) -> None:
    kind = rng.random()
    try:
        if kind < 0.12:  # a bad input
            method, route, body, headers = rng.choice(BAD)
            headers = {"Content-Type": "application/json", **headers}
            response = client.request(method, url + route, content=body, headers=headers, timeout=60)
            if 400 <= response.status_code < 500 and response.status_code != 429:
                books.add("bad_input_refused", response.status_code)
            elif not refused(books, response):
                books.add("client_error", response.status_code, f"bad input got {response.status_code}: {route}")
        elif kind < 0.30:
            response = client.post(url + "/generate", json=tgi_body(rng), timeout=300)
            if not refused(books, response):
                ok = response.status_code == 200 and "generated_text" in response.json()
                books.add("finished" if ok else "client_error", response.status_code,
                          None if ok else f"/generate {response.status_code} {response.text[:200]}")
        elif kind < 0.48:
            response = client.post(url + "/v1/chat/completions", json=chat_body(rng, False), timeout=300)
            if not refused(books, response):
                ok = response.status_code == 200 and response.json()["choices"][0]["message"] is not None
                books.add("finished" if ok else "client_error", response.status_code,
                          None if ok else f"chat {response.status_code} {response.text[:200]}")
        else:
            route = "/generate_stream" if kind < 0.74 else "/v1/chat/completions"
            body = tgi_body(rng) if route == "/generate_stream" else chat_body(rng, True)
            drop = rng.randint(1, 4) if rng.random() < 0.25 else None
            streamed(books, client, url, route, body, drop)
    except (httpx.TransportError, json.JSONDecodeError, KeyError) as exc:
        books.add("lost", None, f"{type(exc).__name__}: {exc}")


def process_numbers(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024
    threads = int(re.search(r"Threads:\s+(\d+)", status)[1])
    return {"rss_mb": round(rss, 1), "threads": threads, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def metrics(url: str) -> dict:
    text = httpx.get(url + "/metrics", timeout=30).text
    found = {}
    for name, label, value in re.findall(r'^(mixtral_\w+?)(?:\{(.*?)\})? ([0-9.e+-]+)$', text, re.M):
        found[f"{name}{{{label}}}" if label else name] = float(value)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--burst-every", type=float, default=60, help="seconds between bursts")
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mixtral", "serve", "--port", str(port), "--max-batch-size", "8",
               "--max-concurrent-requests", "32", "--max-queue-time", "30"]
    server = subprocess.Popen(command + (["--model", opts.model] if opts.model else []), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while True:
        if server.poll() is not None or time.time() > deadline:
            print("mixtral serve did not start", file=sys.stderr)
            return 1
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.5)

    books, samples = Books(), []
    start = time.time()
    end = start + opts.minutes * 60
    burst = threading.Event()

    def client_loop(n: int) -> None:
        rng = random.Random(n)
        with httpx.Client() as client:
            while time.time() < end:
                one_request(books, client, url, rng)
                burst.wait(rng.uniform(0, 0.5))  # a burst releases every client at once

    def sampler() -> None:
        next_burst = start + opts.burst_every
        while time.time() < end:
            cache = metrics(url).get("mixtral_prefix_cache_bytes", 0.0)  # a bounded cache, not a leak: kept apart
            samples.append({"t": round(time.time() - start, 1), **process_numbers(server.pid),
                            "prefix_cache_mb": round(cache / 2**20, 1)})
            for _ in range(10):
                if time.time() >= next_burst:
                    burst.set()
                    time.sleep(0.05)
                    burst.clear()
                    next_burst += opts.burst_every
                time.sleep(1)

    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(opts.clients)]
    watcher = threading.Thread(target=sampler)
    for thread in [*threads, watcher]:
        thread.start()
    for thread in [*threads, watcher]:
        thread.join()
    time.sleep(2)  # cancelled streams are counted by the server at its next step
    served = metrics(url)
    cache_mb = round(served.get("mixtral_prefix_cache_bytes", 0) / 2**20, 1)
    final = {**process_numbers(server.pid), "prefix_cache_mb": cache_mb}
    healthy = httpx.get(url + "/health", timeout=10).status_code == 200
    server.terminate()
    exit_code = server.wait(120)

    seen = books.outcomes
    server_finished = served.get('mixtral_requests_total{outcome="finished"}', 0)
    server_cancelled = served.get('mixtral_requests_total{outcome="cancelled"}', 0)
    server_rejected = served.get('mixtral_requests_total{outcome="rejected"}', 0)
    refused_4xx = sum(v for k, v in served.items() if k.startswith("mixtral_http_errors_total")
                      and not k.endswith('"429"}') and not k.endswith('"503"}'))
    refused_429 = served.get('mixtral_http_errors_total{status="429"}', 0)
    warm = next((s for s in samples if s["t"] >= 120), samples[len(samples) // 2] if samples else final)
    checks = {
        "no request lost": seen["lost"] == 0,
        "no 5xx": seen["server_error"] == 0,
        "finished + cancelled agree": server_finished + server_cancelled == seen["finished"] + seen["cancelled"],
        "429s agree": refused_429 == books.statuses[429],
        "rejections agree": server_rejected == seen["rejected"],
        "bad inputs agree": refused_4xx == seen["bad_input_refused"],
        "healthy at the end": healthy,
        "memory flat after warm-up (net of the prefix cache, within 64 MB)":
            final["rss_mb"] - final["prefix_cache_mb"] <= warm["rss_mb"] - warm["prefix_cache_mb"] + 64,
        # thread pools come and go by a few; a leak of one per thousand requests would be hundreds here
        "threads and fds flat after warm-up (within 8 and 16)": final["threads"] <= warm["threads"] + 8
                                                                and final["fds"] <= warm["fds"] + 16,
        "exit 0 on SIGTERM": exit_code == 0,
    }
    report = {"minutes": opts.minutes, "clients": opts.clients, "requests": sum(seen.values()),
              "client_outcomes": dict(seen), "statuses": dict(books.statuses),
              "server": {"finished": server_finished, "cancelled": server_cancelled, "rejected": server_rejected,
                         "refused_4xx": refused_4xx, "refused_429": refused_429},
              "after_warm_up": warm, "at_the_end": final, "first_sample": samples[0] if samples else None,
              "checks": checks, "problems": books.problems}
    if opts.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"soak: {opts.minutes:g} min, {opts.clients} clients, {report['requests']:,} requests")
        print("  clients saw: " + ", ".join(f"{k} {v:,}" for k, v in sorted(seen.items())))
        print(f"  server counted: finished {server_finished:,.0f}, cancelled {server_cancelled:,.0f}, rejected "
              f"{server_rejected:,.0f}, refused 4xx {refused_4xx:,.0f} (429: {refused_429:,.0f})")
        print(f"  server process: at t={warm.get('t', '?')} s RSS {warm['rss_mb']} MB (prefix cache "
              f"{warm['prefix_cache_mb']} MB), {warm['threads']} threads, {warm['fds']} fds; at the end RSS "
              f"{final['rss_mb']} MB (prefix cache {final['prefix_cache_mb']} MB), {final['threads']} threads, "
              f"{final['fds']} fds (first sample: {report['first_sample']})")
        for name, ok in checks.items():
            print(f"  {'ok ' if ok else 'FAIL'} {name}")
        for problem in books.problems[:10]:
            print(f"  problem: {problem}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
