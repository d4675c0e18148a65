"""Preallocated KV cache: the whole context for global layers, a ring buffer of the window for local ones.

Slots are absolute positions in the (possibly left-padded) batch layout. Each layer returns, with its
keys and values, the slot of every key (`-1` for a ring entry not yet written) so the attention mask
is built from positions alone; the order of keys inside a ring does not matter to attention.

`truncate` rolls the cache back to fewer positions (speculative decoding drops the keys of rejected
draft tokens). A ring then needs `lookahead` spare entries beyond the window: the rejected tokens
overwrote the oldest ones, which must still be older than the window when the cache is cut back.
"""

from __future__ import annotations

import torch

from flashlm.config import ModelConfig


class KVCache:
    """Keys and values of every layer for incremental decoding.

    `pad_left[b]` is the number of left-padding slots of row b (batched prompts of different lengths).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        pad_left: torch.Tensor | None = None,
        lookahead: int = 0,
    ) -> None:
        self.max_len = max_len
        self.seen = 0  # slots written so far
        self.pad_left = pad_left.to(device) if pad_left is not None else None
        self.windows: list[int | None] = []  # attention window of each layer (None: global)
        self.rings: list[int | None] = []  # entries of each ring buffer (None: the whole context is kept)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.slots: list[torch.Tensor] = []  # per layer: slot held by each cache entry
        shape = (batch_size, cfg.n_kv_heads)
        for kind in cfg.layer_types:
            window = cfg.sliding_window if kind == "local" and cfg.sliding_window < max_len else None
            ring = window + lookahead if window is not None and window + lookahead < max_len else None
            size = ring if ring is not None else max_len
            self.windows.append(window)
            self.rings.append(ring)
            self.keys.append(torch.zeros(*shape, size, cfg.head_dim, device=device, dtype=dtype))
            self.values.append(torch.zeros(*shape, size, cfg.head_dim, device=device, dtype=dtype))
            self.slots.append(torch.full((size,), -1, dtype=torch.long, device=device))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values [B, K, T, h] at slots seen..seen+T; return every key visible now."""
        T = k.shape[2]
        start = self.seen
        if start + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {start + T} requested")
        new_slots = torch.arange(start, start + T, device=k.device)
        ring = self.rings[layer]
        if ring is None:
            self.keys[layer][:, :, start : start + T] = k
            self.values[layer][:, :, start : start + T] = v
            self.slots[layer][start : start + T] = new_slots
            end = start + T
            return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
        # ring buffer: attend over the old ring plus the whole new chunk, then keep the last `ring`
        keys = torch.cat([self.keys[layer], k], dim=2)
        values = torch.cat([self.values[layer], v], dim=2)
        keep = min(T, ring)
        ring_idx = new_slots[-keep:] % ring
        self.keys[layer][:, :, ring_idx] = k[:, :, -keep:]
        self.values[layer][:, :, ring_idx] = v[:, :, -keep:]
        self.slots[layer][ring_idx] = new_slots[-keep:]
        return keys, values

    def key_slots(self, layer: int, new_tokens: int) -> torch.Tensor:
        """Slots [Tk] of the keys `update` will return for `layer` with `new_tokens` new tokens."""
        new_slots = torch.arange(self.seen, self.seen + new_tokens, device=self.slots[layer].device)
        if self.rings[layer] is None:
            return torch.arange(0, self.seen + new_tokens, device=new_slots.device)
        return torch.cat([self.slots[layer], new_slots])

    def advance(self, n: int) -> None:
        self.seen += n

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on, as if only `length` had been written. A ring keeps
        what the window still needs only if at most `lookahead` positions are dropped."""
        if not 0 <= length <= self.seen:
            raise ValueError(f"cannot truncate a cache of {self.seen} positions to {length}")
        self.seen = length
        for slots in self.slots:
            slots.masked_fill_(slots >= length, -1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
