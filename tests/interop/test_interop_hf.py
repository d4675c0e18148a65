"""FlashLM ⇄ transformers: the same weights give the same logits in Gemma3ForCausalLM / LlamaForCausalLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flashlm.config import ModelConfig, replace
from flashlm.errors import CheckpointError, FlashLMError
from flashlm.model.transformer import FlashLM

transformers = pytest.importorskip("transformers")

from flashlm.interop.hf import (  # noqa: E402
    export_hf,
    from_hf_state_dict,
    import_hf,
    to_hf_config,
    to_hf_model,
    to_hf_state_dict,
)

GEMMA = ModelConfig(
    vocab_size=101,
    d_model=48,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    d_ff=80,
    flavour="gemma",
    layer_pattern="LLG",
    sliding_window=6,
    max_seq_len=64,
    query_pre_attn_scalar=16,
    final_softcap=12.0,
    rope_base_local=1_000.0,
    rope_base_global=50_000.0,
)
LLAMA = ModelConfig(
    vocab_size=101,
    d_model=48,
    n_layers=3,
    n_heads=4,
    n_kv_heads=2,
    d_ff=80,
    flavour="llama",
    layer_pattern="G",
    tie_embeddings=False,
    max_seq_len=64,
    norm_eps=1e-5,
    rope_base_local=500.0,
    rope_base_global=500.0,
)
SEQ = 24  # longer than GEMMA's window, so the window matters


def _model(cfg: ModelConfig, seed: int = 0) -> FlashLM:
    """A random model whose norm weights are moved away from their initial values."""
    torch.manual_seed(seed)
    model = FlashLM(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.3)
            elif name.endswith("proj.weight"):
                param.mul_(5.0)  # make attention sharp enough that masks and positions matter
    return model


def _ids(cfg: ModelConfig, batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("cfg", [GEMMA, LLAMA], ids=["gemma3", "llama"])
def test_same_logits_as_transformers(cfg: ModelConfig) -> None:
    model = _model(cfg)
    hf_model = to_hf_model(model, attn_implementation="eager")
    expected_cls = transformers.Gemma3ForCausalLM if cfg.flavour == "gemma" else transformers.LlamaForCausalLM
    assert isinstance(hf_model, expected_cls)
    ids = _ids(cfg)
    with torch.no_grad():
        ours = model(ids, mode="causal").logits
        theirs = hf_model(input_ids=ids).logits
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_sliding_window_is_exercised() -> None:
    """Sanity: with a wider window the logits change, so the comparison above checks the window."""
    model = _model(GEMMA)
    wide = FlashLM(replace(GEMMA, sliding_window=SEQ)).eval()
    wide.load_state_dict(model.state_dict())
    ids = _ids(GEMMA)
    with torch.no_grad():
        assert (model(ids).logits - wide(ids).logits).abs().max() > 1e-3


def test_hf_config_fields() -> None:
    hf_cfg = to_hf_config(GEMMA)
    assert hf_cfg.model_type == "gemma3_text"
    assert list(hf_cfg.layer_types) == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    assert hf_cfg.sliding_window == 6 and hf_cfg.query_pre_attn_scalar == 16
    assert hf_cfg.num_key_value_heads == 2 and hf_cfg.head_dim == 12
    assert hf_cfg.final_logit_softcapping == 12.0 and hf_cfg.tie_word_embeddings
    llama = to_hf_config(LLAMA)
    assert llama.model_type == "llama" and not llama.tie_word_embeddings


@pytest.mark.parametrize("cfg", [GEMMA, LLAMA], ids=["gemma3", "llama"])
def test_state_dict_round_trip(cfg: ModelConfig) -> None:
    model = _model(cfg)
    back = from_hf_state_dict(to_hf_config(cfg), to_hf_state_dict(model))
    assert back.cfg == cfg
    theirs = back.state_dict()
    assert set(theirs) == set(model.state_dict())  # the base model travels whole; it has no NSP head
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("cfg", [GEMMA, LLAMA], ids=["gemma3", "llama"])
def test_export_import_round_trip(cfg: ModelConfig, tmp_path: Path) -> None:
    model = _model(cfg)
    out = export_hf(model, tmp_path / "hf")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    loaded_hf = transformers.AutoModelForCausalLM.from_pretrained(
        out, local_files_only=True, attn_implementation="eager"
    )
    back = import_hf(out)
    assert back.cfg == cfg
    ids = _ids(cfg)
    with torch.no_grad():
        ours = model(ids).logits
        assert torch.equal(back(ids).logits, ours)
        torch.testing.assert_close(loaded_hf(input_ids=ids).logits, ours, atol=1e-4, rtol=0)


def test_export_copies_tokenizer(tmp_path: Path) -> None:
    from flashlm.tokenizer import Tokenizer

    words = ["the cat sat on the mat", "a dog ran in the park", "once upon a time"] * 50
    tok = Tokenizer.train(iter(words), vocab_size=300, show_progress=False)
    cfg = replace(GEMMA, vocab_size=tok.vocab_size)
    out = export_hf(_model(cfg), tmp_path / "hf", tokenizer=tok)
    assert Tokenizer.load(out).encode("the cat") == tok.encode("the cat")
    assert json.loads((out / "config.json").read_text())["bos_token_id"] == tok.bos_id
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tok("the cat", add_special_tokens=False)["input_ids"] == tok.encode("the cat")


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(FlashLMError, match="sliding-window"):
        to_hf_config(replace(LLAMA, layer_pattern="LG", sliding_window=8))
    with pytest.raises(FlashLMError, match="QK-norm"):
        to_hf_config(replace(GEMMA, qk_norm=False))
    with pytest.raises(FlashLMError, match="soft-capping"):
        to_hf_config(replace(GEMMA, attn_softcap=50.0))
    with pytest.raises(FlashLMError, match="no config.json"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(FlashLMError, match="model type 'gpt2'"):
        import_hf(tmp_path)


def test_cli_export_import(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flashlm.cli import app

    model = _model(GEMMA)
    model.save_pretrained(tmp_path / "ours")
    (tmp_path / "ours" / "tokenizer.json").write_text('{"not": "checked here"}')
    runner = CliRunner()
    result = runner.invoke(app, ["export", "hf", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")])
    assert isinstance(result.exception, FlashLMError)  # an unreadable tokenizer.json is refused
    assert not (tmp_path / "hf").exists()
    (tmp_path / "ours" / "tokenizer.json").unlink()
    result = runner.invoke(app, ["export", "hf", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    back = FlashLM.from_pretrained(tmp_path / "back")
    ids = _ids(GEMMA)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_a_damaged_transformers_checkpoint_is_one_error(tmp_path: Path) -> None:
    """A config with a wrong type or a truncated weights file: one FlashLMError naming the folder."""
    from flashlm.interop.hf import export_hf

    out = export_hf(_model(LLAMA), tmp_path / "hf")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cannot load the weights"):
        import_hf(out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}))
    with pytest.raises(FlashLMError, match="unreadable transformers config"):
        import_hf(out)
