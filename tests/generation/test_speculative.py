"""Speculative decoding: greedy output equals the target's, sampling keeps the target's distribution,
caches roll back exactly (ring buffers included), and a mismatched draft is refused."""

from __future__ import annotations

import pytest
import torch

from flashlm.config import get_preset, replace
from flashlm.errors import CheckpointError, ConfigError
from flashlm.generation import Sampling, generate_tokens
from flashlm.model.cache import KVCache
from flashlm.model.chunk_step import ChunkStep
from flashlm.speculative import (
    SpeculativeStats,
    _accept_sampled,
    check_draft,
    speculative_generate,
    speculative_stream,
    speculative_tokens,
)


def tiny(seed: int, pattern="LLG", window=6, vocab=512, max_seq_len=128, sharpen=4.0, d_model=64):
    torch.manual_seed(seed)
    cfg = replace(
        get_preset("nano"),
        vocab_size=vocab,
        d_model=d_model,
        n_layers=len(pattern),
        layer_pattern=pattern,
        sliding_window=window,
        max_seq_len=max_seq_len,
    )
    from flashlm.model.transformer import FlashLM

    m = FlashLM(cfg).eval()
    with torch.no_grad():  # sharpen the random model so greedy paths are not near-ties
        m.embed.weight.mul_(sharpen)
    return m


def tokens(steps) -> list[int]:
    return [step[0] for step in steps]


TARGET = tiny(0)
DRAFT = tiny(1, pattern="LG")


@pytest.mark.parametrize("lookahead", [1, 3, 5])
@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_greedy_output_is_the_targets_past_the_window(lookahead, repetition_penalty):
    sampling = Sampling(max_new_tokens=40, temperature=0, repetition_penalty=repetition_penalty)
    prompt = [1, 17, 99, 250, 3, 42]  # 46 tokens in all: far past the window of 6
    alone = tokens(generate_tokens(TARGET, [prompt], sampling))
    stats = SpeculativeStats()
    fast = tokens(speculative_tokens(TARGET, DRAFT, prompt, sampling, lookahead=lookahead, stats=stats))
    assert fast == alone and len(fast) == 40
    assert stats.rounds < 40 or lookahead == 1  # some proposals were kept, some rejected
    assert stats.proposed > 0 and stats.accepted < stats.proposed


def test_greedy_output_is_the_targets_with_the_reference_decoder():
    sampling = Sampling(max_new_tokens=30, temperature=0)
    prompt = [1, 17, 99, 250]
    alone = tokens(generate_tokens(TARGET, [prompt], sampling, decoder="reference"))
    assert tokens(speculative_tokens(TARGET, DRAFT, prompt, sampling, lookahead=3, decoder="reference")) == alone


@pytest.mark.parametrize("flavour", ["gemma", "llama"])
def test_a_chunk_step_gives_the_logits_of_a_forward_pass(flavour):
    torch.manual_seed(0)
    cfg = replace(get_preset("nano"), flavour=flavour, layer_pattern="LLG", n_layers=3, sliding_window=6)
    from flashlm.model.transformer import FlashLM

    model = FlashLM(cfg).eval()
    ids = torch.randint(3, 500, (1, 20))
    with torch.no_grad():
        a, b = KVCache(cfg, 1, 40, lookahead=4), KVCache(cfg, 1, 40, lookahead=4)
        model(ids, cache=a)
        model(ids, cache=b)
        step = ChunkStep(model, b)
        for chunk in (torch.tensor([5, 6, 7, 8, 9]), torch.tensor([10]), torch.tensor([11, 12, 13])):
            expected = model(chunk[None], cache=a).logits[0]
            assert torch.allclose(step(chunk), expected, atol=1e-4)
            assert a.seen == b.seen


def test_the_target_as_its_own_draft_keeps_every_proposal():
    sampling = Sampling(max_new_tokens=30, temperature=0)
    prompt = [1, 5, 6, 7]
    stats = SpeculativeStats()
    fast = tokens(speculative_tokens(TARGET, TARGET, prompt, sampling, lookahead=4, stats=stats))
    assert fast == tokens(generate_tokens(TARGET, [prompt], sampling))
    assert stats.accepted == stats.proposed > 0
    assert stats.rounds == 6  # 5 tokens a round: 4 kept proposals and the target's next token


