"""The fast decode step (`flashlm.model.decoding`): the same logits and tokens as `FlashLM.forward`."""

import pytest
import torch
from corpora import stories
from typer.testing import CliRunner

import flashlm.model.decoding as decoding
from flashlm.config import get_preset, replace
from flashlm.generation import Sampling, generate_tokens
from flashlm.model.cache import KVCache
from flashlm.model.decoding import DecodeStep
from flashlm.model.transformer import FlashLM
from flashlm.tokenizer import Tokenizer

FLAVOURS = ["gemma", "llama"]
# prompts of different lengths (left-padded together) and a window shorter than prompt + continuation
PROMPTS = [[1, 9], [1, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39], [1, 200, 201, 7]]


def make_model(flavour: str, **changes) -> FlashLM:
    """A random nano model whose greedy text varies (a random model tends to repeat one token)."""
    pattern, std = ("LG", 0.02) if flavour == "gemma" else ("G", 0.3)
    cfg = replace(
        get_preset("nano"), flavour=flavour, qk_norm=flavour == "gemma", layer_pattern=pattern, init_std=std, **changes
    )
    torch.manual_seed(0)
    model = FlashLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # move norms away from their init so every weight matters
                p.add_(0.1 * torch.randn_like(p))
    return model


def tokens(model, prompts, decoder, **sampling) -> list[list[int]]:
    rows: list[list[int]] = [[] for _ in prompts]
    s = Sampling(**{"max_new_tokens": 40, "temperature": 0.0, **sampling})
    for step in generate_tokens(model, prompts, s, decoder=decoder):
        for row, token in zip(rows, step, strict=True):
            row.append(token)
    return rows


def reference_step_logits(model, batch, pad, steps, lookahead=0):
    """Logits of `steps` single-token decode steps by `FlashLM.forward` and by `DecodeStep`."""
    caches = [KVCache(model.cfg, batch.shape[0], 64, pad_left=pad, lookahead=lookahead) for _ in range(2)]
    with torch.no_grad():
        first = [model(batch, cache=c).logits[:, -1] for c in caches]
        step = DecodeStep(model, caches[1])
        token = first[0].argmax(-1)
        ours, theirs = [], []
        for _ in range(steps):
            theirs.append(model(token[:, None], cache=caches[0]).logits[:, -1])
            ours.append(step(token))
            token = theirs[-1].argmax(-1)
    return torch.stack(ours, 1), torch.stack(theirs, 1), caches


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_step_logits_equal_the_forward_pass_with_padding_and_a_wrapping_ring(flavour):
    model = make_model(flavour, sliding_window=8)
    batch = torch.tensor([[0, 0, 0, 1, 5, 6], [1, 7, 8, 9, 10, 11]])
    ours, theirs, caches = reference_step_logits(model, batch, torch.tensor([3, 0]), steps=30)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert caches[0].seen == caches[1].seen == 36
    for a, b in zip(caches[0].slots, caches[1].slots, strict=True):
        assert torch.equal(a, b)


def test_step_logits_equal_the_forward_pass_with_soft_caps_and_grouped_query_attention():
    model = make_model("gemma", sliding_window=8, attn_softcap=5.0, final_softcap=3.0)  # nano: 4 heads, 2 KV
    batch = torch.tensor([[0, 1, 5, 6], [1, 7, 8, 9]])
    ours, theirs, _ = reference_step_logits(model, batch, torch.tensor([1, 0]), steps=16)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_step_follows_a_cache_cut_back_with_spare_ring_entries():
    """After `KVCache.truncate` (speculative decoding) the step sees exactly the keys the forward pass sees."""
    model = make_model("gemma", sliding_window=8)
    batch = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 12, 13]])
    ours, theirs, caches = reference_step_logits(model, batch, None, steps=12, lookahead=3)
    for cache in caches:
        cache.truncate(cache.seen - 3)
    token = torch.tensor([42])
    with torch.no_grad():
        expected = model(token[:, None], cache=caches[0]).logits[:, -1]
        got = DecodeStep(model, caches[1])(token)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("prompts", [PROMPTS[1:2], PROMPTS], ids=["batch1", "left-padded-batch"])
