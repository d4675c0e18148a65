"""Import a llama2.c checkpoint (legacy "version 0" export) and its SentencePiece tokenizer.

The file holds seven little-endian int32s — dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len (a negative vocab_size means the classifier is *not* shared with the embedding) —
then float32 arrays in this order: token embedding [V, d]; per layer stacked: attention_norm [L, d],
wq [L, H·h, d], wk [L, K·h, d], wv [L, K·h, d], wo [L, d, H·h], ffn_norm [L, d], w1 [L, f, d],
w2 [L, d, f], w3 [L, f, d]; final norm [d]; the RoPE tables freq_cis_real/imag [seq, h/2] (skipped);
then, when not shared, the classifier [V, d].

llama2.c rotates interleaved pairs (2i, 2i+1) of each head; FlashLM uses the rotate-half layout
(i, i + h/2), so each head's q/k rows are permuted (the permutation of HF's Llama conversion).

The tokenizer: a SentencePiece BPE `.model` becomes a `tokenizers` BPE with byte fallback
(merges recovered from the vocabulary, ranked by piece score), SentencePiece's normalization
(squeeze spaces when the model asks for it, spaces → "▁", the dummy-prefix "▁"), and a decoder
that turns "▁" into spaces, bytes back into text and drops the dummy-prefix space; a post-processor
puts "<s>" before a text when special tokens are added (`transformers`' ``tokenizer("text")``). The settings
are read from the .model's protobuf with a few lines of wire-format parsing (no `protobuf` needed).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from flashlm.config import ModelConfig
from flashlm.errors import CheckpointError, DataError
from flashlm.model.transformer import FlashLM
from flashlm.tokenizer import add_bos_post_processor

HEADER = struct.Struct("<7i")
_V1_MAGIC = 0x616B3432  # "ak42": llama2.c's newer export formats
_SPM_BPE = 2
_SPM_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


# ---- checkpoint ---------------------------------------------------------------------------------
def _config_from_header(header: tuple[int, ...], path: Path) -> tuple[ModelConfig, bool]:
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = header
    shared = vocab > 0
    vocab = abs(vocab)

    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a llama2.c legacy checkpoint ({msg})")

    if header[0] == _V1_MAGIC:
        raise bad("it is a newer llama2.c export (magic 'ak42'); re-export with llama2.c's legacy format, version 0")
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) <= 0:
        raise bad(f"header values must be positive, got {header}")
    if max(dim, hidden, n_heads, n_layers) > 1 << 16 or vocab > 1 << 22 or seq_len > 1 << 24:
        raise bad(f"implausible header {header}")
    if dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise bad(f"dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv_heads} do not fit together")
    cfg = ModelConfig(
        vocab_size=vocab,
        d_model=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        d_ff=hidden,
        flavour="llama",
        layer_pattern="G",
        qk_norm=False,
        tie_embeddings=shared,
        norm_eps=1e-5,
        rope_base_local=10_000.0,
        rope_base_global=10_000.0,
        max_seq_len=seq_len,
        sliding_window=min(128, seq_len),
    )
    return cfg, shared


def _shapes(cfg: ModelConfig, shared: bool) -> list[tuple[str, tuple[int, ...]]]:
    """The arrays of the file, in order."""
    d, f, L, V, h = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.n_heads * h, cfg.n_kv_heads * h
    rope = (cfg.max_seq_len, h // 2)
    shapes = [
        ("tok_embeddings", (V, d)),
        ("attention_norm", (L, d)),
        ("wq", (L, q, d)),
        ("wk", (L, kv, d)),
        ("wv", (L, kv, d)),
        ("wo", (L, d, q)),
        ("ffn_norm", (L, d)),
        ("w1", (L, f, d)),
        ("w2", (L, d, f)),
        ("w3", (L, f, d)),
        ("norm", (d,)),
        ("freq_cis_real", rope),
        ("freq_cis_imag", rope),
    ]
    return shapes if shared else [*shapes, ("wcls", (V, d))]


def read_llama2c(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """The FlashLM config and the raw llama2.c arrays (llama2.c names) of a legacy checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; pass a llama2.c .bin checkpoint")
    size = path.stat().st_size
    if size < HEADER.size:
        raise CheckpointError(f"{path}: {size} bytes is too short for a llama2.c checkpoint header")
    with open(path, "rb") as fh:
        header = HEADER.unpack(fh.read(HEADER.size))
    cfg, shared = _config_from_header(header, path)
    shapes = _shapes(cfg, shared)
    expected = HEADER.size + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if size != expected:
        hint = "truncated" if size < expected else "has trailing bytes"
        raise CheckpointError(
            f"{path}: the header {header} implies {expected} bytes but the file has {size} "
            f"(file {hint} or header damaged)"
        )
    flat = np.memmap(path, dtype="<f4", mode="r", offset=HEADER.size)
    arrays, offset = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        arrays[name] = np.array(flat[offset : offset + n]).reshape(shape)
        offset += n
    del flat
    if not all(np.isfinite(a).all() for a in arrays.values()):
        raise CheckpointError(f"{path}: the weights contain NaN or infinite values; the file is damaged")
    return cfg, arrays