def test_a_prompt_near_the_context_end_stops_where_plain_generation_does():
    sampling = Sampling(max_new_tokens=50, temperature=0)
    prompt = [1] + [(7 * i) % 500 + 3 for i in range(120)]  # 121 of 128 positions: room for 7 tokens
    alone = tokens(generate_tokens(TARGET, [prompt], sampling))
    fast = tokens(speculative_tokens(TARGET, DRAFT, prompt, sampling, lookahead=4))
    assert fast == alone and len(fast) == 7
    assert tokens(speculative_tokens(TARGET, DRAFT, [1] * 128, sampling)) == []


def test_a_draft_with_a_shorter_context_hands_over_to_the_target():
    sampling = Sampling(max_new_tokens=40, temperature=0)
    short = tiny(1, pattern="LG", max_seq_len=24)
    prompt = [1, 17, 99, 250, 3, 42]
    assert tokens(speculative_tokens(TARGET, short, prompt, sampling)) == tokens(
        generate_tokens(TARGET, [prompt], sampling)
    )


def test_eos_and_the_budget_end_generation_as_they_do_without_a_draft():
    prompt = [1, 17, 99]
    sampling = Sampling(max_new_tokens=30, temperature=0)
    alone = tokens(generate_tokens(TARGET, [prompt], sampling))
    eos = alone[9]  # a token the target produces: generation must stop right after its first use
    expected = tokens(generate_tokens(TARGET, [prompt], sampling, eos_id=eos))
    assert tokens(speculative_tokens(TARGET, DRAFT, prompt, sampling, eos_id=eos)) == expected
    assert expected[-1] == eos and eos not in expected[:-1]
    for budget in (1, 2, 5):
        few = Sampling(max_new_tokens=budget, temperature=0)
        assert tokens(speculative_tokens(TARGET, DRAFT, prompt, few)) == alone[:budget]


def test_prefix_lm_prompts_decode_as_without_a_draft():
    sampling = Sampling(max_new_tokens=20, temperature=0, prefix_lm=True)
    prompt = [1, 30, 31, 32, 33]
    assert tokens(speculative_tokens(TARGET, DRAFT, prompt, sampling)) == tokens(
        generate_tokens(TARGET, [prompt], sampling)
    )


def test_truncating_a_ring_cache_equals_never_writing_the_dropped_tokens():
    model = tiny(0)
    ids = torch.tensor([[1, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]])
    wrong = torch.tensor([[400, 401, 402]])
    with torch.no_grad():
        clean = KVCache(model.cfg, 1, 32, lookahead=3)
        model(ids, cache=clean)
        rolled = KVCache(model.cfg, 1, 32, lookahead=3)
        model(ids, cache=rolled)
        model(wrong, cache=rolled)  # three tokens that are then taken back
        rolled.truncate(ids.shape[1])
        nxt = torch.tensor([[20, 21]])
        a = model(nxt, cache=clean).logits
        b = model(nxt, cache=rolled).logits
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError):
        rolled.truncate(rolled.seen + 1)


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def null_total_variation(exact: torch.Tensor, draws: int, trials: int = 400) -> torch.Tensor:
    """Total variations of `trials` samples of `draws` drawn from `exact` itself: sampling noise alone."""
    generator = torch.Generator().manual_seed(0)
    flat = exact.flatten() / exact.sum()
    found = []
    for _ in range(trials):
        idx = torch.multinomial(flat, draws, replacement=True, generator=generator)
        found.append(total_variation(torch.bincount(idx, minlength=flat.numel()) / draws, flat))
    return torch.tensor(found)


def test_the_accept_rule_draws_every_position_from_the_target():
    """Fixed target rows p and draft rows q (vocabulary 6, three proposals): whenever position i is
    given out, it is distributed as p[i], whether it came from a kept proposal, the residual or the bonus."""
    generator = torch.Generator().manual_seed(3)
    p = torch.rand(4, 6, generator=generator) ** 2
    p[0, 5] = 0.0  # a token the target never picks (a top-k cut) but the draft proposes
    p = p / p.sum(-1, keepdim=True)
    q = torch.rand(3, 6, generator=generator) ** 2
    q = q / q.sum(-1, keepdim=True)
    runs = 4000
    counts = torch.zeros(4, 6)
    for _ in range(runs):
        proposed = torch.stack([torch.multinomial(q[i], 1, generator=generator)[0] for i in range(3)])
        kept, token = _accept_sampled(p, list(q), proposed, generator)
        for i, x in enumerate([*proposed[:kept].tolist(), token]):
            counts[i, x] += 1
    for i in range(4):
        reached = int(counts[i].sum())
        assert total_variation(counts[i] / reached, p[i]) < float(null_total_variation(p[i], reached).max())
    assert counts[0, 5] == 0


