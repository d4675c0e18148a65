"""Export to GGUF, llama.cpp's file format, written with the `gguf` package (llama.cpp's own Python writer).

The file holds what llama.cpp's `convert_hf_to_gguf.py` writes for the `transformers` model that
`flashlm export hf` produces, so llama.cpp runs it as it runs that model:

- **llama flavour** → architecture ``llama``. llama.cpp's llama graph rotates interleaved RoPE pairs
  (2i, 2i+1) while FlashLM (like Hugging Face) rotates halves (i, i + h/2), so each head's q/k rows are
  reordered (`rotate_half_to_interleaved`, the permutation `convert_hf_to_gguf.py` applies to
  ``LlamaForCausalLM``). Refused as in `export hf`: local layers, QK-norm, soft-caps, a score scale
  other than head_dim ** -0.5.
- **gemma flavour** → architecture ``gemma3``. llama.cpp's RMSNorm multiplies by w, Gemma's by (1 + w),
  so every norm weight (q/k norms included) is stored as 1 + w. llama.cpp scales the embeddings by
  √d_model itself (as FlashLM does), reads the window (``attention.sliding_window``), the global RoPE
  base (``rope.freq_base``) and the final-logit soft-cap; the rest of Gemma 3 is fixed in its code: five
  local layers then one global (``LLLLLG``), RoPE base 10,000 on local layers, scores scaled by
  head_dim ** -0.5, no attention soft-cap. A model that differs there is refused with the reason rather
  than written to run differently. A model with only global layers gets no window key (as the converter
  does for such configs), which current llama.cpp reads as "no sliding window" (older builds insist on
  the key and refuse to load the file).

Tensors go in as f32, f16 or bf16 (`--dtype`); as in `convert_hf_to_gguf.py`, 1-D tensors (the norms)
stay f32. Every tensor keeps the checkpoint's shape: a vocabulary larger than the tokenizer's is padded
with unused ``[PADn]`` tokens, as the converter does.

The tokenizer goes in too. FlashLM's byte-level BPE is ``tokenizer.ggml.model = "gpt2"`` with its
merges; its pre-tokenizer is `tokenizers`' ByteLevel with the GPT-2 split regex, which llama.cpp knows
as the ``"gpt-2"`` pre-tokenizer (its ``"default"`` uses another regex). A SentencePiece-style BPE (what
`flashlm import llama2c` writes) is ``"llama"`` with per-token scores: its tokenizer.json ranks merges
by the SentencePiece piece scores, so a piece's score here is -1 minus the rank of the first merge that
builds it, which gives llama.cpp's merge-by-score the same order. Special-token ids (bos, eos, pad,
unk, mask, sep) are written, and ``add_bos_token`` is true: FlashLM frames documents as
``<bos> … <eos>`` and puts ``<bos>`` before every prompt.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flashlm.chat import CHAT_TEMPLATE
from flashlm.config import ModelConfig
from flashlm.errors import ConfigError, FlashLMError
from flashlm.interop.hf import weight_name_map
from flashlm.model.transformer import FlashLM
from flashlm.tokenizer import bpe_merge_pairs, is_gpt2_byte_level

GGUF_DTYPES = ("f32", "f16", "bf16")
LLAMA_CPP_SWA_PERIOD = 6  # llama.cpp's gemma3: layer i is local when i % 6 < 5
LLAMA_CPP_SWA_ROPE_BASE = 10_000.0  # llama.cpp's gemma3: RoPE base of the local layers
_GPT2_PRE = "gpt-2"  # llama.cpp's name for the GPT-2 split regex that tokenizers' ByteLevel uses


def _gguf():
    try:
        import gguf
    except ImportError:
        raise FlashLMError("GGUF export needs the `gguf` package; install it with `pip install gguf`") from None
    return gguf


def _refuse(msg: str) -> FlashLMError:
    return FlashLMError(f"cannot export to GGUF: {msg}")


# ---- what llama.cpp can run --------------------------------------------------------------------
def llama_cpp_layer_types(n_layers: int) -> list[str]:
    """The layer types llama.cpp's gemma3 architecture uses when a sliding window is set."""
    period = LLAMA_CPP_SWA_PERIOD
    return ["local" if i % period < period - 1 else "global" for i in range(n_layers)]