def interleaved_to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from interleaved RoPE pairs (2i, 2i+1) to rotate-half (i, i + h/2)."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def llama2c_to_flashlm(path: str | Path) -> FlashLM:
    """A fp32 FlashLM (Llama flavour, eval mode) holding a llama2.c checkpoint's weights."""
    cfg, a = read_llama2c(path)
    t = {k: torch.from_numpy(v) for k, v in a.items()}
    state = {"embed.weight": t["tok_embeddings"], "final_norm.weight": t["norm"]}
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = t["wcls"]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        state.update(
            {
                p + "attn_norm.weight": t["attention_norm"][i],
                p + "attn.q_proj.weight": interleaved_to_rotate_half(t["wq"][i], cfg.n_heads),
                p + "attn.k_proj.weight": interleaved_to_rotate_half(t["wk"][i], cfg.n_kv_heads),
                p + "attn.v_proj.weight": t["wv"][i],
                p + "attn.o_proj.weight": t["wo"][i],
                p + "mlp_norm.weight": t["ffn_norm"][i],
                p + "mlp.gate_proj.weight": t["w1"][i],
                p + "mlp.down_proj.weight": t["w2"][i],
                p + "mlp.up_proj.weight": t["w3"][i],
            }
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = FlashLM(cfg)
    model.load_state_dict(state)
    return model.eval()


# ---- tokenizer ----------------------------------------------------------------------------------
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf: bytes) -> dict[int, list[int | bytes]]:
    """Top-level fields of a protobuf message: field number → values (varints or raw bytes)."""
    fields: dict[int, list[int | bytes]] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + width], pos + width
        else:
            raise ValueError(f"unsupported wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def _spm_settings(data: bytes) -> tuple[int, bool, bool]:
    """(model_type, add_dummy_prefix, remove_extra_whitespaces) of a serialized SentencePiece model."""
    top = _proto_fields(data)
    trainer = _proto_fields(top[2][-1]) if 2 in top else {}
    normalizer = _proto_fields(top[3][-1]) if 3 in top else {}
    model_type = int(trainer.get(3, [1])[-1])  # default UNIGRAM
    add_dummy_prefix = bool(normalizer.get(3, [1])[-1])  # default true
    remove_extra_whitespaces = bool(normalizer.get(4, [1])[-1])  # default true
    return model_type, add_dummy_prefix, remove_extra_whitespaces


def sentencepiece_to_tokenizer(model_path: str | Path):
    """A `tokenizers.Tokenizer` equivalent to a SentencePiece BPE model (byte fallback supported)."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    path = Path(model_path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass the SentencePiece tokenizer .model")
    data = path.read_bytes()
    try:
        model_type, dummy_prefix, squeeze_spaces = _spm_settings(data)
        sp = spm.SentencePieceProcessor(model_proto=data)
    except (ValueError, RuntimeError, KeyError, IndexError, OSError):
        raise DataError(
            f"{path}: not a SentencePiece .model file (llama2.c's tokenizer .bin is not "
            "accepted; pass the .model it was exported from)"
        ) from None
    if model_type != _SPM_BPE:
        raise DataError(
            f"{path}: a SentencePiece {_SPM_MODEL_TYPES.get(model_type, model_type)} model; "
            "only BPE models are supported"
        )
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    scores = [sp.get_score(i) for i in range(n)]
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    mergeable = [i for i in range(n) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))]
    ranked = []
    for i in mergeable:
        piece = pieces[i]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    unk = pieces[sp.unk_id()] if sp.unk_id() >= 0 else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = []
    if squeeze_spaces:  # as SentencePiece: drop leading/trailing spaces, collapse runs of spaces
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    steps.append(normalizers.Replace(" ", "▁"))
    if dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in special])
    add_bos_post_processor(tok)  # "<s>" before every text, as llama2.c trained and FlashLM frames documents
    return tok


# ---- the whole conversion -----------------------------------------------------------------------
def import_llama2c(model_path: str | Path, tokenizer_path: str | Path | None, out_dir: str | Path) -> Path:
    """Convert a llama2.c checkpoint (+ SentencePiece tokenizer) into a FlashLM model directory."""
    model = llama2c_to_flashlm(model_path)
    tok = sentencepiece_to_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    if tok is not None and tok.get_vocab_size(with_added_tokens=True) != model.cfg.vocab_size:
        raise DataError(
            f"{tokenizer_path}: {tok.get_vocab_size(with_added_tokens=True)} tokens but the "
            f"checkpoint's vocabulary has {model.cfg.vocab_size}; pass the matching tokenizer"
        )
    out = Path(out_dir)
    model.save_pretrained(out)
    if tok is not None:
        tok.save(str(out / "tokenizer.json"), pretty=True)
    return out


__all__ = [
    "interleaved_to_rotate_half",
    "import_llama2c",
    "llama2c_to_flashlm",
    "read_llama2c",
    "sentencepiece_to_tokenizer",
]