def test_fast_decoder_gives_the_reference_tokens(flavour, prompts):
    model = make_model(flavour, sliding_window=8)
    reference = tokens(model, prompts, "reference")
    assert tokens(model, prompts, "fast") == reference
    assert all(len(set(row)) > 3 for row in reference)  # the check compares varied text


def test_fast_decoder_gives_the_reference_tokens_in_prefix_mode_and_with_repetition_penalty():
    model = make_model("gemma", sliding_window=8)
    for kw in ({"prefix_lm": True}, {"repetition_penalty": 1.3}):
        assert tokens(model, PROMPTS, "fast", **kw) == tokens(model, PROMPTS, "reference", **kw)


def test_unfused_weights_give_the_same_logits(monkeypatch):
    model = make_model("gemma", sliding_window=8)
    batch = torch.tensor([[1, 5, 6, 7], [0, 1, 8, 9]])
    fused, reference, _ = reference_step_logits(model, batch, torch.tensor([0, 1]), steps=10)
    monkeypatch.setattr(decoding, "FUSE_LIMIT_BYTES", 0)
    decoding._PREPARED.clear()
    unfused, _, _ = reference_step_logits(model, batch, torch.tensor([0, 1]), steps=10)
    assert isinstance(decoding.prepared_weights(model)["layers"][0]["qkv"], tuple)
    torch.testing.assert_close(unfused, reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)


def test_prepared_weights_follow_in_place_weight_updates():
    model = make_model("llama")
    before = decoding.prepared_weights(model)
    assert decoding.prepared_weights(model) is before  # reused while the weights are unchanged
    with torch.no_grad():
        model.layers[0].attn.q_proj.weight.mul_(2.0)
    after = decoding.prepared_weights(model)
    assert after is not before
    batch = torch.tensor([[1, 5, 6, 7]])
    ours, theirs, _ = reference_step_logits(model, batch, None, steps=5)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_unknown_decoder_is_refused():
    with pytest.raises(ValueError, match="decoder must be one of"):
        tokens(make_model("llama"), PROMPTS, "turbo")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_compiled_decoder_gives_the_reference_tokens(flavour):
    """One compile per flavour (a few seconds each): left-padded prompts, a ring shorter than the text;
    gemma with soft-capped attention and logits."""
    caps = {"attn_softcap": 50.0, "final_softcap": 30.0} if flavour == "gemma" else {}
    model = make_model(flavour, sliding_window=8, max_seq_len=64, **caps)
    reference = tokens(model, PROMPTS, "reference")
    assert tokens(model, PROMPTS, "compiled") == reference
    # a second generation with other prompt lengths reuses the graph: still the reference tokens
    others = [[1, 2, 3], [1, 4], [1, 5, 6, 7, 8]]
    assert tokens(model, others, "compiled") == tokens(model, others, "reference")
    if flavour == "llama":
        # the CPU graph holds the weights as constants: changed weights must give a new graph, not stale logits
        frozen = decoding.compiled_step(model)
        with torch.no_grad():
            model.layers[0].mlp.down_proj.weight.mul_(-3.0)
        assert decoding.compiled_step(model) is not frozen
        assert tokens(model, PROMPTS, "compiled") == tokens(model, PROMPTS, "reference") != reference


def test_generate_cli_compile_prints_the_eager_text(tmp_path):
    """`flashlm generate --compile` reaches the compiled step and prints what the eager step prints."""
    from flashlm import cli

    tokenizer = Tokenizer.train(iter(stories(200)), 512, show_progress=False)
    model_dir = make_model("llama", max_seq_len=64).save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    args = ["generate", str(model_dir), "-p", "Once upon a time", "--temperature", "0", "--max-new-tokens", "20"]
    eager, compiled = CliRunner().invoke(cli.app, args), CliRunner().invoke(cli.app, [*args, "--compile"])
    assert eager.exit_code == 0 and compiled.exit_code == 0, compiled.output
    assert compiled.stdout == eager.stdout and len(eager.stdout) > len("Once upon a time")
    assert "compiling the decode step" in compiled.stderr
