"""Write a random-weight Mixtral GGUF file (Q4_0) for llama.cpp peer benchmarks.

llama.cpp is our reference peer for the expert-offloading benchmarks: we time
``llama-bench`` on the same model shapes and the same RAM limits as our own
engine.  The Hugging Face Hub is not reachable here, so this module makes the
checkpoint itself: a GGUF file laid out the way llama.cpp's converter lays out
Mixtral (``general.architecture = "llama"`` plus ``llama.expert_count`` /
``llama.expert_used_count`` and merged ``blk.N.ffn_{gate,up,down}_exps``
tensors), with random weights.  The numbers it produces are meaningless; only
speed and memory use are measured with it.

Tensor types:

* every 2-D/3-D matrix (``token_embd``, ``output``, attention q/k/v/output and
  the three merged expert tensors) is Q4_0: per 32 weights a fp16 scale ``d``
  followed by 16 bytes of 4-bit values ``q`` (weight = ``d * (q - 8)``).  The
  nibbles are uniform in 1..15 (zero-mean codes) and ``d`` is uniform in [0.01, 0.02], so weights
  have a standard deviation of about 0.07 and activations stay finite.
  ``token_embd`` and ``output`` are Q4_0 too (llama.cpp's CPU backend accepts
  Q4_0 for both: ``get_rows`` for the embedding, ``mul_mat`` for the output);
* norms are F32 ones, the router ``ffn_gate_inp`` is F32 normal(0, 0.02).

The file is streamed: header, key/values and tensor infos are written first,
then each tensor's data, generated in chunks of a few MiB, so that even the
24 GB 8x7b file never has to be held in RAM.

A minimal SentencePiece ("llama") vocabulary is included because llama.cpp
refuses to load a model without one: ``<unk>``, ``<s>``, ``</s>``, the 256
byte tokens ``<0x00>``..``<0xFF>`` and then made-up unique word pieces up to
``vocab`` entries.

CLI::

    python bench/random_gguf.py OUT.gguf --shape medium|8x7b [--seed N]
"""

from __future__ import annotations

import argparse
import itertools
import os
import string
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

import gguf

SHAPES: dict[str, dict[str, int]] = {
    # hidden 1024, ffn 3584, 16 layers, 16/4 heads, 8 experts top-2 (1.52B params, 0.80 GiB file)
    "medium": dict(n_layers=16, dim=1024, ffn_dim=3584, n_heads=16, n_kv_heads=4, n_experts=8, top_k=2, vocab=32000),
    # Mixtral-8x7B shapes (46.7B params, 24.5 GiB file)
    "8x7b": dict(n_layers=32, dim=4096, ffn_dim=14336, n_heads=32, n_kv_heads=8, n_experts=8, top_k=2, vocab=32000),
}

QK4_0 = 32  # weights per Q4_0 block
Q4_0_BLOCK_BYTES = 18  # fp16 scale + 16 bytes of nibbles
SCALE_RANGE = (0.01, 0.02)
ROUTER_STD = 0.02
CHUNK_BLOCKS = 1 << 18  # 262144 blocks = 4.5 MiB of output per chunk

_N_SPECIAL = 3  # <unk>, <s>, </s>
_N_BYTE = 256


def _q4_0_nbytes(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape)) // QK4_0 * Q4_0_BLOCK_BYTES


class _RandomQ4_0:
    """Random Q4_0 tensor data, written chunk by chunk.

    ``GGUFWriter.write_tensor_data`` only needs ``nbytes`` and ``tofile(fp)``
    from the object it is given (it does the alignment padding around it), so
    this stands in for a numpy array that would otherwise have to hold the
    whole tensor in memory.
    """

    def __init__(self, shape: tuple[int, ...], rng: np.random.Generator):
        self.shape = shape
        self.n_blocks = int(np.prod(shape)) // QK4_0
        self.nbytes = self.n_blocks * Q4_0_BLOCK_BYTES
        self._rng = rng

    def chunks(self) -> Iterator[np.ndarray]:
        lo, hi = SCALE_RANGE
        left = self.n_blocks
        while left > 0:
            n = min(left, CHUNK_BLOCKS)
            block = np.empty((n, Q4_0_BLOCK_BYTES), dtype=np.uint8)
            d = self._rng.uniform(lo, hi, size=n).astype("<f2")
            block[:, :2] = d.view(np.uint8).reshape(n, 2)
            # nibbles 1..15: codes q - 8 in -7..7 have mean 0 (uniform 0..15 would give every weight a -0.5
            # step bias, every row a common component, and routing that sends most tokens to the same experts)
            nibbles = self._rng.integers(1, 16, size=(n, 32), dtype=np.uint8)
            block[:, 2:] = nibbles[:, :16] | (nibbles[:, 16:] << 4)
            yield block
            left -= n

    def tofile(self, fp: IO[bytes]) -> None:
        for block in self.chunks():
            fp.write(block.tobytes())