def check_gguf_exportable(cfg: ModelConfig) -> None:
    """Raise a one-line `FlashLMError` when llama.cpp would run `cfg` differently from FlashLM."""
    head_scale = float(cfg.head_dim)
    if cfg.flavour == "llama":
        if "local" in cfg.layer_types:
            raise _refuse(f"llama has no sliding-window layers but layer_pattern is {cfg.layer_pattern!r}")
        if cfg.qk_norm:
            raise _refuse("llama has no QK-norm but this model has qk_norm: true")
        if cfg.attn_softcap is not None or cfg.final_softcap is not None:
            raise _refuse("llama has no logit soft-capping; set attn_softcap and final_softcap to null")
        if float(cfg.query_pre_attn_scalar) != head_scale:
            raise _refuse(
                f"llama scales scores by head_dim ** -0.5 but query_pre_attn_scalar is {cfg.query_pre_attn_scalar}"
            )
        return
    if not cfg.qk_norm:
        raise _refuse("llama.cpp's gemma3 always applies QK-norm but this model has qk_norm: false")
    if cfg.attn_softcap is not None:
        raise _refuse("llama.cpp's gemma3 has no attention soft-capping; set attn_softcap to null")
    if cfg.n_layers == 62:  # llama.cpp scales Gemma 3 27B (62 layers) by (d_model / n_heads) ** -0.5
        head_scale = cfg.d_model / cfg.n_heads
    if float(cfg.query_pre_attn_scalar) != head_scale:
        raise _refuse(
            f"llama.cpp's gemma3 scales scores by {head_scale:g} ** -0.5 but query_pre_attn_scalar is "
            f"{cfg.query_pre_attn_scalar:g}"
        )
    if "local" not in cfg.layer_types:
        return
    if cfg.layer_types != llama_cpp_layer_types(cfg.n_layers):
        raise _refuse(
            f"llama.cpp's gemma3 fixes the layers to five local then one global (LLLLLG) but layer_pattern is "
            f"{cfg.layer_pattern!r}; use LLLLLG or all-global G"
        )
    if float(cfg.rope_base_local) != LLAMA_CPP_SWA_ROPE_BASE:
        raise _refuse(
            f"llama.cpp's gemma3 fixes the local layers' RoPE base to 10000 but rope_base_local is "
            f"{cfg.rope_base_local:g}"
        )


# ---- tensors ------------------------------------------------------------------------------------
def rotate_half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from rotate-half RoPE pairs (i, i + h/2) to interleaved pairs (2i, 2i+1).

    Row i of a head's first half goes to row 2i, row i of its second half to row 2i + 1: the layout
    llama.cpp's llama graph rotates (`convert_hf_to_gguf.py` permutes Hugging Face's q/k the same way).
    """
    rows, cols = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)


def gguf_tensor_names(cfg: ModelConfig) -> dict[str, str]:
    """FlashLM parameter name → GGUF tensor name, through the `transformers` names and `gguf`'s own map."""
    gguf = _gguf()
    arch = gguf.MODEL_ARCH.LLAMA if cfg.flavour == "llama" else gguf.MODEL_ARCH.GEMMA3
    tensor_map = gguf.get_tensor_name_map(arch, cfg.n_layers)
    names = {}
    for ours, theirs in weight_name_map(cfg).items():
        mapped = tensor_map.get_name(theirs, try_suffixes=(".weight",))
        if mapped is None:  # pragma: no cover - every name FlashLM has is in gguf's map
            raise _refuse(f"gguf has no tensor name for {theirs}")
        names[ours] = mapped
    return names


def _to_gguf(cfg: ModelConfig, ours: str, tensor: torch.Tensor) -> torch.Tensor:
    """One FlashLM weight as llama.cpp expects it (fp32, transforms applied)."""
    tensor = tensor.detach().float().cpu()
    if cfg.flavour == "gemma" and ours.endswith("norm.weight"):
        tensor = tensor + 1.0  # Gemma's RMSNorm scales by (1 + w), llama.cpp's by w
    elif cfg.flavour == "llama" and ours.endswith("attn.q_proj.weight"):
        tensor = rotate_half_to_interleaved(tensor, cfg.n_heads)
    elif cfg.flavour == "llama" and ours.endswith("attn.k_proj.weight"):
        tensor = rotate_half_to_interleaved(tensor, cfg.n_kv_heads)
    return tensor.contiguous()


