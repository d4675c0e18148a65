"""Export to and import from Hugging Face `transformers`: Gemma 3 text and Llama checkpoints.

The Gemma flavour maps onto `Gemma3TextConfig` + `Gemma3ForCausalLM` (RMSNorm weights use the same
(1 + w) convention, so norms copy unchanged), the Llama flavour onto `LlamaConfig` +
`LlamaForCausalLM`. Both sides use the rotate-half RoPE layout, so q/k weights copy unchanged too.

What does not travel: the NSP head, which is no part of the base FlashLM (`flashlm.model.heads`; a
checkpoint keeps it in nsp_head.safetensors, which export leaves behind). What cannot be expressed is
refused with a `FlashLMError`: a Llama export of a model with local layers, QK-norm or soft-caps; a
Gemma 3 export without QK-norm or with attention soft-capping (HF's Gemma 3 attention ignores
`attn_logit_softcapping`, so on import it is dropped too, matching what transformers computes). The
final-logit soft-cap travels both ways.

`transformers` is imported inside the functions, so `flashlm` works without it installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flashlm.config import ModelConfig
from flashlm.errors import CheckpointError, FlashLMError, first_line
from flashlm.model.transformer import FlashLM, save_safetensors

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

SUPPORTED_MODEL_TYPES = ("gemma3_text", "llama")
_HF_LAYER_TYPE = {"local": "sliding_attention", "global": "full_attention"}
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise FlashLMError(
            "Hugging Face interop needs `transformers`; install it with `pip install 'transformers>=4.50'`"
        ) from None
    return transformers


def _v5() -> bool:
    return int(_transformers().__version__.split(".")[0]) >= 5


# ---- weight names ---------------------------------------------------------------------------------
def weight_name_map(cfg: ModelConfig) -> dict[str, str]:
    """FlashLM parameter name → transformers parameter name."""
    gemma = cfg.flavour == "gemma"
    names = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"{ours}attn.{proj}.weight"] = f"{theirs}self_attn.{proj}.weight"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{ours}mlp.{proj}.weight"] = f"{theirs}mlp.{proj}.weight"
        names[f"{ours}attn_norm.weight"] = f"{theirs}input_layernorm.weight"
        if gemma:
            names[f"{ours}post_attn_norm.weight"] = f"{theirs}post_attention_layernorm.weight"
            names[f"{ours}mlp_norm.weight"] = f"{theirs}pre_feedforward_layernorm.weight"
            names[f"{ours}post_mlp_norm.weight"] = f"{theirs}post_feedforward_layernorm.weight"
        else:
            names[f"{ours}mlp_norm.weight"] = f"{theirs}post_attention_layernorm.weight"
        if cfg.qk_norm:
            names[f"{ours}attn.q_norm.weight"] = f"{theirs}self_attn.q_norm.weight"
            names[f"{ours}attn.k_norm.weight"] = f"{theirs}self_attn.k_norm.weight"
    return names


# ---- export -------------------------------------------------------------------------------------
def _check_exportable(cfg: ModelConfig) -> None:
    def refuse(msg: str) -> None:
        raise FlashLMError(f"cannot export to transformers: {msg}")

    if cfg.flavour == "gemma":
        if not cfg.qk_norm:
            refuse("Gemma 3 always has QK-norm but this model has qk_norm: false")
        if float(cfg.query_pre_attn_scalar) != int(cfg.query_pre_attn_scalar):
            refuse(f"Gemma 3 needs an integer query_pre_attn_scalar, got {cfg.query_pre_attn_scalar}")
        if cfg.attn_softcap is not None:
            refuse("transformers' Gemma 3 ignores attention soft-capping; set attn_softcap to null")
        return
    if "local" in cfg.layer_types:
        refuse(
            f"Llama has no sliding-window layers but layer_pattern is {cfg.layer_pattern!r}; "
            "use the gemma flavour or layer_pattern: G"
        )
    if cfg.qk_norm:
        refuse("Llama has no QK-norm but this model has qk_norm: true")
    if cfg.attn_softcap is not None or cfg.final_softcap is not None:
        refuse("Llama has no logit soft-capping; set attn_softcap and final_softcap to null")
    if float(cfg.query_pre_attn_scalar) != float(cfg.head_dim):
        refuse(
            f"Llama scales scores by head_dim**-0.5 but query_pre_attn_scalar is "
            f"{cfg.query_pre_attn_scalar} (head_dim {cfg.head_dim})"
        )


def to_hf_config(cfg: ModelConfig, tokenizer: Any = None) -> PretrainedConfig:
    """The transformers config (`Gemma3TextConfig` or `LlamaConfig`) equivalent to `cfg`.

    Special-token ids come from `tokenizer` (a `flashlm.tokenizer.Tokenizer`) when given, else
    FlashLM's defaults (pad 0, bos 1, eos 2).
    """
    tf = _transformers()
    _check_exportable(cfg)
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if tokenizer is not None:
        ids = {"pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    common: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        **ids,
    )
    if cfg.flavour == "llama":
        rope: dict[str, Any] = (
            {"rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base_global}}
            if _v5()
            else {"rope_theta": cfg.rope_base_global}
        )
        return tf.LlamaConfig(hidden_act="silu", mlp_bias=False, **rope, **common)
    if _v5():
        rope = {
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_base_local},
                "full_attention": {"rope_type": "default", "rope_theta": cfg.rope_base_global},
            }
        }
    else:
        rope = {"rope_theta": cfg.rope_base_global, "rope_local_base_freq": cfg.rope_base_local}
    return tf.Gemma3TextConfig(
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=int(cfg.query_pre_attn_scalar),
        sliding_window=cfg.sliding_window,
        layer_types=[_HF_LAYER_TYPE[t] for t in cfg.layer_types],
        attn_logit_softcapping=None,
        final_logit_softcapping=cfg.final_softcap,
        use_bidirectional_attention=False,
        **rope,
        **common,
    )


def to_hf_state_dict(model: FlashLM) -> dict[str, torch.Tensor]:
    """The model's weights under transformers names (no `lm_head.weight` when embeddings are tied)."""
    _check_exportable(model.cfg)
    state = model.state_dict()
    return {theirs: state[ours].detach() for ours, theirs in weight_name_map(model.cfg).items()}


