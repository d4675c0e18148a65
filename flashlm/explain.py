"""Look inside a model: attention maps and token saliency for a text, as arrays, PNGs and JSON.

* Attention maps: every layer's and head's weights [L, H, T, T] from a causal forward pass; rows sum to
  one; `select_attention` picks one layer / head or averages over either.
* Saliency: gradient × input for the next-token prediction. The score of input token t is
  ‖∂ log p(target | text) / ∂e_t ⊙ e_t‖₂, with e_t its input embedding; the target is the model's most
  likely next token unless one is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from flashlm.errors import FlashLMError
from flashlm.model.transformer import FlashLM


@dataclass
class Attention:
    tokens: list[str]
    ids: list[int]
    weights: torch.Tensor  # [L, H, T, T] float32 on CPU; row q is query q's distribution over keys
    layer_types: list[str]  # "local" / "global" per layer


@dataclass
class Saliency:
    tokens: list[str]
    ids: list[int]
    scores: torch.Tensor  # [T] float32, one per input token
    target_id: int
    target: str
    probability: float  # p(target | text)


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """A readable piece of text for each token (special tokens by name)."""
    special = tokenizer.special_ids
    return [tokenizer.backend.id_to_token(i) if i in special else tokenizer.decode([i]) for i in ids]


def encode(model: FlashLM, tokenizer, text: str, add_bos: bool = True, max_tokens: int | None = None) -> list[int]:
    """Token ids of `text`, keeping the last ones when it is longer than the context (or `max_tokens`)."""
    ids = tokenizer.encode(text, add_bos=add_bos)
    if not ids:
        raise FlashLMError("the text has no tokens; give some text (or keep add_bos)")
    limit = min(model.cfg.max_seq_len, max_tokens or model.cfg.max_seq_len)
    return ids[-limit:]


@torch.no_grad()
def attention_maps(
    model: FlashLM, tokenizer, text: str, add_bos: bool = True, max_tokens: int | None = None
) -> Attention:
    """Every layer's and head's causal attention weights over the tokens of `text`."""
    ids = encode(model, tokenizer, text, add_bos, max_tokens)
    device = next(model.parameters()).device
    out = model(torch.tensor([ids], device=device), return_attentions=True, compute_logits=False)
    weights = torch.stack([a[0] for a in out.attentions]).float().cpu()
    return Attention(token_strings(tokenizer, ids), ids, weights, list(model.cfg.layer_types))


def select_attention(weights: torch.Tensor, layer: int | None = None, head: int | None = None) -> torch.Tensor:
    """One [T, T] map from [L, H, T, T]: a given layer / head, or the average over layers / heads (None)."""
    n_layers, n_heads = weights.shape[:2]
    if layer is not None and not -n_layers <= layer < n_layers:
        raise FlashLMError(f"layer {layer} is out of range: the model has {n_layers} layers (0-{n_layers - 1})")
    if head is not None and not -n_heads <= head < n_heads:
        raise FlashLMError(f"head {head} is out of range: the model has {n_heads} heads (0-{n_heads - 1})")
    weights = weights.mean(0) if layer is None else weights[layer]
    return weights.mean(0) if head is None else weights[head]


def saliency(
    model: FlashLM,
    tokenizer,
    text: str,
    target: int | str | None = None,
    add_bos: bool = True,
    max_tokens: int | None = None,
) -> Saliency:
    """Gradient × input-embedding norm per token for predicting `target` right after `text`.

    `target` is a token id, or a string whose first token is used (mind the leading space: " cat"),
    or None for the model's most likely next token.
    """
    ids = encode(model, tokenizer, text, add_bos, max_tokens)
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []

    def leaf(module, inputs, output):  # make the looked-up embeddings a leaf we can differentiate by
        output = output.detach().float().requires_grad_(True)
        captured.append(output)
        return output.to(module.weight.dtype)

    handle = model.embed.register_forward_hook(leaf)
    try:
        with torch.enable_grad():
            logits = model(torch.tensor([ids], device=device)).logits[0, -1].float()
            logprobs = logits.log_softmax(-1)
            target_id = _target_id(tokenizer, target, int(logprobs.argmax()), logprobs.shape[-1])
            (grad,) = torch.autograd.grad(logprobs[target_id], captured[0])
    finally:
        handle.remove()
    scores = (grad[0] * captured[0].detach()[0]).norm(dim=-1).cpu()
    return Saliency(
        token_strings(tokenizer, ids),
        ids,
        scores,
        target_id,
        token_strings(tokenizer, [target_id])[0],
        float(logprobs[target_id].detach().exp()),
    )


def _target_id(tokenizer, target: int | str | None, best: int, vocab: int) -> int:
    if target is None:
        return best
    if isinstance(target, str):
        pieces = tokenizer.encode(target)
        if not pieces:
            raise FlashLMError("the saliency target is empty; give a token, e.g. ' the'")
        target = pieces[0]
    if not 0 <= target < vocab:
        raise FlashLMError(f"target token id {target} is outside the vocabulary (0-{vocab - 1})")
    return int(target)


def explain(
    model: FlashLM,
    tokenizer,
    text: str,
    layer: int | None = None,
    head: int | None = None,
    target: int | str | None = None,
    with_saliency: bool = True,
    max_tokens: int | None = None,
    digits: int = 5,
) -> dict:
    """Everything as JSON-ready data: tokens, the selected attention map, sizes, and saliency."""
    att = attention_maps(model, tokenizer, text, max_tokens=max_tokens)
    matrix = select_attention(att.weights, layer, head)
    result = {
        "text": text,
        "tokens": att.tokens,
        "ids": att.ids,
        "n_layers": att.weights.shape[0],
        "n_heads": att.weights.shape[1],
        "layer_types": att.layer_types,
        "layer": layer,
        "head": head,
        "attention": _rounded(matrix, digits),
    }
    if with_saliency:
        sal = saliency(model, tokenizer, text, target, max_tokens=max_tokens)
        result["saliency"] = {
            "target": sal.target,
            "target_id": sal.target_id,
            "probability": round(sal.probability, digits),
            "scores": _rounded(sal.scores, digits),
        }
    return result


def save_explanation(
    model: FlashLM,
    tokenizer,
    text: str,
    out_dir: str | Path,
    layer: int | None = None,
    head: int | None = None,
    target: int | str | None = None,
) -> dict[str, Path]:
    """Write attention.png (the selected map), attention_grid.png (all layers × heads), saliency.png and
    explain.json into `out_dir`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    att = attention_maps(model, tokenizer, text)
    sal = saliency(model, tokenizer, text, target)
    matrix = select_attention(att.weights, layer, head)
    which = f"layer {layer}" if layer is not None else "mean of layers"
    which += f", head {head}" if head is not None else ", mean of heads"
    paths = {
        "attention": plot_attention(matrix, att.tokens, out / "attention.png", f"attention ({which})"),
        "attention_grid": plot_attention_grid(att.weights, att.tokens, out / "attention_grid.png", att.layer_types),
        "saliency": plot_saliency(
            sal.tokens,
            sal.scores,
            out / "saliency.png",
            f"saliency for next token {sal.target!r} (p={sal.probability:.3f})",
        ),
    }
    data = {
        "text": text,
        "tokens": att.tokens,
        "ids": att.ids,
        "layer_types": att.layer_types,
        "layer": layer,
        "head": head,
        "attention": _rounded(matrix, 5),
        "attention_all": _rounded(att.weights, 5),  # [L][H][T][T]
        "saliency": {
            "target": sal.target,
            "target_id": sal.target_id,
            "probability": sal.probability,
            "scores": _rounded(sal.scores, 6),
        },
    }
    paths["json"] = out / "explain.json"
    paths["json"].write_text(json.dumps(data, ensure_ascii=False))
    return paths


