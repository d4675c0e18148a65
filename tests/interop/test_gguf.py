"""`flashlm export gguf`: read the file back with `gguf`'s reader (every tensor, the metadata, the tokenizer)
and with `transformers`' GGUF loader, an independent reader that undoes llama.cpp's conventions (the
llama q/k permutation, Gemma's norms stored as 1 + w): its logits must equal FlashLM's.

llama.cpp itself is not run here: building `llama-cpp-python` from source on a small CPU machine takes far
longer than the suite allows, and no prebuilt binary is fetched at test time.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from corpora import real_data, stories
from typer.testing import CliRunner

from flashlm.cli import app
from flashlm.config import ModelConfig, replace
from flashlm.errors import FlashLMError
from flashlm.model.transformer import FlashLM
from flashlm.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")

REPO = Path(__file__).resolve().parents[2]
# Gemma 3 as llama.cpp runs it: five local layers then one global (a seventh, local, checks the tiling).
# head_dim 256: transformers' GGUF reader assumes Gemma 3's query_pre_attn_scalar of 256, llama.cpp uses
# head_dim, so the two readers agree when they are the same.
GEMMA = ModelConfig(
    vocab_size=520,
    d_model=32,
    n_layers=7,
    n_heads=2,
    n_kv_heads=1,
    head_dim=256,
    d_ff=48,
    flavour="gemma",
    layer_pattern="LLLLLG",
    sliding_window=4,
    max_seq_len=64,
)
LLAMA = ModelConfig(
    vocab_size=520,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    d_ff=48,
    flavour="llama",
    layer_pattern="G",
    tie_embeddings=False,
    max_seq_len=64,
    norm_eps=1e-5,
    rope_base_local=500.0,
    rope_base_global=500.0,
)
TEXT = "Once upon a time, there was a little cat who liked to play in the garden."


def _model(cfg: ModelConfig, seed: int = 0) -> FlashLM:
    """A random model with norm weights away from their initial values (so Gemma's +1 matters)."""
    torch.manual_seed(seed)
    model = FlashLM(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.3)
            elif name.endswith("proj.weight"):
                param.mul_(4.0)  # sharp attention, so positions and the window matter
    return model


def _save(model: FlashLM, tokenizer: Tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder, tokenizer)
    return folder


def _export(model_dir: Path, out: Path, dtype: str | None = None) -> Path:
    args = ["export", "gguf", str(model_dir), "--out", str(out)] + (["--dtype", dtype] if dtype else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


def _field(reader, key: str):
    return reader.fields[key].contents()


def _expected_tensors(model: FlashLM) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under llama.cpp's names, transformed as `convert_hf_to_gguf.py` does."""
    cfg, state = model.cfg, model.state_dict()
    names = {"embed.weight": "token_embd.weight", "final_norm.weight": "output_norm.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    per_layer = {
        "attn.q_proj": "attn_q",
        "attn.k_proj": "attn_k",
        "attn.v_proj": "attn_v",
        "attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "attn_norm": "attn_norm",
        "mlp_norm": "ffn_norm",
    }
    if cfg.flavour == "gemma":
        per_layer |= {
            "post_attn_norm": "post_attention_norm",
            "post_mlp_norm": "post_ffw_norm",
            "attn.q_norm": "attn_q_norm",
            "attn.k_norm": "attn_k_norm",
        }
    for i in range(cfg.n_layers):
        names |= {f"layers.{i}.{ours}.weight": f"blk.{i}.{theirs}.weight" for ours, theirs in per_layer.items()}

    def permute(w: torch.Tensor, heads: int) -> torch.Tensor:  # convert_hf_to_gguf.py's LlamaModel.permute
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    out = {}
    for ours, theirs in names.items():
        tensor = state[ours].float()
        if cfg.flavour == "gemma" and ours.endswith("norm.weight"):
            tensor = tensor + 1
        if cfg.flavour == "llama" and ".q_proj" in ours:
            tensor = permute(tensor, cfg.n_heads)
        if cfg.flavour == "llama" and ".k_proj" in ours:
            tensor = permute(tensor, cfg.n_kv_heads)
        out[theirs] = tensor
    return out


# ---- the tensors and metadata, read back with gguf's reader ---------------------------------------
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("cfg", [replace(GEMMA, final_softcap=30.0), LLAMA], ids=["gemma3", "llama"])
def test_every_tensor_reads_back_equal(cfg, dtype, trained_tokenizer, tmp_path: Path) -> None:
    model = _model(cfg)
    out = _export(_save(model, trained_tokenizer, tmp_path / "model"), tmp_path / "model.gguf", dtype)
    reader = gguf.GGUFReader(out)
    expected = _expected_tensors(model)
    assert sorted(t.name for t in reader.tensors) == sorted(expected)
    matrix_type = {"f32": "F32", "f16": "F16", "bf16": "BF16"}[dtype]
    cast = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for tensor in reader.tensors:
        want = expected[tensor.name]
        assert tuple(int(n) for n in tensor.shape) == tuple(reversed(want.shape)), tensor.name  # ggml order
        assert tensor.tensor_type.name == ("F32" if want.ndim == 1 else matrix_type), tensor.name
        got = torch.from_numpy(np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type)).copy())
        want = want if want.ndim == 1 else want.to(cast).float()
        assert torch.equal(got.reshape(want.shape).float(), want), tensor.name
    arch = "gemma3" if cfg.flavour == "gemma" else "llama"
    metadata = {
        "general.architecture": arch,
        "general.file_type": {"f32": 0, "f16": 1, "bf16": 32}[dtype],
        f"{arch}.block_count": cfg.n_layers,
        f"{arch}.context_length": cfg.max_seq_len,
        f"{arch}.embedding_length": cfg.d_model,
        f"{arch}.feed_forward_length": cfg.d_ff,
        f"{arch}.attention.head_count": cfg.n_heads,
        f"{arch}.attention.head_count_kv": cfg.n_kv_heads,
        f"{arch}.attention.key_length": cfg.head_dim,
        f"{arch}.attention.value_length": cfg.head_dim,
        f"{arch}.rope.freq_base": cfg.rope_base_global,
    }
    if cfg.flavour == "gemma":
        metadata |= {"gemma3.attention.sliding_window": cfg.sliding_window, "gemma3.final_logit_softcapping": 30.0}
    else:
        metadata |= {"llama.vocab_size": cfg.vocab_size, "llama.rope.dimension_count": cfg.head_dim}
    for key, value in metadata.items():
        assert _field(reader, key) == pytest.approx(value), key
    assert _field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps, rel=1e-6)


