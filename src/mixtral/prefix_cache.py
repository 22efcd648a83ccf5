"""Prefix reuse: the keys and values of token sequences seen before, so that a prompt that starts the same way
(the next turn of a conversation, which every chat client sends whole; a shared system prompt) prefills only
what is new.

    prefix = PrefixCache(budget_bytes)
    n = prefix.load(prompt_ids, cache, row)     # the longest cached prefix copied into the cache row: n tokens
    ...                                         # prefill prompt_ids[n:], generate
    prefix.store(tokens, cache, row)            # the row's first len(tokens) positions, kept for later prompts

Each entry is one sequence (its token ids and its keys and values, per layer (G, T, Dh), in the cache's dtype),
kept whole: a prompt reuses the longest common prefix with any entry, ending anywhere (no blocks). Entries are
copied into a cache row, never shared, so no two sequences ever write the same memory and an entry may be evicted
while a sequence that started from it runs. A new entry replaces those that are prefixes of it (a conversation
keeps one entry, its latest turn); the least recently used go first when the budget is exceeded. At most
len(prompt) - 1 tokens are reused: the last prompt token is always run, for the logits of the first new token.

Numbers: a reused position holds exactly the keys and values that were computed for it, by a prefill or by a
decode step; recomputing them in another prefill gives the same values up to the kernels' rounding (exactly,
on the exact fp32 kernels; within the prompt path's bf16 rounding on kernels/prompt.py). Sliding-window models
reuse the same way: the cache keeps every position and attention applies the window, so a reused position means
what a recomputed one does.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

MIN_TOKENS = 16  # sequences shorter than this are not worth an entry


@dataclass(eq=False)
class _Entry:
    tokens: torch.Tensor  # (T,) int64
    keys: list[torch.Tensor]  # per layer (G, T, Dh)
    values: list[torch.Tensor]
    nbytes: int


class PrefixCache:
    """Keys and values of earlier sequences within `budget_bytes` (LRU). Thread-safe."""

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._ids = 0
        self._lock = threading.Lock()
        self.lookups = self.hits = self.hit_tokens = self.evictions = self.stored = 0
        self.nbytes = 0

    def _longest(self, prompt: torch.Tensor) -> tuple[int | None, int]:
        best, length = None, 0
        for key, entry in self._entries.items():
            n = min(len(entry.tokens), len(prompt) - 1)
            if n <= length:
                continue
            same = entry.tokens[:n] == prompt[:n]
            common = n if bool(same.all()) else int((~same).int().argmax())
            if common > length:
                best, length = key, common
        return best, length

    def load(self, prompt_ids, cache, row: int) -> int:
        """Copy the longest cached prefix of `prompt_ids` (at most all but its last token) into row `row` of
        `cache` (a kv_cache.KVCache of the same model); return its length (0: none)."""
        prompt = torch.as_tensor(list(prompt_ids), dtype=torch.int64)
        with self._lock:
            self.lookups += 1
            key, n = self._longest(prompt)
            if key is None or n == 0:
                return 0
            entry = self._entries[key]
            self._entries.move_to_end(key)
            self.hits += 1
            self.hit_tokens += n
        for layer, (keys, values) in enumerate(zip(entry.keys, entry.values)):
            cache.keys[layer][row, :, :n].copy_(keys[:, :n])
            cache.values[layer][row, :, :n].copy_(values[:, :n])
        return n

    def store(self, tokens, cache, row: int) -> bool:
        """Keep the keys and values of `tokens`, the first len(tokens) positions of row `row` of `cache`. Returns
        whether an entry was made (not for fewer than MIN_TOKENS tokens, nor one larger than the whole budget)."""
        tokens = torch.as_tensor(list(tokens), dtype=torch.int64)
        T = len(tokens)
        per_token = sum(k[row, :, :1].nbytes + v[row, :, :1].nbytes for k, v in zip(cache.keys, cache.values))
        nbytes = T * per_token
        if T < MIN_TOKENS or nbytes > self.budget:
            return False
        keys = [k[row, :, :T].clone() for k in cache.keys]
        values = [v[row, :, :T].clone() for v in cache.values]
        with self._lock:
            for key in [k for k, e in self._entries.items()
                        if len(e.tokens) <= T and torch.equal(e.tokens, tokens[:len(e.tokens)])]:
                self.nbytes -= self._entries.pop(key).nbytes  # superseded: a prefix of the new entry
            while self._entries and self.nbytes + nbytes > self.budget:
                _, evicted = self._entries.popitem(last=False)
                self.nbytes -= evicted.nbytes
                self.evictions += 1
            self._ids += 1
            self._entries[self._ids] = _Entry(tokens, keys, values, nbytes)
            self.nbytes += nbytes
            self.stored += 1
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {"budget_bytes": self.budget, "bytes": self.nbytes, "entries": len(self._entries),
                    "lookups": self.lookups, "hits": self.hits, "hit_tokens": self.hit_tokens,
                    "stored": self.stored, "evictions": self.evictions}