# ---- plots (matplotlib's Agg canvas: no display needed, no global backend switched) ------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _label(token: str) -> str:
    return token.replace("\n", "\\n").replace("\t", "\\t")


def plot_attention(matrix, tokens: list[str], path: str | Path, title: str = "attention") -> Path:
    """One [T, T] attention map as a heatmap: rows are queries, columns keys."""
    matrix = torch.as_tensor(matrix).float().numpy()
    T = len(tokens)
    size = min(4 + 0.25 * T, 24)
    fig = _figure(size, size)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=max(float(matrix.max()), 1e-6))
    if T <= 80:
        labels = [_label(t) for t in tokens]
        ax.set_xticks(range(T), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(T), labels, fontsize=8)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_attention_grid(
    weights, tokens: list[str], path: str | Path, layer_types: list[str] | None = None, max_panels: int = 64
) -> Path:
    """Small multiples: layers as rows, heads as columns (heads averaged when there are too many panels)."""
    weights = torch.as_tensor(weights).float()
    if weights.shape[0] * weights.shape[1] > max_panels:
        weights = weights.mean(1, keepdim=True)
    n_layers, n_heads = weights.shape[:2]
    fig = _figure(1.8 * n_heads + 0.5, 1.8 * n_layers + 0.5)
    axes = fig.subplots(n_layers, n_heads, squeeze=False)
    for layer in range(n_layers):
        for head in range(n_heads):
            ax = axes[layer][head]
            ax.imshow(weights[layer, head].numpy(), cmap="viridis", vmin=0.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title("mean of heads" if n_heads == 1 else f"head {head}", fontsize=8)
            if head == 0:
                kind = f" ({layer_types[layer]})" if layer_types else ""
                ax.set_ylabel(f"layer {layer}{kind}", fontsize=8)
    fig.suptitle(f"attention over {len(tokens)} tokens")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_saliency(tokens: list[str], scores, path: str | Path, title: str = "saliency") -> Path:
    """A bar per input token, scaled to the largest score."""
    scores = torch.as_tensor(scores).float()
    scaled = (scores / scores.max().clamp(min=1e-12)).numpy()
    T = len(tokens)
    fig = _figure(min(3 + 0.3 * T, 30), 3.5)
    ax = fig.add_subplot()
    ax.bar(range(T), scaled, color="tab:orange")
    if T <= 120:
        ax.set_xticks(range(T), [_label(t) for t in tokens], rotation=90, fontsize=8)
    ax.set_ylabel("relative saliency")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def _rounded(tensor: torch.Tensor, digits: int):
    def walk(x):
        return [walk(v) for v in x] if isinstance(x, list) else round(x, digits)

    return walk(torch.as_tensor(tensor).float().tolist())