def test_byte_level_tokenizer_goes_in_whole(trained_tokenizer, tmp_path: Path) -> None:
    model_dir = _save(_model(GEMMA), trained_tokenizer, tmp_path / "model")
    reader = gguf.GGUFReader(_export(model_dir, tmp_path / "model.gguf"))
    backend = trained_tokenizer.backend
    n = trained_tokenizer.vocab_size
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens[:n] == [backend.id_to_token(i) for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, GEMMA.vocab_size)]  # the model's unused ids
    import json

    merges = json.loads(trained_tokenizer.to_str())["model"]["merges"]
    assert _field(reader, "tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m for m in merges]
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[:5] == [gguf.TokenType.CONTROL] * 5  # <pad> <bos> <eos> <mask> <sep>
    assert set(types[5:n]) == {gguf.TokenType.NORMAL} and set(types[n:]) == {gguf.TokenType.UNUSED}
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    from flashlm.chat import CHAT_TEMPLATE

    assert _field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE  # the server's chat format
    ids = {
        "bos_token_id": trained_tokenizer.bos_id,
        "eos_token_id": trained_tokenizer.eos_id,
        "padding_token_id": trained_tokenizer.pad_id,
        "mask_token_id": trained_tokenizer.mask_id,
        "seperator_token_id": trained_tokenizer.sep_id,  # sic: gguf's key name
    }
    for key, value in ids.items():
        assert _field(reader, f"tokenizer.ggml.{key}") == value, key
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    assert _field(reader, "tokenizer.ggml.add_eos_token") is False


# ---- an independent reader: transformers' GGUF loader ------------------------------------------------
def _transformers_from_gguf(path: Path):
    """(model, tokenizer) as `transformers` reads a GGUF file (its own dequantizing and un-permuting)."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config)
    # Loading through from_pretrained(gguf_file=...) needs `accelerate`; this is the same reader without it.
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if config.tie_word_embeddings:
        model.tie_weights()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


@pytest.mark.parametrize("cfg", [GEMMA, LLAMA], ids=["gemma3", "llama"])
def test_transformers_reads_the_same_model(cfg, trained_tokenizer, tmp_path: Path) -> None:
    model = _model(cfg)
    out = _export(_save(model, trained_tokenizer, tmp_path / "model"), tmp_path / "model.gguf", "f32")
    theirs, their_tokenizer = _transformers_from_gguf(out)
    ids = trained_tokenizer.encode(TEXT, add_bos=True)
    assert their_tokenizer(TEXT)["input_ids"] == ids  # <bos> added, the same BPE
    assert len(ids) > GEMMA.sliding_window * 3  # long enough for the window and the global layer to matter
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits
        torch.testing.assert_close(theirs(torch.tensor([ids])).logits, ours, atol=1e-4, rtol=0)


# ---- SentencePiece tokenizers (llama2.c imports) -----------------------------------------------------
def _sentencepiece_model(folder: Path) -> Path:
    """A small SentencePiece BPE with byte fallback, trained on generated stories (a second or so)."""
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(stories(300)),
        model_writer=buffer,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    path = folder / "tok.model"
    path.write_bytes(buffer.getvalue())
    return path


def test_sentencepiece_tokenizer_goes_in_as_llama(tmp_path: Path) -> None:
    import sentencepiece as spm

    from flashlm.interop.llama2c import sentencepiece_to_tokenizer

    sp_path = _sentencepiece_model(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    tokenizer = Tokenizer(sentencepiece_to_tokenizer(sp_path))
    model = _model(replace(LLAMA, vocab_size=sp.get_piece_size()))
    out = _export(_save(model, tokenizer, tmp_path / "model"), tmp_path / "model.gguf", "f32")
    reader = gguf.GGUFReader(out)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.tokens") == pieces
    kinds = {
        gguf.TokenType.UNKNOWN: sp.is_unknown,
        gguf.TokenType.CONTROL: sp.is_control,
        gguf.TokenType.BYTE: sp.is_byte,
    }
    for i, kind in enumerate(_field(reader, "tokenizer.ggml.token_type")):
        assert kinds.get(kind, lambda j: not (sp.is_unknown(j) or sp.is_control(j) or sp.is_byte(j)))(i), pieces[i]
    # llama.cpp merges by score: the multi-character pieces must rank as SentencePiece's own scores rank them
    scores = _field(reader, "tokenizer.ggml.scores")
    merged = [i for i in range(len(pieces)) if scores[i] != 0.0]
    assert len(merged) > 50
    assert sorted(merged, key=lambda i: -scores[i]) == sorted(merged, key=lambda i: (-sp.get_score(i), i))
    assert _field(reader, "tokenizer.ggml.add_space_prefix") is True
    assert _field(reader, "tokenizer.ggml.unknown_token_id") == sp.unk_id()
    assert (_field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")) == (
        sp.bos_id(),
        sp.eos_id(),
    )
    _, their_tokenizer = _transformers_from_gguf(out)
    for text in (TEXT, 'Tom said: "Let\'s go!" 123 émoji 🙂'):  # no runs of spaces: llama.cpp keeps them
        assert their_tokenizer(text)["input_ids"] == [sp.bos_id(), *sp.encode(text)], text


def test_stories260k_reads_back_with_the_same_logits(tmp_path: Path) -> None:
    from flashlm.interop.llama2c import import_llama2c

    folder = real_data("llama2c-stories260K")
    model_dir = import_llama2c(folder / "stories260K.bin", folder / "tok512.model", tmp_path / "stories")
    out = _export(model_dir, tmp_path / "stories.gguf", "f32")
    model, tokenizer = FlashLM.from_pretrained(model_dir), Tokenizer.load(model_dir)
    theirs, their_tokenizer = _transformers_from_gguf(out)
    ids = tokenizer.encode(TEXT, add_bos=True)
    assert their_tokenizer(TEXT)["input_ids"] == ids
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(torch.tensor([ids])).logits, model(torch.tensor([ids])).logits, atol=1e-4, rtol=0
        )


# ---- what llama.cpp cannot run, and bad input: one line, nothing written -------------------------------
@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (replace(GEMMA, layer_pattern="LG"), "five local then one global"),
        (replace(GEMMA, rope_base_local=1_000.0), "RoPE base to 10000"),
        (replace(GEMMA, query_pre_attn_scalar=64), "scales scores by 256"),
        (replace(GEMMA, attn_softcap=50.0), "attention soft-capping"),
        (replace(LLAMA, qk_norm=True), "no QK-norm"),
        (replace(LLAMA, final_softcap=30.0), "soft-capping"),
    ],
    ids=["pattern", "local-rope", "scale", "attn-softcap", "qk-norm", "llama-softcap"],
)
def test_refuses_what_llama_cpp_would_run_differently(cfg, match, trained_tokenizer, tmp_path: Path) -> None:
    model_dir = _save(_model(cfg), trained_tokenizer, tmp_path / "model")
    result = CliRunner().invoke(app, ["export", "gguf", str(model_dir), "--out", str(tmp_path / "m.gguf")])
    assert isinstance(result.exception, FlashLMError) and re.search(match, str(result.exception))
    assert "\n" not in str(result.exception) and not list(tmp_path.glob("*.gguf*"))


def test_refuses_other_tokenizer_kinds(tmp_path: Path) -> None:
    import tokenizers

    from flashlm.interop.gguf import export_gguf

    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, "cat": 3}
    word_level = Tokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>")))
    with pytest.raises(FlashLMError, match="only BPE tokenizers") as info:
        export_gguf(_model(LLAMA), tmp_path / "m.gguf", word_level)
    assert "\n" not in str(info.value) and not list(tmp_path.iterdir())


def test_all_global_gemma_has_no_window(trained_tokenizer, tmp_path: Path) -> None:
    model_dir = _save(_model(replace(GEMMA, layer_pattern="G")), trained_tokenizer, tmp_path / "model")
    reader = gguf.GGUFReader(_export(model_dir, tmp_path / "model.gguf"))
    assert "gemma3.attention.sliding_window" not in reader.fields


def test_bad_input_is_one_line(trained_tokenizer, tmp_path: Path) -> None:
    model = _model(LLAMA)
    with_tok = _save(model, trained_tokenizer, tmp_path / "model")
    no_tok = tmp_path / "bare"
    model.save_pretrained(no_tok)
    (tmp_path / "a_dir.gguf").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    cases = [
        ([str(with_tok), "--out", str(tmp_path / "m.gguf"), "--dtype", "q4_0"], "--dtype must be one of"),
        ([str(with_tok), "--out", str(tmp_path / "a_dir.gguf")], "is a directory"),
        ([str(with_tok), "--out", str(tmp_path / "m.bin")], "must end in .gguf"),
        ([str(no_tok), "--out", str(tmp_path / "m.gguf")], "needs the tokenizer"),
        ([str(tmp_path / "missing"), "--out", str(tmp_path / "m.gguf")], "no config.json"),
        ([str(with_tok), "--out", str(tmp_path / "a_file" / "m.gguf")], "cannot write"),
    ]
    for args, match in cases:
        result = CliRunner().invoke(app, ["export", "gguf", *args])
        assert isinstance(result.exception, FlashLMError), (args, result.output)
        assert match in str(result.exception) and "\n" not in str(result.exception), args
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "m.bin").exists()
    # through the real entry point: one line on stderr, exit code 2
    proc = subprocess.run(
        [sys.executable, "-m", "flashlm", "export", "gguf", str(no_tok), "--out", str(tmp_path / "m.gguf")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_run_folders_and_latest_are_accepted(trained_tokenizer, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "x"
    _save(_model(LLAMA), trained_tokenizer, run / "checkpoints" / "step_000001")
    (run / "latest").symlink_to(Path("checkpoints") / "step_000001")
    for source, out in ((run, "a.gguf"), (run / "latest", "b.gguf")):
        reader = gguf.GGUFReader(_export(source, tmp_path / out))
        assert _field(reader, "general.architecture") == "llama"


# ---- the documented commands --------------------------------------------------------------------------
def _doc_commands() -> list[str]:
    """The `flashlm` lines of the llama.cpp section of docs/elsewhere.md (llama-cli is not installed here)."""
    text = (REPO / "docs" / "elsewhere.md").read_text(encoding="utf-8")
    section = text.split("## llama.cpp (GGUF)")[1].split("\n## ")[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.startswith("flashlm ")]


def test_documented_commands_run(trained_tokenizer, tmp_path: Path, monkeypatch) -> None:
    import shlex

    commands = _doc_commands()
    assert commands and all(c.startswith("flashlm export gguf runs/quick/latest") for c in commands)
    monkeypatch.chdir(tmp_path)
    run = Path("runs/quick")
    _save(_model(GEMMA), trained_tokenizer, run / "checkpoints" / "step_000001")
    (run / "latest").symlink_to(Path("checkpoints") / "step_000001")
    for command in commands:
        words = shlex.split(command)
        result = CliRunner().invoke(app, words[1:])
        assert result.exit_code == 0, (command, result.output, result.exception)
        out = Path(words[words.index("--out") + 1])
        assert _field(gguf.GGUFReader(out), "general.architecture") == "gemma3"
