"""Expert-cache policies on real routing: which experts to keep when only some fit (kernels/offload.py).

Records the routing of the shipped model (trained, so its routing has the locality real models have; random
weights route uniformly) while it answers chat prompts, then replays the decode steps' expert requests through
each policy at several cache sizes and prints the hit rates:

- LRU: evict the least recently used expert (what the store does);
- LFU-decay: evict the least often used, counts halved every `--half-life` requests;
- per-layer LRU: each layer its own equal share of the slots (mixtral-offloading's layout);
- Belady: evict the one needed furthest in the future (the best any policy can do; needs the future).

Then runs the model itself with its experts offloaded, prefetch on and off, and prints prefetch recall and
precision and tokens/s. Every policy keeps the experts the current layer needs (a layer's request is one unit).

    python bench/expert_cache.py [--tokens 64] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import OrderedDict, defaultdict

PROMPTS = ["Tell me about the sea.", "What is a good name for a cat?", "How do I bake bread?",
           "Write a short poem about autumn.", "Why is the sky blue?", "Give me three tips for sleeping well."]


def record(tokens: int) -> tuple[list[list[tuple[int, int]]], int, int]:
    """The decode steps' requests: one list of (layer, expert) per layer per step, in order; and (layers, experts)."""
    from mixtral.generate import generate_step
    from mixtral.loading import load
    from mixtral.sampling import Sampler, SamplingParams

    model, tokenizer = load(progress=False)
    requests = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        routing: list = []
        steps = generate_step(model, [ids], [Sampler(SamplingParams(temperature=0.8, seed=0))], tokens, routing)
        for _ in steps:
            pass
        moe_layers = sum(1 for block in model.layers if hasattr(block.ffn, "router"))
        passes = [routing[i:i + moe_layers] for i in range(0, len(routing), moe_layers)]
        for forward in passes[1:]:  # decode steps (the first pass is the prompt)
            for layer, r in enumerate(forward):
                requests.append([(layer, int(e)) for e in r.expert_ids[0, -1].tolist()])
    return requests, model.args.n_layers, model.args.n_experts


def lru(requests, slots):
    cache, hits = OrderedDict(), 0
    for request in requests:
        for key in request:
            if key in cache:
                hits += 1
                cache.move_to_end(key)
            else:
                while len(cache) >= slots:
                    victim = next(k for k in cache if k not in request)
                    del cache[victim]
                cache[key] = True
    return hits


def lfu_decay(requests, slots, half_life):
    cache, counts, hits, seen = set(), defaultdict(float), 0, 0
    for request in requests:
        for key in request:
            seen += 1
            if seen % half_life == 0:
                for k in counts:
                    counts[k] /= 2
            counts[key] += 1
            if key in cache:
                hits += 1
                continue
            if len(cache) >= slots:
                cache.remove(min((k for k in cache if k not in request), key=lambda k: counts[k]))
            cache.add(key)
    return hits


