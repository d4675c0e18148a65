"""Beam search (`flashlm.generation`): against greedy decoding, on constructed cases, constrained."""

from __future__ import annotations

import math

import torch

from flashlm.config import ModelConfig
from flashlm.generation import beam_search, beam_search_core, greedy_decode, sequence_logprob
from flashlm.model.transformer import FlashLM

EOS = 2


def tiny_model(seed: int) -> FlashLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=40,
        d_model=32,
        n_layers=2,
        n_heads=2,
        n_kv_heads=2,
        d_ff=64,
        layer_pattern="LG",
        sliding_window=8,
        max_seq_len=48,
    )
    model = FlashLM(cfg).eval()
    with torch.no_grad():  # sharpen the random model so greedy and beam search can disagree
        model.embed.weight.mul_(8)
    return model


PROMPTS = [[1, 7, 9, 11, 4], [1, 20, 4], [1, 5, 6, 7, 8, 9, 10, 4]]


def test_beam_one_equals_greedy():
    for seed in range(3):
        model = tiny_model(seed)
        assert beam_search(model, PROMPTS, 1, 12, EOS) == greedy_decode(model, PROMPTS, 12, EOS)


def test_beam_never_scores_below_greedy():
    better = 0
    for seed in range(3):
        model = tiny_model(seed)
        beams = beam_search(model, PROMPTS, 4, 10, EOS, length_penalty=0.0)
        for prompt, best, plain in zip(PROMPTS, beams, greedy_decode(model, PROMPTS, 10, EOS), strict=True):
            score = lambda out, p=prompt, m=model: sequence_logprob(m, p, out + ([EOS] if len(out) < 10 else []))
            assert score(best) >= score(plain) - 1e-4
            better += score(best) > score(plain) + 1e-3
    assert better >= 2  # the sharpened random models give beam search something to find


def markov_step(table: dict[int, list[float]], vocab: int):
    """A decoder whose next-token distribution depends only on the last token."""
    state = {"last": None}

    def dist(token: int) -> torch.Tensor:
        probs = torch.full((vocab,), 1e-9)
        for tok, p in enumerate(table.get(token, [])):
            probs[tok] = p
        return probs.log()

    def reorder(rows: torch.Tensor) -> None:
        state["rows"] = rows

    def step(tokens: torch.Tensor) -> torch.Tensor:
        return torch.stack([dist(int(t)) for t in tokens])

    return dist, step, reorder


def test_beam_finds_the_sequence_greedy_misses():
    # tokens: 2 = <eos>, 5 = A, 6 = B; after A everything is spread out, after B <eos> is sure
    vocab = 8
    table = {-1: [0, 0, 0, 0, 0, 0.6, 0.4], 5: [0, 0, 0.2, 0.2, 0.2, 0.2, 0.2], 6: [0, 0, 0.95, 0.05]}
    dist, step, reorder = markov_step(table, vocab)
    first = dist(-1)[None]
    ((greedy_tokens, greedy_logp),) = beam_search_core(first, step, reorder, 1, 5, EOS, length_penalty=0.0)
    ((beam_tokens, beam_logp),) = beam_search_core(first, step, reorder, 2, 5, EOS, length_penalty=0.0)
    assert greedy_tokens[0] == 5 and beam_tokens == [6]
    assert beam_logp == pytest_approx(math.log(0.4 * 0.95))
    assert beam_logp > greedy_logp


def test_short_finished_guesses_do_not_stop_a_likelier_longer_one():
    # beam 2 from 6 (0.5) and 3 (0.3): "3 <eos>" (0.27) and then "6 7 <eos>" (0.135) finish in the top
    # ranks while "6 7 8" (0.315), alive, ends better. Counting `beam` finished hypotheses as the stop
    # returned "3"; with length penalty 0 scores only fall, so the search must run until none alive wins.
    table = {
        -1: [0, 0, 0, 0.3, 0.2, 0, 0.5],
        6: [0, 0, 0.1, 0, 0, 0, 0, 0.9],
        3: [0, 0, 0.9, 0, 0.1],
        7: [0, 0, 0.3, 0, 0, 0, 0, 0, 0.7],
        8: [0, 0, 1.0],
        4: [0, 0, 1.0],
    }
    dist, step, reorder = markov_step(table, 9)
    ((tokens, logp),) = beam_search_core(dist(-1)[None], step, reorder, 2, 5, EOS, 0.0)
    assert tokens == [6, 7, 8] and logp == pytest_approx(math.log(0.5 * 0.9 * 0.7))


def test_allowed_tokens_steer_beam_search():
    # the same Markov decoder; forbidding A (5) as the first token leaves B, and then only <eos>
    table = {-1: [0, 0, 0, 0, 0, 0.6, 0.4], 5: [0, 0, 0.2, 0.2, 0.2, 0.2, 0.2], 6: [0, 0, 0.95, 0.05]}
    dist, step, reorder = markov_step(table, 8)

    def allowed(source: int, history: list[int]) -> list[int] | None:
        assert source == 0
        return [6, 7] if not history else None

    for beam in (1, 3):
        ((tokens, logp),) = beam_search_core(dist(-1)[None], step, reorder, beam, 5, EOS, 0.0, allowed)
        assert tokens == [6] and logp == pytest_approx(math.log(0.4 * 0.95))


def pytest_approx(value: float):
    import pytest

    return pytest.approx(value, abs=1e-4)
