"""The one-token decode step of generation, with everything that does not change between steps done once.

`FlashLM.forward` serves every mode, shape and cache, so each call builds position tensors, mask specs,
one boolean mask per layer kind and RoPE tables from scratch. At decode time most of that is fixed:
`DecodeStep` prepares once, for one `KVCache`,

- the weights: the q/k/v projections fused into one transposed matrix and gate/up into another (copies
  made for inference only, and only for models under `FUSE_LIMIT_BYTES`; the model and its state dict
  are untouched), and RMSNorm scales with Gemma's ``1 + w`` already added;
- RoPE cos/sin tables for every slot of the cache, looked up per row at each step;

and each step does only the work of the new token: write its keys and values at its slot (a ring
entry for local layers), build one boolean mask per kind of cache (the whole context, or a ring) from
slots, and attend under that mask. Eager, a whole-context layer attends over the slots written so far;
compiled (``compile=True``), over the whole preallocated cache, so that every step has the same tensor
shapes and `torch.compile` compiles the step once per model configuration, batch size and cache
length instead of once per position. `generate_tokens` gives the compiled step a cache of the model's
whole context, so later generations reuse the graph whatever their prompt length. On the CPU the
compiled step freezes the weights into its graph (`_FrozenStep`): the projection matrices are packed once
for Inductor's C++ GEMM micro-kernels instead of at every matmul call, the largest saving at this size.

The step is the decode step of `FlashLM.forward` with a cache after the prompt: the same masks (in
prefix-LM mode the prefix is the prompt, already written, so the mask is the causal one), positions
and operations. Only the summation order differs (fused matmuls; attention over a ring in slot order
rather than age order, or over the whole buffer), so logits agree to rounding and greedy tokens agree
except where two logits tie to within it (in bf16 that happens within a few dozen tokens).
"""

from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flashlm.model.cache import KVCache
from flashlm.model.layers import RMSNorm, rope_cos_sin
from flashlm.model.transformer import FlashLM

# Models whose layer weights fit in this many bytes get fused, transposed copies of their projection
# matrices for decoding (small models, whose decode steps are overhead- and layout-bound); larger ones
# use their parameters as they are and need no second copy.
FUSE_LIMIT_BYTES = 512 * 2**20