def per_layer_lru(requests, slots, n_layers):
    share = max(1, slots // n_layers)
    caches, hits = defaultdict(OrderedDict), 0
    for request in requests:
        for key in request:
            cache = caches[key[0]]
            if key in cache:
                hits += 1
                cache.move_to_end(key)
            else:
                while len(cache) >= share:
                    victim = next((k for k in cache if k not in request), None)
                    if victim is None:
                        break
                    del cache[victim]
                cache[key] = True
    return hits


def belady(requests, slots):
    flat = [key for request in requests for key in request]
    owner = [i for i, request in enumerate(requests) for _ in request]
    next_use, last = [0] * len(flat), {}
    for i in range(len(flat) - 1, -1, -1):
        next_use[i] = last.get(flat[i], len(flat) + 1)
        last[flat[i]] = i
    cache, hits = {}, 0  # key -> its next use
    for i, key in enumerate(flat):
        if key in cache:
            hits += 1
        elif len(cache) >= slots:
            current = requests[owner[i]]
            victim = max((k for k in cache if k not in current), key=lambda k: cache[k])
            del cache[victim]
        cache[key] = next_use[i]
    return hits


def offloaded_runs(tokens: int) -> list[dict]:
    """The shipped model with its experts on disk (a quarter of them cached), greedy, prefetch on then off."""
    import torch

    from mixtral import kernels, memory_plan
    from mixtral.config import load_config
    from mixtral.generate import generate_step
    from mixtral.loading import default_model_path, load_tokenizer
    from mixtral.offloading import load_offloaded
    from mixtral.sampling import Sampler, SamplingParams

    path = default_model_path()
    args, tokenizer = load_config(path), load_tokenizer(path)
    plan = memory_plan.plan(args, None, torch.bfloat16, 1 << 40, runtime=0, bandwidth=(1.0, 10.0))
    slots = max(args.n_experts, args.n_layers * args.n_experts // 4)
    results = []
    for prefetch in (True, False):
        model = load_offloaded(path, args, None, torch.bfloat16, dataclasses.replace(plan, slots=slots),
                               prefetch=prefetch, progress=False)
        store = kernels.runner(model).store
        generated, seconds = 0, 0.0
        for prompt in PROMPTS:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            steps = generate_step(model, [ids], [Sampler(SamplingParams(temperature=0))], tokens)
            next(steps)
            start = time.perf_counter()
            generated += sum(1 for _ in steps)
            seconds += time.perf_counter() - start
        s = store.stats.summary()
        results.append({"prefetch": prefetch, "slots": slots, "experts": len(store.pieces),
                        "tokens_per_s": generated / seconds, "hit_rate": s["hit_rate"],
                        "cache_hit_rate": s["cache_hit_rate"], "recall": s["prefetch_recall"],
                        "precision": s["prefetch_precision"], "bytes_read_per_pass": s["bytes_read_per_pass"]})
        store.close()
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--half-life", type=int, default=64, help="LFU-decay: requests between halvings")
    p.add_argument("--json", action="store_true")
    opts = p.parse_args(argv)
    requests, n_layers, n_experts = record(opts.tokens)
    total = sum(len(r) for r in requests)
    everything = n_layers * n_experts
    sizes = sorted({max(n_experts, everything * f // 8) for f in range(1, 8)})
    table = []
    for slots in sizes:
        table.append({"slots": slots, "LRU": lru(requests, slots) / total,
                      "LFU-decay": lfu_decay(requests, slots, opts.half_life) / total,
                      "per-layer LRU": per_layer_lru(requests, slots, n_layers) / total,
                      "Belady": belady(requests, slots) / total})
    runs = offloaded_runs(opts.tokens)
    if opts.json:
        print(json.dumps({"requests": total, "experts": everything, "policies": table, "offloaded": runs}, indent=2))
        return 0
    print(f"shipped model: {n_layers} layers x {n_experts} experts; {len(requests) // n_layers} decode steps of "
          f"{len(PROMPTS)} chat prompts; {total} expert requests")
    print("| slots | " + " | ".join(k for k in table[0] if k != "slots") + " |")
    print("|---" * len(table[0]) + "|")
    for row in table:
        print(f"| {row['slots']} ({row['slots'] / everything:.0%}) | "
              + " | ".join(f"{v:.1%}" for k, v in row.items() if k != "slots") + " |")
    print("\noffloaded (a quarter of the experts cached), greedy, the store's per-layer LRU:")
    for run in runs:
        extra = (f", recall {run['recall']:.0%}, precision {run['precision']:.0%}" if run["recall"] is not None else "")
        print(f"  prefetch {'on ' if run['prefetch'] else 'off'}: {run['slots']}/{run['experts']} slots, "
              f"{run['tokens_per_s']:.1f} tok/s, in memory when needed {run['hit_rate']:.0%} (kept "
              f"{run['cache_hit_rate']:.0%}){extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
