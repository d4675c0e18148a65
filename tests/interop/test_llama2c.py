"""llama2.c import: a reference llama2.c forward pass, damaged files, and stories260K's greedy sample."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from corpora import real_data
from typer.testing import CliRunner

from flashlm.cli import app
from flashlm.errors import FlashLMError
from flashlm.interop.llama2c import (
    import_llama2c,
    llama2c_to_flashlm,
    read_llama2c,
    sentencepiece_to_tokenizer,
)
from flashlm.model.cache import KVCache
from flashlm.model.transformer import FlashLM


def stories260k() -> Path:
    """The real llama2.c stories260K folder (the tests that need it skip without ../shared/data)."""
    return real_data("llama2c-stories260K")


STEPS = 256  # llama2.c run.c's default -n: positions 0..255, each emitting one token after BOS


# ---- a tiny synthetic checkpoint and llama2.c's own forward pass -----------------------------------
def _random_llama2c(
    path: Path,
    shared: bool,
    dim: int = 32,
    hidden: int = 40,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vocab: int = 37,
    seq_len: int = 32,
) -> dict:
    rng = np.random.default_rng(0)
    hd, kv = dim // n_heads, n_kv_heads * (dim // n_heads)
    normal = lambda *shape, scale=1.0: rng.normal(size=shape) * scale
    w = {
        "tok_embeddings": normal(vocab, dim),
        "attention_norm": 1 + normal(n_layers, dim, scale=0.3),
        "wq": normal(n_layers, dim, dim, scale=0.5),
        "wk": normal(n_layers, kv, dim, scale=0.5),
        "wv": normal(n_layers, kv, dim, scale=0.25),
        "wo": normal(n_layers, dim, dim, scale=1 / 6),
        "ffn_norm": 1 + normal(n_layers, dim, scale=0.3),
        "w1": normal(n_layers, hidden, dim, scale=1 / 6),
        "w2": normal(n_layers, dim, hidden, scale=1 / 6),
        "w3": normal(n_layers, hidden, dim, scale=1 / 6),
        "norm": 1 + normal(dim, scale=0.3),
    }
    freqs = np.outer(np.arange(seq_len), 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd))
    w["freq_cis_real"], w["freq_cis_imag"] = np.cos(freqs), np.sin(freqs)
    if not shared:
        w["wcls"] = rng.normal(size=(vocab, dim)) / 4
    header = (dim, hidden, n_layers, n_heads, n_kv_heads, vocab if shared else -vocab, seq_len)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<7i", *header))
        for value in w.values():
            fh.write(np.asarray(value, dtype="<f4").tobytes())
    return {"header": header, **{k: torch.tensor(np.asarray(v, dtype=np.float32)) for k, v in w.items()}}


def _llama2c_forward(w: dict, tokens: torch.Tensor) -> torch.Tensor:
    """llama2.c `model.py` semantics: RoPE on interleaved (complex) pairs. tokens [T] → logits [T, V]."""
    dim, _, n_layers, n_heads, n_kv_heads, _, _ = w["header"]
    hd, T = dim // n_heads, tokens.shape[0]

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight

    def rope(x: torch.Tensor) -> torch.Tensor:  # [T, heads, hd]
        freqs = torch.complex(w["freq_cis_real"][:T], w["freq_cis_imag"][:T])[:, None]
        return torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)) * freqs).flatten(-2)

    x = w["tok_embeddings"][tokens]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in range(n_layers):
        h = rms(x, w["attention_norm"][layer])
        q = rope((h @ w["wq"][layer].T).view(T, n_heads, hd))
        k = rope((h @ w["wk"][layer].T).view(T, n_kv_heads, hd)).repeat_interleave(n_heads // n_kv_heads, 1)
        v = (h @ w["wv"][layer].T).view(T, n_kv_heads, hd).repeat_interleave(n_heads // n_kv_heads, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / hd**0.5
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", attn, v).reshape(T, dim) @ w["wo"][layer].T
        h = rms(x, w["ffn_norm"][layer])
        x = x + (F.silu(h @ w["w1"][layer].T) * (h @ w["w3"][layer].T)) @ w["w2"][layer].T
    return rms(x, w["norm"]) @ w.get("wcls", w["tok_embeddings"]).T


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
def test_matches_llama2c_forward(tmp_path: Path, shared: bool) -> None:
    w = _random_llama2c(tmp_path / "m.bin", shared)
    model = llama2c_to_flashlm(tmp_path / "m.bin")
    cfg = model.cfg
    assert (cfg.flavour, cfg.layer_pattern, cfg.qk_norm, cfg.tie_embeddings) == ("llama", "G", False, shared)
    assert (cfg.norm_eps, cfg.rope_base_global, cfg.max_seq_len, cfg.vocab_size) == (1e-5, 10_000.0, 32, 37)
    tokens = torch.randint(0, 37, (20,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens[None]).logits[0]
    torch.testing.assert_close(ours, _llama2c_forward(w, tokens), atol=1e-4, rtol=1e-4)


def _expect_one_line_error(fn, match: str) -> None:
    with pytest.raises(FlashLMError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_damaged_checkpoints(tmp_path: Path) -> None:
    good = tmp_path / "good.bin"
    _random_llama2c(good, shared=True)
    data = good.read_bytes()
    cases = {
        "truncated.bin": (data[:-4], "implies"),
        "trailing.bin": (data + b"\0" * 8, "implies"),
        "short.bin": (data[:10], "too short"),
        "zero.bin": (struct.pack("<7i", 32, 40, 0, 4, 2, 37, 32) + data[28:], "positive"),
        "heads.bin": (struct.pack("<7i", 32, 40, 2, 5, 2, 37, 32) + data[28:], "do not fit"),
        "v1.bin": (struct.pack("<2i", 0x616B3432, 1) + b"\0" * 248, "newer llama2.c export"),
        "nan.bin": (data[:28] + np.full(1, np.nan, "<f4").tobytes() + data[32:], "NaN"),
    }
    for name, (content, match) in cases.items():
        (tmp_path / name).write_bytes(content)
        _expect_one_line_error(lambda n=name: read_llama2c(tmp_path / n), match)
    _expect_one_line_error(lambda: read_llama2c(tmp_path / "missing.bin"), "no such file")
    _expect_one_line_error(lambda: sentencepiece_to_tokenizer(good), "not a SentencePiece")
    result = CliRunner().invoke(
        app,
        [
            "import",
            "llama2c",
            str(tmp_path / "truncated.bin"),
            "--tokenizer",
            str(good),
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert isinstance(result.exception, FlashLMError)
    assert not (tmp_path / "out").exists()


# ---- stories260K -------------------------------------------------------------------------------------
def _reference_text() -> str:
    """The greedy sample printed in REFERENCE.md (the first fenced block)."""
    text = (stories260k() / "REFERENCE.md").read_text(encoding="utf-8")
    return text.split("```")[1].removeprefix("\n").removesuffix("\n")


@pytest.fixture(scope="module")
def stories(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stories260K")
    result = CliRunner().invoke(
        app,
        [
            "import",
            "llama2c",
            str(stories260k() / "stories260K.bin"),
            "--tokenizer",
            str(stories260k() / "tok512.model"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def test_stories260k_greedy_sample(stories: Path) -> None:
    from flashlm.tokenizer import Tokenizer

    model = FlashLM.from_pretrained(stories)
    tok = Tokenizer.load(stories)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 512)
    cfg = model.cfg
    assert (cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.max_seq_len) == (
        64,
        172,
        5,
        8,
        4,
        512,
    )
    ids, step_logits = [tok.bos_id], []
    cache = KVCache(cfg, 1, cfg.max_seq_len)
    with torch.no_grad():
        logits = model(torch.tensor([ids]), cache=cache).logits[0, -1]
        while len(ids) <= STEPS:
            step_logits.append(logits)
            nxt = int(logits.argmax())
            if nxt == tok.bos_id:
                break
            ids.append(nxt)
            logits = model(torch.tensor([[nxt]]), cache=cache).logits[0, -1]
        full = model(torch.tensor([ids[:-1]]), mode="causal").logits[0]
    assert tok.decode(ids) == _reference_text()
    torch.testing.assert_close(full, torch.stack(step_logits), atol=1e-4, rtol=1e-5)  # fp32 noise ~2e-5


def test_tokenizer_matches_sentencepiece(stories: Path) -> None:
    import sentencepiece as spm

    from flashlm.tokenizer import Tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(stories260k() / "tok512.model"))
    tok = Tokenizer.load(stories)
    texts = [
        _reference_text(),
        "Hello  world!\tTabs,\nnewlines, 12345 digits, émoji 🙂 and 日本語.",
        "  padded  ",
        "",
        " ",
        "x",
    ]
    for text in texts:
        assert tok.encode(text) == sp.encode(text), text
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)), text


def test_import_without_cli(tmp_path: Path) -> None:
    out = import_llama2c(stories260k() / "stories260K.bin", stories260k() / "tok512.model", tmp_path / "m")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    model = FlashLM.from_pretrained(out)
    assert model.cfg.tie_embeddings and model.num_parameters() == 260_032  # llama2.c's own count: no NSP head