@dataclass(frozen=True)
class _Shape:
    """The constants a step depends on (Dynamo specialises the compiled graph on them)."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    attn_scale: float
    attn_softcap: float | None
    final_softcap: float | None
    gemma: bool
    qk_norm: bool
    rings: tuple[int | None, ...]  # per layer: ring entries, or None when the whole context is kept
    windows: tuple[int | None, ...]  # per layer: attention window of a ring layer
    local_rope: tuple[bool, ...]  # per layer: the local RoPE base (else the global one)
    reduce_attention: bool  # attention as products and sums, which Inductor fuses (compiled only)


class DecodeStep:
    """Feed one token per row to a model whose `KVCache` already holds the prompt; return the logits.

    ``step(tokens)`` takes [B] token ids, writes their keys and values at slot ``cache.seen``,
    advances the cache by one and returns the logits [B, V] (in the model's dtype). The cache's tensors,
    slots and padding are read at every call, so a cache whose rows are reordered (beam search) or
    cut back (`KVCache.truncate`) keeps working. With ``compile=True`` the step runs through
    `torch.compile` (Inductor); the first call compiles it.
    """

    def __init__(self, model: FlashLM, cache: KVCache, compile: bool = False) -> None:
        cfg = model.cfg
        self.cache = cache
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        rings = tuple(getattr(cache, "rings", cache.windows))
        self.shape = _Shape(
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            eps=cfg.norm_eps,
            attn_scale=cfg.query_pre_attn_scalar**-0.5,
            attn_softcap=cfg.attn_softcap,
            final_softcap=cfg.final_softcap,
            gemma=cfg.flavour == "gemma",
            qk_norm=bool(cfg.qk_norm),
            rings=rings,
            windows=tuple(cache.windows),
            local_rope=tuple(kind == "local" for kind in cfg.layer_types),
            reduce_attention=compile,
        )
        self.weights = prepared_weights(model)
        with torch.no_grad():
            positions = torch.arange(cache.max_len, device=self.device)[None]
            self.rope = {}
            for local in (False, True):
                base = cfg.rope_base_local if local else cfg.rope_base_global
                cos, sin = rope_cos_sin(positions, cfg.head_dim, base)  # [1, 1, max_len, head_dim]
                self.rope[local] = (cos[0, 0], sin[0, 0])
        self.embed_scale = torch.tensor(cfg.embed_scale, dtype=self.dtype, device=self.device)
        self.slot_index = torch.arange(cache.max_len, device=self.device)
        self.position = torch.zeros((), dtype=torch.long, device=self.device)
        self.no_padding: torch.Tensor | None = None
        self.compiled = compile
        if compile:
            self.run = compiled_step(model)
        else:
            weights = self.weights
            self.run = lambda shape, *args: decode_step(shape, weights, *args)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if cache.seen >= cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {cache.seen + 1} requested")
        self.position.fill_(cache.seen)
        pad = cache.pad_left
        if pad is None:
            if self.no_padding is None or self.no_padding.shape[0] != tokens.shape[0]:
                self.no_padding = torch.zeros(tokens.shape[0], dtype=torch.long, device=self.device)
            pad = self.no_padding
        keys, values, slot_index = cache.keys, cache.values, self.slot_index
        if not self.compiled:  # whole-context layers attend over the slots written so far (views)
            used = cache.seen + 1
            rings = self.shape.rings
            keys = [k if ring is not None else k[:, :, :used] for k, ring in zip(keys, rings, strict=True)]
            values = [v if ring is not None else v[:, :, :used] for v, ring in zip(values, rings, strict=True)]
            slot_index = slot_index[:used]
        logits = self.run(
            self.shape,
            keys,
            values,
            cache.slots,
            tokens.reshape(-1),
            self.position,
            pad,
            self.rope,
            slot_index,
            self.embed_scale,
        )
        cache.advance(1)
        return logits


def _norm_scale(norm: RMSNorm | None) -> torch.Tensor | None:
    """The factor RMSNorm multiplies by: ``1 + w`` (Gemma) or ``w`` (Llama), in fp32 as in `RMSNorm`."""
    if norm is None:
        return None
    return 1.0 + norm.weight.float() if norm.offset else norm.weight.float()


def _matrix(*weights: torch.Tensor, fuse: bool) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Linear weights [out, in] as one fused, transposed [in, sum(out)] copy (``x @ W`` streams the
    matrix in the order the CPU matmul reads it fastest), or the parameters themselves."""
    if not fuse:
        return weights
    return torch.cat(weights).t().contiguous()


def _apply(x: torch.Tensor, weight: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    if isinstance(weight, torch.Tensor):
        return torch.matmul(x, weight)
    return torch.cat([F.linear(x, w) for w in weight], dim=-1) if len(weight) > 1 else F.linear(x, weight[0])


def _prepare_weights(model: FlashLM) -> dict:
    fuse = sum(p.numel() * p.element_size() for p in model.layers.parameters()) <= FUSE_LIMIT_BYTES
    layers = []
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        layers.append(
            {
                "attn_norm": _norm_scale(block.attn_norm),
                "qkv": _matrix(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, fuse=fuse),
                "q_norm": _norm_scale(attn.q_norm),
                "k_norm": _norm_scale(attn.k_norm),
                "o": _matrix(attn.o_proj.weight, fuse=fuse),
                "post_attn_norm": _norm_scale(block.post_attn_norm),
                "mlp_norm": _norm_scale(block.mlp_norm),
                "gate_up": _matrix(mlp.gate_proj.weight, mlp.up_proj.weight, fuse=fuse),
                "down": _matrix(mlp.down_proj.weight, fuse=fuse),
                "post_mlp_norm": _norm_scale(block.post_mlp_norm),
            }
        )
    head = model.embed.weight if model.lm_head is None else model.lm_head.weight
    return {"embed": model.embed.weight, "layers": layers, "final_norm": _norm_scale(model.final_norm), "head": head}


# Prepared weights per model, remembered while the parameters stay the same tensors at the same version
# (an optimizer step or a load bumps the version, and the weights are prepared again).
_PREPARED: weakref.WeakKeyDictionary[FlashLM, tuple[tuple, dict]] = weakref.WeakKeyDictionary()


def _weights_key(model: FlashLM) -> tuple:
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters())


def prepared_weights(model: FlashLM) -> dict:
    """The step's view of the model's weights (see `_prepare_weights`), reused while they are unchanged."""
    key = _weights_key(model)
    held = _PREPARED.get(model)
    if held is None or held[0] != key:
        with torch.no_grad():
            held = (key, _prepare_weights(model))
        _PREPARED[model] = held
    return held[1]


def _rms(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """`RMSNorm.forward` with its scale precomputed."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * scale).type_as(x)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` on [B, H, head_dim] with cos/sin [B, 1, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


def _masks(
    shape: _Shape, slots: list[torch.Tensor], position: torch.Tensor, pad: torch.Tensor, slot_index: torch.Tensor
) -> dict[int | None, torch.Tensor]:
    """Boolean masks [B, 1, 1, entries], one per cache size: a key is visible when it was written, is
    not left padding, is not in the future and, in a ring, lies inside the window."""
    masks: dict[int | None, torch.Tensor] = {}
    low = pad[:, None]
    for layer, ring in enumerate(shape.rings):
        if ring in masks:
            continue
        if ring is None:
            visible = (slot_index[None] <= position) & (slot_index[None] >= low)
        else:
            held = slots[layer][None]
            visible = (held >= low) & (held <= position) & (position - held < shape.windows[layer])
        masks[ring] = visible[:, None, None]
    return masks


def _attend(shape: _Shape, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
    """Attention of q [B, H, head_dim] over every cache entry [B, K, entries, head_dim] under `mask`."""
    B = q.shape[0]
    H, K, hd = shape.n_heads, shape.n_kv_heads, shape.head_dim
    if shape.reduce_attention:
        # One query per row: scores and weighted values as sums over head_dim and over the entries, which
        # Inductor turns into loops over the cache fused with the mask and softmax; that beats calling the
        # SDPA kernel once per layer. Eager, this would materialise [B, K, rep, entries, head_dim].
        qg = q.reshape(B, K, H // K, 1, hd).float()
        scores = (qg * keys[:, :, None].float()).sum(-1) * shape.attn_scale  # [B, K, rep, entries]
        if shape.attn_softcap is not None:
            scores = shape.attn_softcap * torch.tanh(scores / shape.attn_softcap)
        probs = scores.masked_fill(~mask[:, :, :1], float("-inf")).softmax(-1)
        return (probs[..., None] * values[:, :, None].float()).sum(-2).type_as(q)  # [B, K, rep, hd]
    if shape.attn_softcap is None:
        out = F.scaled_dot_product_attention(
            q[:, :, None], keys, values, attn_mask=mask, scale=shape.attn_scale, enable_gqa=K != H
        )
        return out
    # soft-capped scores: explicit, in fp32, as `Attention._explicit_attention`
    scores = torch.matmul(q.reshape(B, K, H // K, hd).float(), keys.float().transpose(-1, -2)) * shape.attn_scale
    scores = shape.attn_softcap * torch.tanh(scores / shape.attn_softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), values.float()).type_as(q)


def decode_step(
    shape: _Shape,
    weights: dict,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    slots: list[torch.Tensor],
    tokens: torch.Tensor,
    position: torch.Tensor,
    pad: torch.Tensor,
    rope: dict[bool, tuple[torch.Tensor, torch.Tensor]],
    slot_index: torch.Tensor,
    embed_scale: torch.Tensor,
) -> torch.Tensor:
    """One token per row through the model; writes the cache in place and returns logits [B, V]."""
    B = tokens.shape[0]
    H, K, hd = shape.n_heads, shape.n_kv_heads, shape.head_dim
    where = position.reshape(1)
    for layer, ring in enumerate(shape.rings):  # the new token's slot, so the masks see it
        entry = where if ring is None else where % ring
        slots[layer].index_copy_(0, entry, where)
    masks = _masks(shape, slots, position, pad, slot_index)
    rows = (position - pad).clamp(min=0)  # RoPE position of the new token in each row
    tables = {local: (cos[rows][:, None], sin[rows][:, None]) for local, (cos, sin) in rope.items()}

    x = F.embedding(tokens, weights["embed"])
    if shape.gemma:
        x = x * embed_scale
    for layer, w in enumerate(weights["layers"]):
        ring = shape.rings[layer]
        h = _rms(x, w["attn_norm"], shape.eps)
        q, k, v = _apply(h, w["qkv"]).split([H * hd, K * hd, K * hd], dim=-1)
        q, k, v = q.reshape(B, H, hd), k.reshape(B, K, hd), v.reshape(B, K, hd)
        if shape.qk_norm:
            q, k = _rms(q, w["q_norm"], shape.eps), _rms(k, w["k_norm"], shape.eps)
        cos, sin = tables[shape.local_rope[layer]]
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        entry = where if ring is None else where % ring
        keys[layer].index_copy_(2, entry, k[:, :, None])
        values[layer].index_copy_(2, entry, v[:, :, None])
        out = _attend(shape, q, keys[layer], values[layer], masks[ring]).reshape(B, H * hd)
        h = _apply(out, w["o"])
        if w["post_attn_norm"] is not None:
            h = _rms(h, w["post_attn_norm"], shape.eps)
        x = x + h
        gate, up = _apply(_rms(x, w["mlp_norm"], shape.eps), w["gate_up"]).chunk(2, dim=-1)
        gate = F.gelu(gate, approximate="tanh") if shape.gemma else F.silu(gate)
        h = _apply(gate * up, w["down"])
        if w["post_mlp_norm"] is not None:
            h = _rms(h, w["post_mlp_norm"], shape.eps)
        x = x + h
    logits = F.linear(_rms(x, weights["final_norm"], shape.eps), weights["head"])
    if shape.final_softcap is not None:
        logits = shape.final_softcap * torch.tanh(logits / shape.final_softcap)
    return logits


class _FrozenStep(torch.nn.Module):
    """`decode_step` over weights held as buffers, so that `torch.compile` with freezing takes them for
    constants: Inductor then packs each projection matrix once, when it compiles, into the blocked layout
    of its C++ GEMM template (``max_autotune`` with the CPP backend). A CPU decode step multiplies a few
    rows by every weight matrix, where packing the weights at each call (what a plain matmul does) costs
    as much as the product."""

    def __init__(self, weights: dict) -> None:
        super().__init__()
        self.layer_names = [list(layer) for layer in weights["layers"]]
        for i, layer in enumerate(weights["layers"]):
            for name, weight in layer.items():
                if weight is not None:  # absent norms stay None (`getattr` default below)
                    self.register_buffer(f"layer{i}_{name}", weight, persistent=False)
        for name in ("embed", "final_norm", "head"):
            self.register_buffer(name, weights[name], persistent=False)

    def forward(self, shape: _Shape, *args) -> torch.Tensor:
        layers = [
            {name: getattr(self, f"layer{i}_{name}", None) for name in names}
            for i, names in enumerate(self.layer_names)
        ]
        weights = {"embed": self.embed, "final_norm": self.final_norm, "head": self.head, "layers": layers}
        return decode_step(shape, weights, *args)


# Inductor options of the frozen CPU step: weights as constants, every projection through Inductor's C++
# GEMM template (it has a plain C++ micro-kernel where the CPU lacks a vectorised one). ATen is left out of
# the choice: picking by timing on a shared CPU varies from run to run, and ATen's matmul repacks the
# weights at every call. Compiling takes tens of seconds (the templates are rendered and built with the C++
# compiler) and is not reused across processes: frozen graphs bypass Inductor's FX graph cache.
FROZEN_OPTIONS = {
    "freezing": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP",
    "autotune_num_choices_displayed": 0,  # no timing tables on stderr
    "max_autotune_report_choices_stats": False,
}
# Inductor's GEMM autotuning calls a deprecated storage API (a warning for torch's developers, not users).
warnings.filterwarnings("ignore", message="TypedStorage is deprecated", module=r"torch\._inductor\.")
FROZEN_GRAPHS = 64  # graphs one frozen step may hold: one per batch size and cache length it meets
_FROZEN: weakref.WeakKeyDictionary[FlashLM, tuple[tuple, object]] = weakref.WeakKeyDictionary()
_COMPILED = None


def _skip_own_guards(entries) -> list[bool]:
    """Dynamo's guards less those on the `_FrozenStep` itself (several per buffer, checked at every call):
    its graphs are kept apart from every other frozen step's (``isolate_recompiles``) and it belongs to
    one model and weights version, so they could never fail. The guards on the step's arguments (their
    shapes, the `_Shape`) pick the graph and all stay."""
    return [not entry.name.startswith("self") for entry in entries]


def _run_frozen(compiled, *args) -> torch.Tensor:
    # Dynamo reads `freezing` from the global Inductor config when it traces (to keep the buffers as
    # constants rather than graph inputs), so it is set around the call and nowhere else.
    config = torch._inductor.config
    before = config.freezing
    config.freezing = True
    try:
        return compiled(*args)
    finally:
        config.freezing = before


def compiled_step(model: FlashLM):
    """`decode_step` under `torch.compile`, called as ``run(shape, keys, values, ...)`` (the arguments of
    `decode_step` after the weights). On the CPU, for models whose weights `_prepare_weights` fuses, one
    frozen graph per model and weights version (`_FrozenStep`); otherwise one wrapper per process that
    takes the weights as inputs (Dynamo keeps a graph per shape)."""
    global _COMPILED
    weights = prepared_weights(model)
    device = next(model.parameters()).device
    if device.type == "cpu" and isinstance(weights["layers"][0]["qkv"], torch.Tensor):
        key = _weights_key(model)
        held = _FROZEN.get(model)
        if held is None or held[0] != key:
            options = {"cpp_wrapper": True, "guard_filter_fn": _skip_own_guards, **FROZEN_OPTIONS}
            compiled = torch.compile(
                _FrozenStep(weights),
                fullgraph=True,
                dynamic=False,
                options=options,
                isolate_recompiles=True,  # this model's graphs only, counted against its own limit
                recompile_limit=FROZEN_GRAPHS,
            )
            held = (key, functools.partial(_run_frozen, compiled))
            _FROZEN[model] = held
        return held[1]
    if _COMPILED is None:
        _COMPILED = torch.compile(decode_step, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
    compiled = _COMPILED
    return lambda shape, *args: compiled(shape, weights, *args)