# ---- tokenizer ----------------------------------------------------------------------------------
def _tokenizer_kind(data: dict[str, Any]) -> str:
    """The llama.cpp tokenizer model of a tokenizer.json: gpt2 (byte-level BPE) or llama (SentencePiece BPE)."""
    model = data.get("model") or {}
    pre, normalizer = data.get("pre_tokenizer"), data.get("normalizer")
    if model.get("type") != "BPE":
        raise _refuse(f"only BPE tokenizers can go into GGUF here, this one is {model.get('type')!r}")
    if pre and pre.get("type") == "ByteLevel":
        if not is_gpt2_byte_level(data):
            raise _refuse(
                "the byte-level tokenizer must split with the GPT-2 regex, add no prefix space and have no "
                "normalizer (what `flashlm tokenizer train` writes) for llama.cpp's gpt-2 pre-tokenizer"
            )
        return "gpt2"
    if model.get("byte_fallback") and pre is None and "▁" in json.dumps(normalizer, ensure_ascii=False):
        return "llama"
    raise _refuse(
        "the tokenizer is neither FlashLM's byte-level BPE nor a SentencePiece-style BPE "
        "(as `flashlm import llama2c` writes), the two kinds llama.cpp is given here"
    )


def _normalizer_steps(normalizer: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The steps of a tokenizer.json normalizer, a `Sequence` flattened."""
    if not normalizer:
        return []
    if normalizer.get("type") == "Sequence":
        return [step for inner in normalizer["normalizers"] for step in _normalizer_steps(inner)]
    return [normalizer]


def _token_types(gguf: Any, tokenizer: Any, kind: str, tokens: list[str], unk: str | None) -> list[int]:
    """llama.cpp's token type of every token: control (special), user-defined (other added tokens),
    unknown and byte (SentencePiece's <unk> and <0xNN>), unused (padding ids), normal."""
    types, n = gguf.TokenType, tokenizer.vocab_size
    added = tokenizer.backend.get_added_tokens_decoder()
    out = []
    for i, token in enumerate(tokens):
        if i >= n:
            out.append(types.UNUSED)
        elif kind == "llama" and token == unk:
            out.append(types.UNKNOWN)
        elif i in added:
            out.append(types.CONTROL if added[i].special else types.USER_DEFINED)
        elif kind == "llama" and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            out.append(types.BYTE)
        else:
            out.append(types.NORMAL)
    return out


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Write the tokenizer into `writer` (a `gguf.GGUFWriter`); ids past the tokenizer's are padding."""
    gguf = _gguf()
    data = json.loads(tokenizer.to_str())
    kind = _tokenizer_kind(data)
    backend, n = tokenizer.backend, tokenizer.vocab_size
    if n > vocab_size:
        raise _refuse(f"the tokenizer has {n} tokens but the model's vocabulary only {vocab_size}")
    by_id = {i: t for t, i in backend.get_vocab(with_added_tokens=True).items()}
    if sorted(by_id) != list(range(n)):
        raise _refuse("the tokenizer's ids are not contiguous from 0")
    tokens = [by_id[i] for i in range(n)] + [f"[PAD{i}]" for i in range(n, vocab_size)]
    unk = data["model"].get("unk_token")
    merges = bpe_merge_pairs(data)
    writer.add_tokenizer_model(kind)
    writer.add_token_list(tokens)
    writer.add_token_types(_token_types(gguf, tokenizer, kind, tokens, unk))
    if kind == "gpt2":
        writer.add_tokenizer_pre(_GPT2_PRE)
        writer.add_token_merges([f"{a} {b}" for a, b in merges])
    else:
        first_rank: dict[str, int] = {}
        for rank, (left, right) in enumerate(merges):
            first_rank.setdefault(left + right, rank)
        # llama.cpp merges the adjacent pair whose result scores highest: -1 - merge rank keeps the order
        # (pieces no merge builds, single characters and specials, score 0 as SentencePiece's own do)
        writer.add_token_scores([-1.0 - first_rank[t] if t in first_rank else 0.0 for t in tokens])
        steps = _normalizer_steps(data.get("normalizer"))
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(any(s.get("type") == "Prepend" and s.get("prepend") == "▁" for s in steps))
        squeeze = any(s.get("type") == "Replace" and s.get("pattern") == {"Regex": " {2,}"} for s in steps)
        writer.add_remove_extra_whitespaces(squeeze)
        if unk is not None and backend.token_to_id(unk) is not None:
            writer.add_unk_token_id(backend.token_to_id(unk))
    roles = (
        (tokenizer.bos_id, writer.add_bos_token_id),
        (tokenizer.eos_id, writer.add_eos_token_id),
        (tokenizer.pad_id, writer.add_pad_token_id),
        (tokenizer.mask_id, writer.add_mask_token_id),
        (tokenizer.sep_id, writer.add_sep_token_id),
    )
    for token_id, add in roles:
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(tokenizer.bos_id is not None)  # FlashLM's convention: <bos> before every text
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)  # the server's "User:/Assistant:" format (flashlm.chat)


# ---- the file -----------------------------------------------------------------------------------
def _add_hparams(writer: Any, cfg: ModelConfig, file_type: int) -> None:
    """The architecture's metadata, the keys `convert_hf_to_gguf.py` writes for the exported config."""
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_freq_base(float(cfg.rope_base_global))
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_file_type(file_type)
    if cfg.flavour == "llama":
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_rope_dimension_count(cfg.head_dim)
        return
    if "local" in cfg.layer_types:
        writer.add_sliding_window(cfg.sliding_window)
    if cfg.final_softcap is not None:
        writer.add_final_logit_softcapping(float(cfg.final_softcap))


def _ggml_type(gguf: Any, tensor: torch.Tensor, dtype: str) -> Any:
    """The GGML type a tensor is stored in: `dtype` for matrices, f32 for 1-D tensors (as the converter)."""
    types = gguf.GGMLQuantizationType
    return types.F32 if dtype == "f32" or tensor.ndim <= 1 else {"f16": types.F16, "bf16": types.BF16}[dtype]


def _encode(gguf: Any, tensor: torch.Tensor, ggml_type: Any) -> np.ndarray:
    """The bytes of one tensor in its GGML type (bf16 rounded to nearest even, as llama.cpp rounds it)."""
    array = tensor.numpy().astype(np.float32)
    if ggml_type == gguf.GGMLQuantizationType.BF16:
        return gguf.quants.quantize(array, ggml_type)
    return array.astype(np.float16) if ggml_type == gguf.GGMLQuantizationType.F16 else array


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise ConfigError(f"{out} is a directory; pass a file path such as {out / 'model.gguf'}")
    if out.suffix != ".gguf":
        raise ConfigError(f"{out}: a GGUF file name must end in .gguf")


def export_gguf(
    model: FlashLM, out: str | os.PathLike, tokenizer: Any, dtype: str = "f16", name: str | None = None
) -> Path:
    """Write `model` and its tokenizer as one GGUF file for llama.cpp; return its path.

    `tokenizer`: a `flashlm.tokenizer.Tokenizer`, a tokenizer.json path or a directory holding one.
    `dtype`: "f32", "f16" (llama.cpp's converter default) or "bf16" for the matrices; norms stay f32.
    The file is written under a temporary name and renamed, so `out` is either complete or untouched.
    """
    from flashlm.tokenizer import Tokenizer

    gguf = _gguf()
    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    out = Path(out)
    _check_out(out)
    if tokenizer is None:
        raise _refuse("llama.cpp needs the tokenizer; the model directory has no tokenizer.json")
    tok = tokenizer if hasattr(tokenizer, "to_str") else Tokenizer.load(tokenizer)
    cfg = model.cfg
    check_gguf_exportable(cfg)  # refuse what llama.cpp cannot run before anything is written
    names, state = gguf_tensor_names(cfg), model.state_dict()
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    }[dtype]
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA if cfg.flavour == "llama" else gguf.MODEL_ARCH.GEMMA3]
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)  # opens no file before the header is written
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or "FlashLM")
    _add_hparams(writer, cfg, file_type)
    _add_tokenizer(writer, tok, cfg.vocab_size)
    for ours, tensor_name in names.items():  # the tensor infos now, each tensor's data later, one at a time
        tensor = state[ours]
        ggml_type = _ggml_type(gguf, tensor, dtype)
        nbytes = tensor.numel() * (4 if ggml_type == gguf.GGMLQuantizationType.F32 else 2)
        writer.add_tensor_info(tensor_name, tuple(tensor.shape), np.dtype(np.float32), nbytes, ggml_type)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for ours in names:  # memory stays at the model plus one converted tensor
            tensor = state[ours]
            writer.write_tensor_data(_encode(gguf, _to_gguf(cfg, ours, tensor), _ggml_type(gguf, tensor, dtype)))
        writer.close()
        os.replace(tmp, out)
    except OSError as exc:
        raise FlashLMError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        writer.close()
        with contextlib.suppress(OSError):  # left behind only when writing failed
            tmp.unlink(missing_ok=True)
    return out


__all__ = [
    "GGUF_DTYPES",
    "check_gguf_exportable",
    "export_gguf",
    "gguf_tensor_names",
    "llama_cpp_layer_types",
    "rotate_half_to_interleaved",
]
