"""A preallocated key/value cache: one (B, G, S_max, Dh) tensor pair per layer, written at token positions.

Each batch row is a slot with its own length; rows write at their own positions, so sequences of different
lengths share one cache without padding on the left. A forward pass may cover any subset of the slots
(`slots`), which is how a continuously batched engine runs only the sequences that are active.
"""

from __future__ import annotations

import torch

from .config import ModelArgs


class KVCache:
    """Keys and values for `batch_size` sequences of up to `max_seq_len` tokens."""

    def __init__(self, args: ModelArgs, batch_size: int, max_seq_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        shape = (batch_size, args.n_kv_heads, max_seq_len, args.head_dim)  # (B, G, S_max, Dh)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self._rows = torch.arange(batch_size, device=device)[:, None, None]  # (B_max, 1, 1)
        self._heads = torch.arange(args.n_kv_heads, device=device)[None, :, None]  # (1, G, 1)

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_keys: int,
               slots: torch.Tensor | None = None):
        """Write k, v (B, G, T, Dh) at positions input_pos (B, T) of cache rows `slots` (B,) (default 0..B-1).

        Returns the layer's keys and values for those rows over the first n_keys positions, (B, G, S, Dh).
        """
        B, T = k.shape[0], k.shape[2]
        if B == 1 and k.device.type == "cpu":  # one sequence: a slice of its row, written and read in place (on the
            # CPU only: reading the row and positions back would stall a GPU's stream at every layer)
            row = 0 if slots is None else int(slots[0])
            start = int(input_pos[0, 0])
            inside = 0 <= row < self.batch_size and 0 <= start and start + T <= self.max_seq_len  # else index_put_
            if inside and (T == 1 or torch.equal(input_pos[0], torch.arange(start, start + T,   # raises as it does
                                                                              device=input_pos.device))):
                keys, values = self.keys[layer][row:row + 1], self.values[layer][row:row + 1]
                keys[:, :, start:start + T] = k
                values[:, :, start:start + T] = v
                return keys.narrow(2, 0, n_keys), values.narrow(2, 0, n_keys)
        if slots is None:
            rows = self._rows if B == self.batch_size else self._rows[:B]  # (B, 1, 1)
        else:
            rows = slots[:, None, None]
        index = (rows, self._heads, input_pos[:, None, :])  # broadcasts to (B, G, T)
        keys, values = self.keys[layer], self.values[layer]
        keys.index_put_(index, k)
        values.index_put_(index, v)
        keys, values = keys.narrow(2, 0, n_keys), values.narrow(2, 0, n_keys)  # views: nothing copied yet
        if slots is not None:
            return keys[slots], values[slots]  # copies only the n_keys positions of these rows
        if B != self.batch_size:
            return keys[:B], values[:B]
        return keys, values

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