def _vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """A minimal SPM vocabulary of exactly ``n`` unique tokens."""
    if n < _N_SPECIAL + _N_BYTE + 1:
        raise ValueError(f"vocab must be at least {_N_SPECIAL + _N_BYTE + 1}, got {n}")
    tokens = ["<unk>", "<s>", "</s>"]
    types = [int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL), int(gguf.TokenType.CONTROL)]
    tokens += [f"<0x{b:02X}>" for b in range(_N_BYTE)]
    types += [int(gguf.TokenType.BYTE)] * _N_BYTE

    def pieces() -> Iterator[str]:
        # "▁" (SentencePiece's word-start marker), printable characters with and
        # without it, then lowercase words of growing length, likewise.
        yield "\u2581"
        chars = [c for c in string.printable if not c.isspace()]
        for c in chars:
            yield c
            yield "\u2581" + c
        for length in itertools.count(2):
            for t in itertools.product(string.ascii_lowercase, repeat=length):
                w = "".join(t)
                yield "\u2581" + w
                yield w

    tokens += list(itertools.islice(pieces(), n - len(tokens)))
    n_normal = n - len(types)
    types += [int(gguf.TokenType.NORMAL)] * n_normal
    scores = [0.0] * (_N_SPECIAL + _N_BYTE) + [-float(i) for i in range(n_normal)]
    assert len(tokens) == len(set(tokens)) == len(scores) == len(types) == n
    return tokens, scores, types


def write_random_q4_0(
    path: str | os.PathLike[str],
    *,
    n_layers: int,
    dim: int,
    ffn_dim: int,
    n_heads: int,
    n_kv_heads: int,
    n_experts: int,
    top_k: int,
    vocab: int,
    seed: int = 0,
    progress: bool = True,
) -> int:
    """Write a random Mixtral-architecture Q4_0 GGUF file to ``path``.

    Returns the size of the written file in bytes.  The content depends only
    on the arguments (``seed`` included), not on the machine.
    """
    if dim % QK4_0 or ffn_dim % QK4_0:
        raise ValueError(f"dim and ffn_dim must be multiples of {QK4_0}")
    if dim % n_heads or n_heads % n_kv_heads:
        raise ValueError("dim must be divisible by n_heads and n_heads by n_kv_heads")
    if not 0 < top_k <= n_experts:
        raise ValueError("need 0 < top_k <= n_experts")
    head_dim = dim // n_heads
    kv_dim = head_dim * n_kv_heads
    path = Path(path)
    tokens, scores, types = _vocab(vocab)

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("random-mixtral")
    w.add_context_length(32768)
    w.add_embedding_length(dim)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn_dim)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(n_experts)
    w.add_expert_used_count(top_k)
    w.add_vocab_size(vocab)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_0))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    # (name, numpy-order shape, kind); kind: "q4" random Q4_0, "ones" F32, "router" F32 normal
    T = gguf.MODEL_TENSOR

    def N(t: gguf.MODEL_TENSOR, i: int | None = None) -> str:
        return gguf.TENSOR_NAMES[t].format(bid=i) + ".weight"

    plan: list[tuple[str, tuple[int, ...], str]] = [(N(T.TOKEN_EMBD), (vocab, dim), "q4")]
    for i in range(n_layers):
        plan += [
            (N(T.ATTN_NORM, i), (dim,), "ones"),
            (N(T.ATTN_Q, i), (dim, dim), "q4"),
            (N(T.ATTN_K, i), (kv_dim, dim), "q4"),
            (N(T.ATTN_V, i), (kv_dim, dim), "q4"),
            (N(T.ATTN_OUT, i), (dim, dim), "q4"),
            (N(T.FFN_NORM, i), (dim,), "ones"),
            (N(T.FFN_GATE_INP, i), (n_experts, dim), "router"),
            (N(T.FFN_GATE_EXP, i), (n_experts, ffn_dim, dim), "q4"),
            (N(T.FFN_DOWN_EXP, i), (n_experts, dim, ffn_dim), "q4"),
            (N(T.FFN_UP_EXP, i), (n_experts, ffn_dim, dim), "q4"),
        ]
    plan += [(N(T.OUTPUT_NORM), (dim,), "ones"), (N(T.OUTPUT), (vocab, dim), "q4")]

    for name, shape, kind in plan:
        if kind == "q4":
            byte_shape = (*shape[:-1], shape[-1] // QK4_0 * Q4_0_BLOCK_BYTES)
            w.add_tensor_info(
                name, byte_shape, np.dtype(np.uint8), _q4_0_nbytes(shape), raw_dtype=gguf.GGMLQuantizationType.Q4_0
            )
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    total = sum(_q4_0_nbytes(s) if k == "q4" else int(np.prod(s)) * 4 for _, s, k in plan)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    t0 = time.monotonic()
    done = 0
    for idx, (name, shape, kind) in enumerate(plan):
        rng = np.random.default_rng([seed, idx])
        if kind == "q4":
            data = _RandomQ4_0(shape, rng)
        elif kind == "ones":
            data = np.ones(shape, dtype=np.float32)
        else:
            data = rng.normal(0.0, ROUTER_STD, size=shape).astype(np.float32)
        w.write_tensor_data(data)  # type: ignore[arg-type]  # _RandomQ4_0 duck-types ndarray
        done += data.nbytes
        if progress and (kind == "q4" or idx == len(plan) - 1):
            dt = time.monotonic() - t0
            print(
                f"\r{done / 2**30:7.2f}/{total / 2**30:.2f} GiB  {done / 2**20 / max(dt, 1e-9):6.0f} MiB/s  {name:<32}",
                end="",
                file=sys.stderr,
                flush=True,
            )
    w.close()
    if progress:
        print(file=sys.stderr)
    return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--shape", choices=sorted(SHAPES), default="medium")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress line")
    a = p.parse_args(argv)
    size = write_random_q4_0(a.out, **SHAPES[a.shape], seed=a.seed, progress=not a.quiet)
    print(f"wrote {a.out}: {size} bytes ({size / 2**30:.2f} GiB), shape {a.shape}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
