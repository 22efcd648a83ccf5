"""The expert store: a model's experts on disk, a fixed number of them in memory (an expert cache).

A Mixtral token uses 2 of each layer's 8 experts, and the experts are 96 % of the weights, so a model that does
not fit in memory can keep everything else resident and read experts as they are needed. The store runs inside
the native runner (native.py): each mixture-of-experts layer of the C side (cpu_kernels.c: store_t) calls
`fetch` with the experts its tokens need, which returns once they are in cache slots (their addresses in the
layer's slot tables, read by the same kernels as resident weights, so outputs are bit-identical), and with the
experts the next layer's router picks for this layer's input: a guess, read ahead into free slots while no
other read waits (speculative prefetch; `fetch` says why only then).

Reads: each expert's tensors (codes and scales of w1, w3, w2; plain float weights for a float checkpoint) are read
with positioned reads in chunks of CHUNK bytes by `threads` reader threads, demand misses before prefetches, and
the page cache is told to drop what was read (posix_fadvise DONTNEED), so the budget is the process's real
memory and not the OS's cache. Slots are one buffer, allocated once. Eviction: each layer has an equal share of
the slots and evicts its own least recently used expert (`_victim`; bench/expert_cache.py compares policies on
the shipped model's routing), never one the layer computing now needs or one being read.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .native_lib import FETCH, FORMATS, I4, I8, Store, Weight

CHUNK = 4 << 20  # bytes per positioned read: large enough for the disk, small enough to share among threads
ALIGN = 4096  # each tensor of a slot starts on a page
DEMAND, PREFETCH = 0, 1  # read priorities: lower first


@dataclass(frozen=True)
class Piece:
    """One tensor of one expert on disk: `nbytes` at `offset` of `path`, stored as `stored` (a float tensor stored
    in another dtype than the model's is converted as it is read), for weight `weight` ("w1", "w3", "w2") part
    `part` ("data" or "scales")."""

    weight: str
    part: str
    path: str
    offset: int
    nbytes: int
    stored: torch.dtype
    dtype: torch.dtype  # in memory


@dataclass(frozen=True)
class ExpertFormat:
    """How one of an expert's weights is held in memory: the C side's format, shape and group, and its bytes."""

    fmt: int
    n: int
    k: int
    group: int
    data_bytes: int
    scale_bytes: int


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    prefetched_hits: int = 0  # needed experts that a prefetch brought in (or was bringing)
    guessed: int = 0  # experts the previous layer guessed for this one
    guessed_right: int = 0  # of those, needed
    guessed_lookups: int = 0  # experts needed by this layer in passes where it had guesses


@dataclass
class StoreStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)
    bytes_read: int = 0
    busy_seconds: float = 0.0  # wall time during which at least one read was under way
    demand_reads: int = 0
    prefetch_reads: int = 0
    wait_seconds: float = 0.0  # the compute thread's wait for demand reads
    passes: int = 0  # forward passes (decode steps and prompt chunks) through the first store layer

    def summary(self) -> dict:
        """Totals and per-layer numbers (JSON-friendly): hit rate, prefetch recall and precision, bytes read."""
        total = LayerStats()
        for layer in self.layers.values():
            for name in vars(total):
                setattr(total, name, getattr(total, name) + getattr(layer, name))
        lookups = total.hits + total.misses
        return {
            "lookups": lookups,
            "hit_rate": total.hits / lookups if lookups else None,  # in memory, or being read ahead
            "cache_hit_rate": (total.hits - total.prefetched_hits) / lookups if lookups else None,  # kept
            "hit_rate_by_layer": {i: s.hits / (s.hits + s.misses) for i, s in sorted(self.layers.items())
                                  if s.hits + s.misses},
            "prefetch_recall": total.guessed_right / total.guessed_lookups if total.guessed_lookups else None,
            "prefetch_precision": total.guessed_right / total.guessed if total.guessed else None,
            "prefetched_hits": total.prefetched_hits,
            "misses": total.misses,
            "bytes_read": self.bytes_read,
            "bytes_read_per_pass": self.bytes_read / self.passes if self.passes else None,
            "disk_gb_per_s": self.bytes_read / self.busy_seconds / 1e9 if self.busy_seconds else None,
            "wait_seconds": self.wait_seconds,
            "passes": self.passes,
        }


class _Read:
    """One expert being read into a slot: its chunks go to the reader threads; `done` is set after the last."""

    def __init__(self, key, slot, priority):
        self.key, self.slot, self.priority = key, slot, priority
        self.left = 0
        self.error: BaseException | None = None
        self.done = threading.Event()


class ExpertStore:
    """Experts of the layers in `pieces` ({(layer, expert): [Piece, ...]}) held in `slots` cache slots.

    `formats` ({"w1"|"w3"|"w2": ExpertFormat}) says how each weight of an expert is laid out in memory; every
    expert of every layer has the same. `weight(layer, name)` is the C side's description of one layer's weight
    (its slot tables); `hook(layer)` is that layer's store_t. `prefetch`: read the next layer's guessed experts
    ahead. `close()` stops its reader threads (which hold it alive until then).
    """

    def __init__(self, pieces: dict[tuple[int, int], list[Piece]], formats: dict[str, ExpertFormat], slots: int,
                 prefetch: bool = True, threads: int = 4):
        self.layers = sorted({layer for layer, _ in pieces})
        self.n_experts = 1 + max(expert for _, expert in pieces)
        if slots < self.n_experts:
            raise ValueError(f"an expert cache needs at least one layer's experts ({self.n_experts} slots), "
                             f"got {slots}")
        self.pieces, self.formats, self.prefetch = pieces, formats, prefetch
        self.n_slots = min(slots, len(pieces))
        # a slot: w1 codes, w1 scales, w3 codes, w3 scales, w2 codes, w2 scales, each on its own page
        self.offsets, at = {}, 0
        for name in ("w1", "w3", "w2"):
            for part, size in (("data", formats[name].data_bytes), ("scales", formats[name].scale_bytes)):
                self.offsets[name, part] = at
                at += -(-size // ALIGN) * ALIGN
        self.slot_bytes = at
        self._buffer = torch.empty(self.n_slots * self.slot_bytes + ALIGN, dtype=torch.uint8)  # untouched: free
        self._base = self._buffer.data_ptr() + (-self._buffer.data_ptr() % ALIGN)
        self._tables = {(layer, name, part): (ctypes.c_void_p * self.n_experts)()
                        for layer in self.layers for name in ("w1", "w3", "w2") for part in ("data", "scales")}
        self._weights = {(layer, name): self._weight(layer, name)
                         for layer in self.layers for name in ("w1", "w3", "w2")}
        self.stats = StoreStats(layers={layer: LayerStats() for layer in self.layers})
        self.error: BaseException | None = None  # what made the last fetch fail (raised by the runner)
        self._cached: OrderedDict[tuple[int, int], int] = OrderedDict()  # key -> slot, least recently used first
        self._free = list(range(self.n_slots - 1, -1, -1))
        self._held = dict.fromkeys(self.layers, 0)  # experts each layer holds (or is reading)
        self._share: dict[int, int] = {}  # the slots each layer may hold (set_prefetch)
        self.reserve, self._top_k = 0, 0  # slots demand misses leave free for prefetches (set_prefetch)
        self._reading: dict[tuple[int, int], _Read] = {}
        self._pinned: set[tuple[int, int]] = set()
        self._guesses: dict[int, set[int]] = {}  # layer -> experts guessed for it by the layer before
        self._prefetched: set[tuple[int, int]] = set()  # read ahead and not yet needed
        self._lock = threading.Lock()
        self._queue: list = []  # (priority, order, read, chunk)
        self._order = itertools.count()
        self._work = threading.Condition(self._lock)
        self._files: dict[str, int] = {}
        self._active, self._busy_since = 0, 0.0  # reads under way, and since when
        self._closed = False
        self._callback = FETCH(self._fetch)  # kept alive as long as the store
        self._hooks, self._next_routers = {}, {}
        self.set_prefetch(prefetch)  # (no guesses until `hook` is given the next layers' routers)
        self._readers = [threading.Thread(target=self._reader, name=f"expert-reader-{i}", daemon=True)
                         for i in range(max(1, threads))]
        for thread in self._readers:
            thread.start()

    # ---- what the C side reads -------------------------------------------------------------------------

    def _weight(self, layer: int, name: str) -> Weight:
        f = self.formats[name]
        return Weight(0, 0, f.fmt, f.n, f.k, f.group, 0, 0,
                      ctypes.addressof(self._tables[layer, name, "data"]),
                      ctypes.addressof(self._tables[layer, name, "scales"]), FORMATS[torch.bfloat16])

    def weight(self, layer: int, name: str) -> Weight:
        """Layer `layer`'s weight `name` ("w1", "w3", "w2") as the C side reads it: through the slot tables."""
        return self._weights[layer, name]

    def hook(self, layer: int, next_router: Weight | None, next_top_k: int) -> Store:
        """The store_t that layer `layer` calls before its experts run; `next_router`: the next store layer's router
        (for guesses), or None."""
        address = ctypes.addressof(next_router) if next_router is not None else None
        self._next_routers[layer] = address
        hook = self._hooks[layer] = Store(self._callback, layer, address if self.prefetch else None, next_top_k)
        if address is not None:
            self._top_k = max(self._top_k, next_top_k)  # (the most a layer guesses)
        self.set_prefetch(self.prefetch)
        return hook

    def set_prefetch(self, on: bool) -> None:
        """Turn speculative prefetch on or off (the layers stop or start passing the next router's guess)."""
        self.prefetch = on
        room = self.n_slots - self.n_experts if self.n_slots < len(self.pieces) else 0  # (all fit: no need)
        self.reserve = min(self._top_k, max(0, room)) if on else 0  # (_top_k is 0 while no layer guesses)
        share, extra = divmod(self.n_slots - self.reserve, len(self.layers))
        self._share = {layer: share + (i < extra) for i, layer in enumerate(self.layers)}
        for layer, hook in self._hooks.items():
            hook.next_router = self._next_routers[layer] if on else None

    # ---- the fetch the C side calls -----------------------------------------------------------------

    def _fetch(self, layer, needed, n_needed, guessed, n_guessed) -> int:
        try:
            self.fetch(layer, needed[:n_needed], guessed[:n_guessed])
            return 0
        except BaseException as exc:  # never through the C side: the runner raises it
            self.error = exc
            return 1

    def fetch(self, layer: int, needed: list[int], guessed: list[int]) -> None:
        """Make the experts `needed` by `layer` resident (their slot tables set) and start reading the `guessed`
        experts of the next store layer into free slots; returns once the needed ones are in place.

        Prefetch reads only while no other read is waiting, and never evicts: a wrong guess would cost a read and
        the eviction of an expert that may be needed again (measured, that cost more than right guesses saved).
        Demand misses leave `reserve` slots free for it instead; a guessed expert that was needed joins its
        layer's share (whose least recently used expert then goes back to the free slots), one that was not is
        the first to be evicted."""
        stats = self.stats.layers[layer]
        waits = []
        start = time.perf_counter()
        with self._lock:
            if layer == self.layers[0]:
                self.stats.passes += 1
            keys = [(layer, e) for e in needed]
            self._pinned = set(keys)
            guesses = self._guesses.pop(layer, None)
            if guesses is not None:
                stats.guessed += len(guesses)
                stats.guessed_right += len(guesses & set(needed))
                stats.guessed_lookups += len(needed)
            for key in [k for k in self._prefetched if k[0] == layer and k not in self._pinned]:
                self._prefetched.discard(key)  # guessed wrong: the first to go when a slot is wanted
                if key in self._cached:
                    self._cached.move_to_end(key, last=False)
            for key in keys:
                if key in self._cached:
                    self._cached.move_to_end(key)
                    stats.hits += 1
                    read = self._reading.get(key)
                    if read is not None:  # being read ahead: wait for it, first in line
                        self._promote(read)
                        waits.append(read)
                    if key in self._prefetched:
                        stats.prefetched_hits += 1
                        self._prefetched.discard(key)
                        self._rebalance(layer)
                    continue
                stats.misses += 1
                read = self._start(key, DEMAND)
                while read is None:  # every other slot is being read into: wait for one read to finish
                    busy = next(iter(self._reading.values()), None)
                    if busy is None:
                        raise RuntimeError(f"the expert cache's {self.n_slots} slots cannot hold the "
                                           f"{len(keys)} experts this layer needs")
                    self._lock.release()
                    try:
                        busy.done.wait()
                    finally:
                        self._lock.acquire()
                    read = self._start(key, DEMAND)
                waits.append(read)
            while len(self._free) < self.reserve:  # keep the reserve free (a prompt, a wrong guess took it)
                victim = next((k for k in self._cached if self._held[k[0]] > self._share[k[0]]
                               and k not in self._pinned and k not in self._reading), None)
                victim = victim or next((k for k in self._cached if k not in self._pinned
                                         and k not in self._reading), None)
                if victim is None:
                    break
                self._drop(victim)
            next_layer = self._next_layer(layer)
            if next_layer is not None and guessed:  # (guesses are scored even when not read ahead)
                self._guesses[next_layer] = set(guessed)
            if next_layer is not None and guessed and not self._queue:
                # read ahead only while the disk has nothing else to do: when reads are what limits the speed,
                # a wrong guess costs a read that a needed expert waits for (measured: bench/offload.py)
                for e in guessed:
                    key = (next_layer, e)
                    if key in self._cached:
                        continue
                    read = self._start(key, PREFETCH)
                    if read is None:
                        break  # no free slot: no more reading ahead
                    self._prefetched.add(key)
        for read in waits:
            read.done.wait()
            if read.error is not None:
                raise read.error
        self.stats.wait_seconds += time.perf_counter() - start

    def _next_layer(self, layer: int) -> int | None:
        at = self.layers.index(layer) + 1
        return self.layers[at] if at < len(self.layers) else None

    def _start(self, key, priority) -> _Read | None:
        """Take a slot for `key` and queue its read (lock held); None when no slot can be taken now. A prefetch
        takes only a free slot; a demand miss takes one while more than `reserve` are free, else evicts (and takes
        a reserved one when there is nothing to evict)."""
        if priority == PREFETCH or len(self._free) > self.reserve:
            if not self._free:
                return None
            slot = self._free.pop()
        else:
            victim = self._victim(key[0])
            if victim is None:
                if not self._free:
                    return None
                slot = self._free.pop()
            else:
                slot = self._evict(victim)
        self._held[key[0]] += 1
        self._cached[key] = slot
        read = _Read(key, slot, priority)
        pieces = self.pieces[key]
        for piece in pieces:
            base = self._base + slot * self.slot_bytes + self.offsets[piece.weight, piece.part]
            step = CHUNK - CHUNK % piece.stored.itemsize  # whole elements (converted ones too)
            chunks = [(piece, at, min(step, piece.nbytes - at), base) for at in range(0, piece.nbytes, step)]
            for chunk in chunks:
                read.left += 1
                heapq.heappush(self._queue, (priority, next(self._order), read, chunk))
        self._reading[key] = read
        if priority == PREFETCH:
            self.stats.prefetch_reads += 1
        else:
            self.stats.demand_reads += 1
        self._work.notify_all()
        return read

    def _victim(self, layer: int):
        """The expert to evict for one of `layer`'s (lock held): each layer has an equal share of the slots and
        evicts its own least recently used expert once it holds its share (a global LRU fails on the cycle
        through the layers: bench/expert_cache.py); a layer below its share takes from layers above theirs;
        failing both, the least recently used of any layer. Never an expert the running layer needs or one being
        read; None when there is none."""
        def usable(key) -> bool:
            return key not in self._pinned and key not in self._reading

        if self._held[layer] >= self._share[layer]:
            found = next((k for k in self._cached if k[0] == layer and usable(k)), None)
            if found is not None:
                return found
        found = next((k for k in self._cached if self._held[k[0]] > self._share[k[0]] and usable(k)), None)
        if found is not None:
            return found
        return next((k for k in self._cached if usable(k)), None)

    def _evict(self, key) -> int:
        """Take `key` out of the cache (lock held; not pinned, not being read); returns its slot."""
        slot = self._cached.pop(key)
        self._held[key[0]] -= 1
        self._prefetched.discard(key)
        for name in ("w1", "w3", "w2"):
            for part in ("data", "scales"):
                self._tables[key[0], name, part][key[1]] = None
        return slot

    def _drop(self, key) -> None:
        self._free.append(self._evict(key))

    def _rebalance(self, layer: int) -> None:
        """After a guessed expert joined `layer`: if the layer now holds more than its share, its least recently
        used expert goes back to the free slots (lock held)."""
        if self._held[layer] > self._share[layer]:
            victim = next((k for k in self._cached if k[0] == layer and k not in self._pinned
                           and k not in self._reading), None)
            if victim is not None:
                self._drop(victim)

    def _promote(self, read: _Read) -> None:
        """Move a prefetch's queued chunks ahead of other prefetches (lock held)."""
        if read.priority == DEMAND:
            return
        read.priority = DEMAND
        self._queue = [(DEMAND if r is read else p, o, r, c) for p, o, r, c in self._queue]
        heapq.heapify(self._queue)

    # ---- the reader threads ------------------------------------------------------------------------

    def _reader(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._work.wait()
                if self._closed:
                    return
                _, _, read, chunk = heapq.heappop(self._queue)
                if not self._active:
                    self._busy_since = time.perf_counter()
                self._active += 1
            error = None
            try:
                if read.error is None:
                    self._read_chunk(*chunk)
            except BaseException as exc:
                error = exc
            with self._lock:
                self._active -= 1
                if not self._active:
                    self.stats.busy_seconds += time.perf_counter() - self._busy_since
                self.stats.bytes_read += chunk[2] if error is None else 0
                if error is not None and read.error is None:
                    read.error = OSError(f"reading expert {read.key[1]} of layer {read.key[0]} failed: {error}")
                read.left -= 1
                if read.left == 0:
                    self._reading.pop(read.key, None)
                    if read.error is None:
                        self._publish(read.key, read.slot)
                    else:
                        self._cached.pop(read.key, None)
                        self._prefetched.discard(read.key)
                        self._held[read.key[0]] -= 1
                        self._free.append(read.slot)
                    read.done.set()

    def _publish(self, key, slot) -> None:
        """Point the C side's slot tables at a slot whose read finished (lock held)."""
        base = self._base + slot * self.slot_bytes
        for name in ("w1", "w3", "w2"):
            for part in ("data", "scales"):
                self._tables[key[0], name, part][key[1]] = base + self.offsets[name, part]

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._files.get(path)
            if fd is None:
                fd = self._files[path] = os.open(path, os.O_RDONLY)
            return fd

    def _read_chunk(self, piece: Piece, at: int, nbytes: int, base: int) -> None:
        """Read bytes [at, at + nbytes) of `piece` into its place in a slot (`base`: where the piece starts there);
        a piece stored in another dtype is converted on the way, chunk by chunk."""
        fd = self._fd(piece.path)
        if piece.stored == piece.dtype:
            _read_into(fd, piece.offset + at, (ctypes.c_char * nbytes).from_address(base + at))
        else:
            staged = torch.empty(nbytes, dtype=torch.uint8)
            _read_into(fd, piece.offset + at, memoryview(staged.numpy()))
            converted = staged.view(piece.stored).to(piece.dtype)
            ctypes.memmove(base + at // piece.stored.itemsize * piece.dtype.itemsize, converted.data_ptr(),
                           converted.nbytes)
        try:
            os.posix_fadvise(fd, piece.offset + at, nbytes, os.POSIX_FADV_DONTNEED)
        except (AttributeError, OSError):  # no fadvise here: the page cache keeps what was read
            pass

    # ---- lifetime ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the reader threads and close the files (the loader ties this to the model's lifetime)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._work.notify_all()
        try:
            for thread in self._readers:
                if thread is not threading.current_thread():  # (the collector may run this on a reader)
                    thread.join()
        finally:
            for fd in self._files.values():
                os.close(fd)
            self._files.clear()


def _read_into(fd: int, offset: int, buffer) -> None:
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"the file ends {len(view) - done} bytes short of the expert")
        done += got


def expert_format(fmt: int, n: int, k: int, group: int, element_bytes: int) -> ExpertFormat:
    """An expert weight's layout in memory, for the C format `fmt` (native_lib.FORMATS, I8, I4)."""
    if fmt == I4:
        n_groups = -(-k // group)
        return ExpertFormat(fmt, n, k, group, n * n_groups * group // 2, n * n_groups * 2)
    if fmt == I8:
        return ExpertFormat(fmt, n, k, 0, n * k, n * 2)
    return ExpertFormat(fmt, n, k, 0, n * k * element_bytes, 0)


