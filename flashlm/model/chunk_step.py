"""A few tokens of one sequence through a cached model at once, with the work that does not change done once.

Speculative decoding checks every proposed token in one pass of the target model over its `KVCache`:
a chunk of a few tokens, for one sequence, after the prompt. `FlashLM.forward` can do it, but builds
position tensors, mask specs and RoPE tables for every call, which at this size costs more than the
arithmetic. `ChunkStep` is `flashlm.model.decoding.DecodeStep` widened from one token to a chunk: the
same prepared (fused) weights, RoPE tables made once for the whole cache, and per call only the chunk's
slots, one mask per kind of cache and the layers.

The chunk's keys are written into the cache before attention (a ring entry for local layers), so a
ring must hold the window plus the chunk less one: the cache's ``lookahead`` must be at least the
chunk length minus one, which speculative decoding's own cut-backs already require. Logits agree with
`FlashLM.forward` to rounding. Models with attention soft-capping use `FlashLM.forward` instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashlm.model.cache import KVCache
from flashlm.model.decoding import _apply, _rms, _rope, prepared_weights
from flashlm.model.layers import rope_cos_sin
from flashlm.model.transformer import FlashLM


class ChunkStep:
    """``step(tokens)``: tokens [T] of one sequence (batch 1, no padding) at slots cache.seen ... + T - 1;
    writes their keys and values, advances the cache by T and returns logits [T, V]."""

    def __init__(self, model: FlashLM, cache: KVCache) -> None:
        cfg = model.cfg
        if cfg.attn_softcap is not None:
            raise ValueError("ChunkStep does not soft-cap attention scores; use FlashLM.forward")
        self.model, self.cache, self.cfg = model, cache, cfg
        self.weights = prepared_weights(model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        positions = torch.arange(cache.max_len, device=self.device)[None]
        self.rope = {}
        for local in (False, True):
            cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_base_local if local else cfg.rope_base_global)
            self.rope[local] = (cos[0], sin[0])  # [1, max_len, head_dim]: broadcast over heads
        self.local = [kind == "local" for kind in cfg.layer_types]
        self.embed_scale = torch.tensor(cfg.embed_scale, dtype=self.dtype, device=self.device)
        self.slot_index = torch.arange(cache.max_len, device=self.device)

    def _masks(self, where: torch.Tensor) -> list[torch.Tensor]:
        """Per layer: [1, 1, T, entries] visibility of each cache entry to each chunk token."""
        cache, masks, made = self.cache, [], {}
        q = where[:, None]
        for layer, (ring, window) in enumerate(zip(cache.rings, cache.windows, strict=True)):
            key = (ring, window)  # every ring of one size holds the same slots
            if key not in made:
                held = self.slot_index[: cache.seen + len(where)] if ring is None else cache.slots[layer]
                visible = (held[None] >= 0) & (held[None] <= q)
                if window is not None:
                    visible &= q - held[None] < window
                made[key] = visible[None, None]
            masks.append(made[key])
        return masks

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        cache, cfg, w = self.cache, self.cfg, self.weights
        T, start = tokens.shape[0], cache.seen
        if start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {start + T} requested")
        where = self.slot_index[start : start + T]
        entries = [where if ring is None else where % ring for ring in cache.rings]
        for layer, entry in enumerate(entries):  # the chunk's slots first, so the masks see them
            cache.slots[layer][entry] = where
        masks = self._masks(where)
        H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        x = F.embedding(tokens, w["embed"])
        if cfg.flavour == "gemma":
            x = x * self.embed_scale
        for layer, lw in enumerate(w["layers"]):
            h = _rms(x, lw["attn_norm"], cfg.norm_eps)
            q, k, v = _apply(h, lw["qkv"]).split([H * hd, K * hd, K * hd], dim=-1)
            q, k, v = (t.reshape(T, -1, hd).transpose(0, 1) for t in (q, k, v))  # [heads, T, hd]
            if cfg.qk_norm:
                q, k = _rms(q, lw["q_norm"], cfg.norm_eps), _rms(k, lw["k_norm"], cfg.norm_eps)
            cos, sin = self.rope[self.local[layer]]
            cos, sin = cos[:, start : start + T], sin[:, start : start + T]
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            cache.keys[layer].index_copy_(2, entries[layer], k[None])
            cache.values[layer].index_copy_(2, entries[layer], v[None])
            keys, values = cache.keys[layer], cache.values[layer]
            if cache.rings[layer] is None:
                keys, values = keys[:, :, : start + T], values[:, :, : start + T]
            out = F.scaled_dot_product_attention(
                q[None],
                keys,
                values,
                attn_mask=masks[layer],
                scale=cfg.query_pre_attn_scalar**-0.5,
                enable_gqa=K != H,
            )
            h = _apply(out[0].transpose(0, 1).reshape(T, H * hd), lw["o"])
            if lw["post_attn_norm"] is not None:
                h = _rms(h, lw["post_attn_norm"], cfg.norm_eps)
            x = x + h
            gate, up = _apply(_rms(x, lw["mlp_norm"], cfg.norm_eps), lw["gate_up"]).chunk(2, dim=-1)
            gate = F.gelu(gate, approximate="tanh") if cfg.flavour == "gemma" else F.silu(gate)
            h = _apply(gate * up, lw["down"])
            if lw["post_mlp_norm"] is not None:
                h = _rms(h, lw["post_mlp_norm"], cfg.norm_eps)
            x = x + h
        cache.advance(T)
        logits = F.linear(_rms(x, w["final_norm"], cfg.norm_eps), w["head"])
        if cfg.final_softcap is not None:
            logits = cfg.final_softcap * torch.tanh(logits / cfg.final_softcap)
        return logits
