"""The FlashLM transformer: embeddings, blocks, the LM head, save/load (task heads: `flashlm.model.heads`).

One set of weights runs in three attention modes (causal, bidirectional, prefix), optionally over
packed documents, and decodes incrementally with a `KVCache`.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from flashlm.config import ModelConfig
from flashlm.errors import CheckpointError, ConfigError
from flashlm.model.attention import MODES, Attention, MaskSpec, build_mask
from flashlm.model.cache import KVCache
from flashlm.model.layers import GatedMLP, RMSNorm, rope_cos_sin

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
HEAD_KEYS = ("nsp_head.",)  # task-head weights older checkpoints keep in the base state dict


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # [B, T, V] (None when compute_logits=False)
    hidden: torch.Tensor  # final-norm hidden states [B, T, d]
    hidden_states: list[torch.Tensor] | None = None  # embeddings, then every block's output
    attentions: list[torch.Tensor] | None = None  # per layer [B, H, Tq, Tk]


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout` when it would act; otherwise `x` itself (no op, no RNG draw, on the inference path)."""
    return F.dropout(x, p, training=True) if p and training else x


class Block(nn.Module):
    """Gemma: x + post_norm(attn(norm(x))), then the same around the MLP. Llama: no post-norms."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        gemma = cfg.flavour == "gemma"
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, offset=gemma)
        self.attn = Attention(cfg, layer_idx)
        self.post_attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if gemma else None
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, offset=gemma)
        self.mlp = GatedMLP(cfg.d_model, cfg.d_ff, "gelu_tanh" if gemma else "silu")
        self.post_mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if gemma else None
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, mask, cache=None, return_weights=False):
        h, weights = self.attn(self.attn_norm(x), cos, sin, mask, cache, return_weights)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + dropout(h, self.dropout, self.training)
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + dropout(h, self.dropout, self.training), weights


def positions_in_documents(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its (contiguous) document: [B, T] → [B, T]."""
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


class FlashLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        device = torch.empty(0).device  # the caller's default device ("meta" under `with torch.device("meta")`)
        with torch.device("meta"):  # skip torch's default inits: `reset_parameters` alone draws the weights
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
            self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, offset=cfg.flavour == "gemma")
            self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.to_empty(device=device)
        self.gradient_checkpointing = False
        self._register_load_state_dict_pre_hook(_drop_head_keys)
        if device.type != "meta":
            self.reset_parameters()

    # ---- initialisation --------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Initialise every parameter, in `named_parameters` order (one random stream, so a model
        materialised shard by shard from the meta device gets the same weights; see `init_parameter_`)."""
        with torch.no_grad():
            for name, param in self.named_parameters():
                self.init_parameter_(name, param)

    def init_parameter_(self, name: str, tensor: torch.Tensor) -> None:
        """Fill `tensor` (the full shape of parameter `name`) with its initial values, in place.

        Linear weights ~ N(0, init_std), output projections scaled by 1/sqrt(2·n_layers); biases 0;
        embeddings ~ N(0, init_std); RMSNorm weights 0 with the (1 + w) offset, else 1.
        """
        module_name, _, kind = name.rpartition(".")
        module = self.get_submodule(module_name)
        std = self.cfg.init_std
        if isinstance(module, nn.Linear) and kind == "bias":
            nn.init.zeros_(tensor)
        elif isinstance(module, nn.Linear):
            deep = module_name.endswith(("o_proj", "down_proj"))
            nn.init.normal_(tensor, std=std / math.sqrt(2 * self.cfg.n_layers) if deep else std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(tensor, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.zeros_(tensor) if module.offset else nn.init.ones_(tensor)
        else:
            raise TypeError(f"no initialisation rule for parameter {name} of {type(module).__name__}")

    # ---- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        mode: str = "causal",
        prefix_len: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        compute_logits: bool = True,
        return_hidden_states: bool = False,
        return_attentions: bool | str = False,
    ) -> LMOutput:
        """Run the model.

        input_ids [B, T]; mode "causal" | "bidirectional" | "prefix" (then prefix_len [B] tokens of each
        row are bidirectional); doc_ids [B, T] keeps packed documents apart (and restarts RoPE
        positions per document); cache continues an incremental decode. return_attentions=True returns
        every layer's attention weights, "last" only the last layer's (the others keep fast kernels).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        B, T = input_ids.shape
        device = input_ids.device
        if prefix_len is not None:
            prefix_len = torch.as_tensor(prefix_len, device=device).expand(B)
        spec, positions = self._mask_spec(B, T, mode, prefix_len, doc_ids, cache, device)
        x = self.embed(input_ids)
        if self.cfg.flavour == "gemma":
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        x = dropout(x, self.cfg.dropout, self.training)
        rope = {
            base: rope_cos_sin(positions, self.cfg.head_dim, base)
            for base in {self.cfg.rope_base_local, self.cfg.rope_base_global}
        }
        masks = self._masks(spec, cache, T, device)
        hidden_states = [x] if return_hidden_states else None
        attentions = [] if return_attentions else None
        last = len(self.layers) - 1
        for i, block in enumerate(self.layers):
            want_weights = return_attentions is True or (return_attentions == "last" and i == last)
            local = block.attn.is_local
            cos, sin = rope[self.cfg.rope_base_local if local else self.cfg.rope_base_global]
            mask = masks["local" if local else "global"]
            if self.gradient_checkpointing and self.training and cache is None:
                x, weights = checkpoint(block, x, cos, sin, mask, None, want_weights, use_reentrant=False)
            else:
                x, weights = block(x, cos, sin, mask, cache, want_weights)
            if return_hidden_states:
                hidden_states.append(x)
            if want_weights:
                attentions.append(weights)
        if cache is not None:
            cache.advance(T)
        hidden = self.final_norm(x)
        logits = self.logits(hidden) if compute_logits else None
        return LMOutput(logits, hidden, hidden_states, attentions)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits (tied to the embedding unless configured otherwise), soft-capped if set."""
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, weight)
        cap = self.cfg.final_softcap
        return cap * torch.tanh(logits / cap) if cap is not None else logits

    def _mask_spec(self, B, T, mode, prefix_len, doc_ids, cache, device):
        if cache is None:
            positions = (
                positions_in_documents(doc_ids)
                if doc_ids is not None
                else torch.arange(T, device=device)[None].expand(B, T)
            )
            return MaskSpec(mode=mode, prefix_end=prefix_len, q_doc=doc_ids), positions
        q_pos = torch.arange(cache.seen, cache.seen + T, device=device)[None].expand(B, T)
        pad = cache.pad_left
        prefix_end = None if prefix_len is None else prefix_len + (pad if pad is not None else 0)
        positions = q_pos if pad is None else (q_pos - pad[:, None]).clamp(min=0)
        return MaskSpec(mode=mode, q_pos=q_pos, prefix_end=prefix_end, valid_from=pad), positions

    def _masks(self, spec: MaskSpec, cache: KVCache | None, T: int, device) -> dict[str, Any]:
        """One mask per layer kind: a bool tensor, "causal" (use is_causal) or None (no mask)."""
        masks: dict[str, Any] = {}
        types = self.cfg.layer_types
        for kind in ("global", "local"):
            if kind not in types:
                continue
            window = self.cfg.sliding_window if kind == "local" else None
            if cache is not None:
                layer = types.index(kind)
                k_pos = cache.key_slots(layer, T)[None].expand(spec.q_pos.shape[0], -1)
                spec_k = MaskSpec(**{**spec.__dict__, "k_pos": k_pos})
                masks[kind] = build_mask(spec_k, cache.windows[layer], T, k_pos.shape[1], device)
            else:
                window = window if window is not None and window < T else None
                if window is not None or spec.q_doc is not None or spec.mode == "prefix":
                    masks[kind] = build_mask(spec, window, T, T, device)
                else:
                    masks[kind] = "causal" if spec.mode == "causal" else None
        return masks

    # ---- save / load -------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, tokenizer: Any = None) -> Path:
        """Write config.json + model.safetensors (+ tokenizer.json) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_safetensors(
            directory / WEIGHTS_FILE, {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        )
        config = {"architecture": "FlashLM", **self.cfg.to_dict()}
        _atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2)))
        if tokenizer is not None:
            tokenizer.save(directory)
        return directory

    @staticmethod
    def load_config(directory: str | Path) -> ModelConfig:
        path = Path(directory) / CONFIG_FILE
        if not path.is_file():
            raise CheckpointError(f"{directory}: no {CONFIG_FILE}; is this a FlashLM model directory?")
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                data.pop("architecture", None)
            return ModelConfig.from_dict(data)  # refuses anything but a mapping
        except (json.JSONDecodeError, ConfigError, TypeError) as exc:
            raise CheckpointError(f"{path}: unreadable model config ({exc})") from None

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> FlashLM:
        """Load a model saved by `save_pretrained` (weights via safetensors only)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from flashlm.hardware import default_device

        device = default_device(str(device))  # a bad name or absent CUDA: one line, not a "damaged file"
        cfg = cls.load_config(directory)
        weights = Path(directory) / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"{directory}: no {WEIGHTS_FILE}; the checkpoint is incomplete")
        try:
            state = load_file(str(weights), device=str(device))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{weights}: damaged weights file ({exc}); use another checkpoint") from None
        state = {k: v for k, v in state.items() if not k.startswith(HEAD_KEYS)}
        with torch.device("meta"):
            model = cls(cfg)
        _check_state(model, state, weights)
        model.load_state_dict(state, assign=True)
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()

    def num_parameters(self, include_embedding: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total if include_embedding else total - self.embed.weight.numel()


def _drop_head_keys(state: dict[str, Any], prefix: str, *args: Any) -> None:
    """A state dict from before the NSP head left the base model loads: its ``nsp_head.*`` keys are
    dropped (`flashlm.model.heads.FlashLMForPretraining` reads them)."""
    for key in [k for k in state if k.startswith(prefix) and k[len(prefix) :].startswith(HEAD_KEYS)]:
        del state[key]


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: config and weights disagree (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); the checkpoint is inconsistent"
        )
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{where}: config and weights disagree: {name} has shape "
                f"{tuple(state[name].shape)}, the config implies {tuple(tensor.shape)}"
            )


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write `tensors` as a safetensors file, atomically, with the mode of every other file (see `_atomic_write`)."""
    from safetensors.torch import save_file

    path = Path(path)
    _atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    return path


def _atomic_write(path: Path, write) -> None:
    """`write` into a temporary name beside `path`, fsync, rename into place. The file keeps the mode that
    creating it gave (0666 less the umask, like any other file): safetensors writes through a private
    temporary file and would otherwise leave 0600."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a leftover of a crashed write would keep its own mode
    tmp.touch()
    mode = stat.S_IMODE(tmp.stat().st_mode)
    write(tmp)
    os.chmod(tmp, mode)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
