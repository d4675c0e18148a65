"""Grouped-query attention and attention-mask building.

Masks are built from token positions, so one function serves training (every query sees the same
keys) and cached decoding (keys come from the KV cache): a key k is visible to a query q when

- mode "causal":        k <= q
- mode "bidirectional": always
- mode "prefix":        k <= q, or k lies in the row's prefix (bidirectional inside it)
- packed documents:     q and k belong to the same document
- local layers:         |q - k| < window (only q - k < window when causal)
- left padding:         k is not a padding slot

Attention runs through `scaled_dot_product_attention`: with no mask and causal mode it passes
`is_causal=True`, which lets CUDA pick the flash kernel; otherwise a boolean mask is passed
(memory-efficient kernel on CUDA). Logit soft-capping or returning attention weights uses an
explicit fp32 path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flashlm.config import ModelConfig
from flashlm.model.layers import RMSNorm, apply_rope

MODES = ("causal", "bidirectional", "prefix")


@dataclass
class MaskSpec:
    """What a forward pass needs to know to build its masks."""

    mode: str = "causal"
    q_pos: torch.Tensor | None = None  # [B, Tq] absolute slots of the queries
    k_pos: torch.Tensor | None = None  # [B, Tk] absolute slots of the keys (-1: empty cache slot)
    prefix_end: torch.Tensor | None = None  # [B]: keys at slots < prefix_end are visible to all
    q_doc: torch.Tensor | None = None  # [B, Tq] document ids (packed sequences)
    k_doc: torch.Tensor | None = None  # [B, Tk]
    valid_from: torch.Tensor | None = None  # [B]: slots below are left padding

    @property
    def trivially_causal(self) -> bool:
        """True when plain `is_causal` attention is exact (no docs, prefix, padding or cache)."""
        return self.mode == "causal" and self.q_doc is None and self.valid_from is None and self.k_pos is None


def build_mask(spec: MaskSpec, window: int | None, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Boolean mask [B or 1, 1, Tq, Tk]; True where attention is allowed."""
    q = spec.q_pos if spec.q_pos is not None else torch.arange(q_len, device=device)[None]
    k = spec.k_pos if spec.k_pos is not None else torch.arange(k_len, device=device)[None]
    qq, kk = q[:, :, None], k[:, None, :]
    if spec.mode == "bidirectional":
        allowed = torch.ones_like(qq >= kk)
    else:
        allowed = kk <= qq
        if spec.mode == "prefix":
            if spec.prefix_end is None:
                raise ValueError("prefix mode needs prefix_len")
            allowed = allowed | (kk < spec.prefix_end[:, None, None])
    if window is not None:
        distance = qq - kk if spec.mode == "causal" else (qq - kk).abs()
        allowed = allowed & (distance < window)
    allowed = allowed & (kk >= 0)
    if spec.valid_from is not None:
        allowed = allowed & (kk >= spec.valid_from[:, None, None])
    if spec.q_doc is not None:
        k_doc = spec.k_doc if spec.k_doc is not None else spec.q_doc
        allowed = allowed & (spec.q_doc[:, :, None] == k_doc[:, None, :])
    return allowed[:, None]


class Attention(nn.Module):
    """Grouped-query attention with optional QK-norm (RMSNorm over head_dim, before RoPE).

    `mask` is a boolean tensor, "causal" (plain causal attention) or None (no mask at all).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.is_local = cfg.layer_types[layer_idx] == "local"
        self.window = cfg.sliding_window if self.is_local else None
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.softcap = cfg.attn_softcap
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        offset = cfg.flavour == "gemma"
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, offset) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | str | None,
        cache=None,
        return_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        weights = None
        if self.softcap is not None or return_weights:
            out, weights = self._explicit_attention(q, k, v, mask)
        else:
            causal = isinstance(mask, str)
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=None if causal else mask,
                is_causal=causal,
                scale=self.scale,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(out), weights

    def _explicit_attention(self, q, k, v, mask):
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q.float() @ k.float().transpose(-1, -2)) * self.scale
        if self.softcap is not None:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        if isinstance(mask, str):  # "causal"
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(-1)
        if mask is not None:  # a query that sees no key (a left-padding slot) gets zeros, not NaN
            weights = weights.masked_fill(~mask.any(-1, keepdim=True), 0.0)
        return (weights @ v.float()).type_as(q), weights
