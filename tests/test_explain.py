"""Attention maps, token saliency, their plots and the `flashlm explain` verb (tiny model, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from corpora import stories
from typer.testing import CliRunner

from flashlm import cli
from flashlm.config import get_preset, replace
from flashlm.errors import FlashLMError
from flashlm.explain import attention_maps, explain, saliency, save_explanation, select_attention
from flashlm.model.transformer import FlashLM
from flashlm.tokenizer import Tokenizer

TEXT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun."
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(iter(stories(300)), 512, show_progress=False)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)  # a local window of 8 so that TEXT (> 8 tokens) shows the band
    return FlashLM(replace(get_preset("nano"), sliding_window=8)).eval()


def test_attention_rows_are_distributions_and_causal(model, tokenizer):
    att = attention_maps(model, tokenizer, TEXT)
    T = len(tokenizer.encode(TEXT, add_bos=True))
    assert T > 8 and att.ids[0] == tokenizer.bos_id and att.tokens[0] == "<bos>" and len(att.tokens) == T
    assert att.weights.shape == (model.cfg.n_layers, model.cfg.n_heads, T, T)
    assert torch.allclose(att.weights.sum(-1), torch.ones(T), atol=1e-5)
    assert torch.all(att.weights.triu(diagonal=1) == 0)  # no query looks at a later token
    for layer, kind in enumerate(att.layer_types):
        far = torch.ones(T, T, dtype=torch.bool).tril(diagonal=-8)  # keys 8 or more tokens back
        outside = att.weights[layer][:, far]
        assert torch.all(outside == 0) if kind == "local" else torch.any(outside > 0)


def test_select_attention_picks_or_averages(model, tokenizer):
    w = attention_maps(model, tokenizer, TEXT).weights
    assert torch.equal(select_attention(w, 1, 2), w[1, 2])
    assert torch.allclose(select_attention(w, 0), w[0].mean(0))
    assert torch.allclose(select_attention(w, None, 3), w[:, 3].mean(0))
    average = select_attention(w)
    assert torch.allclose(average, w.mean((0, 1))) and torch.allclose(average.sum(-1), torch.ones(len(w[0, 0])))
    with pytest.raises(FlashLMError, match="layer 2 is out of range"):
        select_attention(w, 2)
    with pytest.raises(FlashLMError, match="head 9"):
        select_attention(w, 0, 9)


def test_saliency_scores_every_token_for_the_predicted_or_given_target(model, tokenizer):
    ids = tokenizer.encode(TEXT, add_bos=True)
    predicted = saliency(model, tokenizer, TEXT)
    assert predicted.ids == ids and predicted.scores.shape == (len(ids),)
    assert torch.isfinite(predicted.scores).all() and (predicted.scores >= 0).all() and predicted.scores.sum() > 0
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    assert predicted.target_id == int(logits.argmax())
    assert predicted.probability == pytest.approx(float(logits.softmax(-1).max()), rel=1e-4)

    given = saliency(model, tokenizer, TEXT, target=" the")
    assert given.target_id == tokenizer.encode(" the")[0] and given.target == tokenizer.decode([given.target_id])
    assert not torch.allclose(given.scores, predicted.scores)
    assert saliency(model, tokenizer, TEXT, target=given.target_id).scores.allclose(given.scores)
    assert not any(p.grad is not None for p in model.parameters())  # no gradients left behind
    with pytest.raises(FlashLMError, match="outside the vocabulary"):
        saliency(model, tokenizer, TEXT, target=10_000)


def test_saliency_is_gradient_times_input(model, tokenizer):
    """The score of a token is the norm of d log p / d e ⊙ e, checked against an explicit computation."""
    ids = tokenizer.encode("The cat sat", add_bos=True)
    result = saliency(model, tokenizer, "The cat sat", target=5)
    emb = model.embed(torch.tensor([ids])).detach().requires_grad_(True)
    hooked = model.embed.register_forward_hook(lambda m, i, o: emb)
    try:
        logp = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)[5]
    finally:
        hooked.remove()
    (grad,) = torch.autograd.grad(logp, emb)
    assert torch.allclose(result.scores, (grad * emb)[0].norm(dim=-1).detach(), atol=1e-6)


def test_explain_json_for_the_api(model, tokenizer):
    result = explain(model, tokenizer, TEXT, layer=0, head=1, max_tokens=10)
    assert len(result["tokens"]) == 10  # the last 10 tokens
    assert len(result["attention"]) == 10 and all(len(row) == 10 for row in result["attention"])
    assert len(result["saliency"]["scores"]) == 10
    json.dumps(result)


def test_save_explanation_writes_pngs_and_json(model, tokenizer, tmp_path):
    paths = save_explanation(model, tokenizer, TEXT, tmp_path / "out", layer=1)
    for key in ("attention", "attention_grid", "saliency"):
        assert paths[key].read_bytes()[:8] == PNG
    data = json.loads(paths["json"].read_text())
    T = len(data["tokens"])
    assert len(data["saliency"]["scores"]) == T and data["layer"] == 1 and data["head"] is None
    assert torch.tensor(data["attention_all"]).shape == (model.cfg.n_layers, model.cfg.n_heads, T, T)


def test_explain_cli(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    out = tmp_path / "explained"
    result = CliRunner().invoke(
        cli.app,
        [
            "explain",
            str(tmp_path / "m"),
            "The cat sat on the mat.",
            "--layer",
            "0",
            "--head",
            "1",
            "--target",
            " and",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "attention.png",
        "attention_grid.png",
        "explain.json",
        "saliency.png",
    ]
    data = json.loads((out / "explain.json").read_text())
    assert data["saliency"]["target_id"] == tokenizer.encode(" and")[0]