def test_sampling_keeps_the_targets_distribution():
    """Vocabulary 8: the first two tokens under speculative sampling follow the target's exact joint
    distribution (by enumeration), though the draft's is far from it."""
    target = tiny(0, pattern="LG", vocab=8, sharpen=6.0, d_model=32)
    draft = tiny(5, pattern="L", vocab=8, sharpen=6.0, d_model=32)
    prompt = [1, 2]
    sampling = Sampling(max_new_tokens=2, temperature=1.0, top_k=6, repetition_penalty=1.2)
    exact = exact_distribution(target, prompt, sampling, 2)
    runs = 1000
    counts = torch.zeros(8, 8)
    stats = SpeculativeStats()
    for seed in range(runs):
        a, b = tokens(speculative_tokens(target, draft, prompt, replace_seed(sampling, seed), lookahead=1, stats=stats))
        counts[a, b] += 1
    assert 0.2 < stats.acceptance_rate < 0.9  # proposals are kept and rejected: every branch runs
    noise = null_total_variation(exact, runs)
    assert total_variation(counts / runs, exact) < float(noise.max())
    draft_alone = exact_distribution(draft, prompt, sampling, 2)
    assert total_variation(draft_alone, exact) > 3 * float(noise.max())  # the test could tell them apart


def replace_seed(sampling: Sampling, seed: int) -> Sampling:
    from dataclasses import replace as dc_replace

    return dc_replace(sampling, seed=seed)


@torch.no_grad()
def exact_distribution(model, prompt, sampling, n):
    """P(first n tokens) [V]*n of plain sampling, by enumerating every prefix (tiny vocabulary)."""
    from flashlm.generation import next_token_scores

    vocab = model.cfg.vocab_size
    out = torch.zeros((vocab,) * n)

    def walk(ids, prob, index):
        if len(ids) == len(prompt) + n:
            out[index] = prob
            return
        history = torch.tensor([ids])
        probs = next_token_scores(model(history).logits[:, -1], history, sampling).softmax(-1)[0]
        for token in range(vocab):
            if probs[token] > 0:
                walk(ids + [token], prob * float(probs[token]), (*index, token))

    walk(list(prompt), 1.0, ())
    return out


def test_a_draft_with_another_vocabulary_or_tokenizer_is_refused():
    other = tiny(1, pattern="LG", vocab=256)
    with pytest.raises(CheckpointError, match="vocabulary"):
        check_draft(TARGET, other)
    with pytest.raises(CheckpointError, match="vocabulary"):
        list(speculative_tokens(TARGET, other, [1, 2], Sampling(max_new_tokens=3)))

    class Fingerprint:
        def __init__(self, value):
            self.fingerprint = value

    with pytest.raises(CheckpointError, match="tokenizer"):
        check_draft(TARGET, DRAFT, Fingerprint("a"), Fingerprint("b"))
    check_draft(TARGET, DRAFT, Fingerprint("a"), Fingerprint("a"))
    with pytest.raises(ConfigError, match="lookahead"):
        list(speculative_tokens(TARGET, DRAFT, [1, 2], Sampling(max_new_tokens=3), lookahead=0))


def test_texts_and_stop_strings_match_plain_generation(trained_tokenizer):
    from flashlm.generation import generate, stream

    tok = trained_tokenizer
    prompts = ["Once upon a time", "The little dog"]
    sampling = Sampling(max_new_tokens=40, temperature=0)
    plain = generate(TARGET, tok, prompts, sampling)
    assert speculative_generate(TARGET, DRAFT, tok, prompts, sampling, lookahead=3) == plain
    stop = plain[0][len(plain[0]) // 2 : len(plain[0]) // 2 + 2]  # two characters from the middle of the text
    cut = Sampling(max_new_tokens=40, temperature=0, stop=(stop,))
    expected = generate(TARGET, tok, prompts[0], cut)
    assert len(expected) < len(plain[0])
    assert "".join(speculative_stream(TARGET, DRAFT, tok, prompts[0], cut)) == expected
    assert "".join(stream(TARGET, tok, prompts[0], cut)) == expected