def to_hf_model(model: FlashLM, attn_implementation: str = "eager") -> PreTrainedModel:
    """An in-memory `Gemma3ForCausalLM` / `LlamaForCausalLM` holding a copy of the model's weights."""
    tf = _transformers()
    config = to_hf_config(model.cfg)
    config._attn_implementation = attn_implementation
    cls = tf.LlamaForCausalLM if model.cfg.flavour == "llama" else tf.Gemma3ForCausalLM
    hf_model = cls(config)
    missing, unexpected = hf_model.load_state_dict(to_hf_state_dict(model), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:
        raise FlashLMError(f"weight mapping mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if model.cfg.tie_embeddings:
        hf_model.tie_weights()
    param = next(model.parameters())
    return hf_model.to(device=param.device, dtype=param.dtype).eval()


def _read_tokenizer(tokenizer: Any) -> tuple[str, Any] | None:
    """(tokenizer.json text, `Tokenizer`) from a `Tokenizer`, a tokenizer.json path or a directory."""
    from flashlm.tokenizer import Tokenizer

    if tokenizer is None:
        return None
    if hasattr(tokenizer, "to_str"):
        return tokenizer.to_str(), tokenizer
    path = Path(tokenizer)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FlashLMError(f"no tokenizer at {path}; pass a tokenizer.json or a directory holding one")
    return path.read_text(encoding="utf-8"), Tokenizer.load(path)


def _write_tokenizer(text: str, tok: Any, out_dir: Path, max_len: int) -> None:
    """Write tokenizer.json and a tokenizer_config.json that `AutoTokenizer` understands.

    FlashLM's framing travels: ``<bos>`` before every text (``add_bos_token`` and, for tokenizers saved
    before FlashLM wrote one, a post-processor added to tokenizer.json), every special token under its
    role (bos, eos, pad, mask, sep, unk where the vocabulary has one) and the server's chat template
    (`flashlm.chat.CHAT_TEMPLATE`), so ``apply_chat_template`` renders the prompt ``flashlm serve`` builds.
    """
    from flashlm.chat import CHAT_TEMPLATE
    from flashlm.tokenizer import Tokenizer, add_bos_post_processor

    backend = Tokenizer.from_str(text).backend
    if add_bos_post_processor(backend):
        text = backend.to_str(pretty=True)
    (out_dir / "tokenizer.json").write_text(text, encoding="utf-8")
    token = lambda i: None if i is None else tok.backend.id_to_token(i)
    roles = {
        "bos_token": token(tok.bos_id),
        "eos_token": token(tok.eos_id),
        "pad_token": token(tok.pad_id),
        "mask_token": token(tok.mask_id),
        "sep_token": token(tok.sep_id),
        "unk_token": "<unk>" if tok.backend.token_to_id("<unk>") is not None else None,
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        **{role: name for role, name in roles.items() if name is not None},
        "add_bos_token": tok.bos_id is not None,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # decode gives the text back as it was, as FlashLM's does
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def export_hf(model: FlashLM, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write a transformers checkpoint directory: config.json, generation_config.json,
    model.safetensors (+ tokenizer.json and tokenizer_config.json when `tokenizer` is given).

    `tokenizer`: a `flashlm.tokenizer.Tokenizer`, a tokenizer.json path or a directory holding one.
    Loads with `AutoModelForCausalLM.from_pretrained(out_dir)`.
    """
    tf = _transformers()
    out = Path(out_dir)
    text, tok = _read_tokenizer(tokenizer) or (None, None)
    config = to_hf_config(model.cfg, tok)
    out.mkdir(parents=True, exist_ok=True)
    if text is not None:
        _write_tokenizer(text, tok, out, model.cfg.max_seq_len)
    config.architectures = ["LlamaForCausalLM" if model.cfg.flavour == "llama" else "Gemma3ForCausalLM"]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    setattr(config, "dtype" if _v5() else "torch_dtype", dtype)
    state = {k: v.contiguous().cpu() for k, v in to_hf_state_dict(model).items()}
    # Written directly (the layout `save_pretrained` produces) so no second copy of the model is built.
    save_safetensors(out / "model.safetensors", state)  # the mode of every other file, not 0600
    config.save_pretrained(out)
    tf.GenerationConfig.from_model_config(config).save_pretrained(out)
    return out


# ---- import -------------------------------------------------------------------------------------
def _rope_theta(hf_config: Any, layer_type: str, legacy_key: str, default: float) -> float:
    """RoPE base of one layer type, from `rope_parameters` (transformers 5) or legacy fields."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and layer_type in params:
        params = params[layer_type]
    if isinstance(params, dict) and params:
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise FlashLMError(f"cannot import: RoPE scaling {kind!r} is not supported (only plain RoPE)")
        return float(params.get("rope_theta", default))
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling and layer_type != "sliding_attention":
        raise FlashLMError(f"cannot import: RoPE scaling {scaling} is not supported (only plain RoPE)")
    return float(getattr(hf_config, legacy_key, None) or default)


def _pattern(layer_types: list[str]) -> str:
    """The shortest L/G pattern whose tiling gives `layer_types` (transformers names)."""
    letters = "".join("L" if t == "sliding_attention" else "G" for t in layer_types)
    for period in range(1, len(letters) + 1):
        if all(letters[i] == letters[i % period] for i in range(len(letters))):
            return letters[:period]
    return letters


def from_hf_config(hf_config: Any) -> ModelConfig:
    """The FlashLM config equivalent to a transformers `gemma3_text` or `llama` config."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise FlashLMError(f"cannot import model type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise FlashLMError("cannot import: the checkpoint has attention/MLP biases, FlashLM has none")
    c = hf_config
    common = dict(
        vocab_size=c.vocab_size,
        d_model=c.hidden_size,
        n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads or c.num_attention_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        d_ff=c.intermediate_size,
        max_seq_len=c.max_position_embeddings,
        norm_eps=c.rms_norm_eps,
        tie_embeddings=bool(c.tie_word_embeddings),
        init_std=c.initializer_range,
    )
    if model_type == "llama":
        if c.hidden_act != "silu":
            raise FlashLMError(f"cannot import: Llama activation {c.hidden_act!r} (FlashLM uses silu)")
        theta = _rope_theta(c, "full_attention", "rope_theta", 10_000.0)
        return ModelConfig(
            flavour="llama",
            layer_pattern="G",
            qk_norm=False,
            rope_base_local=theta,
            rope_base_global=theta,
            query_pre_attn_scalar=float(common["head_dim"]),
            **common,
        )
    if c.hidden_activation not in _GELU_TANH:
        raise FlashLMError(f"cannot import: Gemma 3 activation {c.hidden_activation!r} (FlashLM uses tanh GELU)")
    if getattr(c, "use_bidirectional_attention", False):
        raise FlashLMError("cannot import: use_bidirectional_attention checkpoints are not supported")
    layer_types = list(c.layer_types)
    window = c.sliding_window
    if "sliding_attention" not in layer_types:
        window = min(window or common["max_seq_len"], common["max_seq_len"])
    return ModelConfig(
        flavour="gemma",
        layer_pattern=_pattern(layer_types),
        sliding_window=window,
        qk_norm=True,
        rope_base_local=_rope_theta(c, "sliding_attention", "rope_local_base_freq", 10_000.0),
        rope_base_global=_rope_theta(c, "full_attention", "rope_theta", 1_000_000.0),
        query_pre_attn_scalar=float(c.query_pre_attn_scalar),
        attn_softcap=None,
        final_softcap=c.final_logit_softcapping,
        **common,
    )


def from_hf_state_dict(hf_config: Any, state: dict[str, torch.Tensor]) -> FlashLM:
    """A FlashLM (fp32, eval mode) built from a transformers config and its state dict."""
    cfg = from_hf_config(hf_config)
    model = FlashLM(cfg)
    ours = model.state_dict()
    names = weight_name_map(cfg)
    missing = [theirs for theirs in names.values() if theirs not in state]
    if missing:
        raise CheckpointError(f"cannot import: weights missing from the checkpoint, e.g. {missing[:3]}")
    extra = sorted(set(state) - set(names.values()) - {"lm_head.weight"})
    if extra:
        raise CheckpointError(f"cannot import: unexpected weights in the checkpoint, e.g. {extra[:3]}")
    with torch.no_grad():
        for mine, theirs in names.items():
            tensor = state[theirs]
            if tuple(tensor.shape) != tuple(ours[mine].shape):
                raise CheckpointError(
                    f"cannot import: {theirs} has shape {tuple(tensor.shape)}, "
                    f"the config implies {tuple(ours[mine].shape)}"
                )
            ours[mine].copy_(tensor.to(ours[mine].dtype))
    return model.eval()


def import_hf(directory: str | Path) -> FlashLM:
    """Load a local transformers checkpoint (`gemma3_text` or `llama`) as a fp32 FlashLM.

    Never downloads and never runs remote code.
    """
    tf = _transformers()
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FlashLMError(f"{directory}: no config.json; pass a transformers model directory")
    try:
        config = tf.AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers and huggingface_hub raise many kinds for a bad config
        raise FlashLMError(f"{directory}: unreadable transformers config ({first_line(exc)})") from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise FlashLMError(
            f"{directory}: cannot import model type {config.model_type!r}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    from_hf_config(config)  # refuse unsupported variants before loading any weight
    dtype_key = "dtype" if _v5() else "torch_dtype"
    try:
        hf_model = tf.AutoModelForCausalLM.from_pretrained(
            directory, config=config, local_files_only=True, trust_remote_code=False, **{dtype_key: torch.float32}
        )
    except Exception as exc:  # a truncated file raises safetensors' own error, a wrong shape a RuntimeError
        raise CheckpointError(f"{directory}: cannot load the weights ({first_line(exc)})") from None
    return from_hf_state_dict(config, hf_model.state_dict())


def copy_tokenizer(src_dir: str | Path, out_dir: str | Path) -> bool:
    """Copy tokenizer.json from `src_dir` into `out_dir` if there is one; return whether it was copied."""
    src = Path(src_dir) / "tokenizer.json"
    if not src.is_file():
        return False
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, Path(out_dir) / "tokenizer.json")
    return True


__all__ = [
    "copy_tokenizer",
    "export_hf",
    "from_hf_config",
    "from_hf_state_dict",
    "import_hf",
    "to_hf_config",
    "to_hf_model",
    "to_hf_state_dict",
    "weight_name_map",
]
