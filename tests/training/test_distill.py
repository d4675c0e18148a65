"""Distillation: divergences against direct formulas, top-k form, cache, teachers, extras, student init."""

import json
import math

import numpy as np
import pytest
import torch

from flashlm.config import ModelConfig
from flashlm.data.batches import IGNORE_INDEX, Batch, BatchSlot, TokenStream
from flashlm.errors import ConfigError, FlashLMError
from flashlm.model.transformer import FlashLM
from flashlm.tokenizer import Tokenizer
from flashlm.training import distill as D

NAMES = list(D.DIVERGENCES)
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "dog",
    "ran",
    "past",
    "red",
    "barn",
    "and",
    "old",
    "man",
    "sang",
    "song",
]


# ---- fixtures ------------------------------------------------------------------------------------
def _texts(seed: int, n: int = 300) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=12)) for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(iter(_texts(0)), vocab_size=300, show_progress=False)


@pytest.fixture(scope="module")
def other_tok() -> Tokenizer:
    return Tokenizer.train(iter([t.upper() for t in _texts(1)]), vocab_size=290, show_progress=False)


def tiny_cfg(vocab: int, **changes) -> ModelConfig:
    base = dict(
        vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, layer_pattern="G", max_seq_len=64
    )
    return ModelConfig(**{**base, **changes})


def tiny_model(vocab: int, seed: int = 0, **changes) -> FlashLM:
    torch.manual_seed(seed)
    return FlashLM(tiny_cfg(vocab, **changes)).eval()


def rand(*shape, seed=0, scale=2.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def topk_of(teacher_logits: torch.Tensor, k: int) -> D.TopK:
    logprobs = teacher_logits.log_softmax(-1)
    values, ids = logprobs.topk(k, dim=-1)
    return D.TopK(ids, values)


# ---- divergences against direct formulas ---------------------------------------------------------
def _softmax(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(x / temperature) for x in row]
    return [e / sum(exps) for e in exps]


def _direct(name: str, s_row: list[float], t_row: list[float], temperature: float, beta: float) -> float:
    q, p = _softmax(s_row, temperature), _softmax(t_row, temperature)
    if name == "forward_kl":
        return sum(p[i] * math.log(p[i] / q[i]) for i in range(len(p)))
    if name == "reverse_kl":
        return sum(q[i] * math.log(q[i] / p[i]) for i in range(len(p)))
    if name == "total_variation":
        return 0.5 * sum(abs(p[i] - q[i]) for i in range(len(p)))
    m = [beta * p[i] + (1 - beta) * q[i] for i in range(len(p))]
    kl_pm = sum(p[i] * math.log(p[i] / m[i]) for i in range(len(p)))
    kl_qm = sum(q[i] * math.log(q[i] / m[i]) for i in range(len(p)))
    return beta * kl_pm + (1 - beta) * kl_qm


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_divergence_matches_direct_computation(name, temperature):
    B, T, V, beta = 2, 4, 7, 0.3
    s, t = rand(B, T, V, seed=1), rand(B, T, V, seed=2)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = False
    total, count = 0.0, 0
    for b in range(B):
        for i in range(T):
            if mask[b, i]:
                total += _direct(name, s[b, i].tolist(), t[b, i].tolist(), temperature, beta)
                count += 1
    got = D.divergence(name, s, t, mask, temperature, beta)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(total / count, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_divergence_is_zero_for_identical_distributions(name):
    logits = rand(3, 5, 11, seed=3)
    shifted = logits + 4.0  # same distribution, different logits
    assert D.divergence(name, logits, shifted).item() == pytest.approx(0.0, abs=1e-6)
    assert D.divergence(name, logits, topk_of(logits, 11)).item() == pytest.approx(0.0, abs=1e-6)


def test_public_functions_match_divergence():
    s, t = rand(2, 3, 5, seed=4), rand(2, 3, 5, seed=5)
    assert D.forward_kl(s, t, temperature=2.0) == D.divergence("forward_kl", s, t, temperature=2.0)
    assert D.reverse_kl(s, t) == D.divergence("reverse_kl", s, t)
    assert D.generalized_jsd(s, t, beta=0.2) == D.divergence("generalized_jsd", s, t, beta=0.2)
    assert D.total_variation(s, t) == D.divergence("total_variation", s, t)


def test_forward_kl_gradient_matches_soft_cross_entropy():
    s, t = rand(2, 3, 9, seed=6).float(), rand(2, 3, 9, seed=7).float()
    a = s.clone().requires_grad_(True)
    D.forward_kl(a, t).backward()
    b = s.clone().requires_grad_(True)
    soft_ce = -(t.softmax(-1) * b.log_softmax(-1)).sum(-1).mean()
    soft_ce.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    expected = (s.softmax(-1) - t.softmax(-1)) / 6  # mean over 6 positions
    torch.testing.assert_close(a.grad, expected, rtol=1e-5, atol=1e-7)


def test_padded_teacher_rows_are_sliced_off():
    s, t = rand(2, 3, 8, seed=8), rand(2, 3, 8, seed=9)
    padded = torch.cat([t, torch.full((2, 3, 4), 5.0, dtype=t.dtype)], -1)
    for name in NAMES:
        expected = D.divergence(name, s, t).item()
        assert D.divergence(name, s, padded).item() == pytest.approx(expected, abs=1e-7)


def test_empty_mask_gives_zero_with_a_graph():
    s = rand(1, 3, 5, seed=10).float().requires_grad_(True)
    loss = D.forward_kl(s, rand(1, 3, 5, seed=11), torch.zeros(1, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and s.grad is not None


# ---- top-k --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_k_equal_vocab_equals_full_loss(name, temperature):
    s, t = rand(2, 5, 13, seed=12).float(), rand(2, 5, 13, seed=13).float()
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(0)) > 0.3
    full = D.divergence(name, s, t, mask, temperature, 0.4)
    sparse = D.divergence(name, s, topk_of(t, 13), mask, temperature, 0.4)
    assert sparse.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-6)
    pair = topk_of(t, 13)
    assert D.divergence(name, s, (pair.ids, pair.logprobs), mask, temperature, 0.4).item() == pytest.approx(
        full.item(), rel=1e-5, abs=1e-6
    )


def test_topk_forward_kl_is_the_sparse_kl_over_the_renormalised_teacher():
    s, t, k = rand(1, 1, 10, seed=14), rand(1, 1, 10, seed=15), 4
    pair = topk_of(t, k)
    p = pair.logprobs[0, 0].softmax(-1)  # renormalised over the k ids
    log_q = s[0, 0].log_softmax(-1)[pair.ids[0, 0]]
    expected = sum(p[j] * (math.log(p[j]) - log_q[j]) for j in range(k))
    assert D.forward_kl(s, pair).item() == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_topk_treats_the_missing_mass_as_documented(name):
    """k < V: teacher renormalised over its k ids; the student's mass elsewhere is one extra 'rest' bucket
    (teacher mass 0 there), except reverse KL, which renormalises the student over the k ids."""
    s, t, k, temperature, beta = rand(1, 1, 10, seed=20), rand(1, 1, 10, seed=21), 4, 1.5, 0.3
    pair = topk_of(t, k)
    ids = pair.ids[0, 0].tolist()
    p = _softmax(pair.logprobs[0, 0].tolist(), temperature)
    q_all = _softmax(s[0, 0].tolist(), temperature)
    q = [q_all[i] for i in ids]
    rest = 1 - sum(q)
    if name == "forward_kl":
        expected = sum(p[j] * math.log(p[j] / q[j]) for j in range(k))
    elif name == "reverse_kl":
        qn = [x / sum(q) for x in q]
        expected = sum(qn[j] * math.log(qn[j] / p[j]) for j in range(k))
    elif name == "total_variation":
        expected = 0.5 * (sum(abs(p[j] - q[j]) for j in range(k)) + rest)
    else:
        p_b, q_b = p + [0.0], q + [rest]
        m = [beta * p_b[j] + (1 - beta) * q_b[j] for j in range(k + 1)]
        kl_pm = sum(p_b[j] * math.log(p_b[j] / m[j]) for j in range(k + 1) if p_b[j] > 0)
        kl_qm = sum(q_b[j] * math.log(q_b[j] / m[j]) for j in range(k + 1))
        expected = beta * kl_pm + (1 - beta) * kl_qm
    got = D.divergence(name, s, pair, temperature=temperature, beta=beta).item()
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_topk_divergences_are_finite_and_non_negative(name):
    s, t = rand(3, 4, 20, seed=16), rand(3, 4, 20, seed=17)
    value = D.divergence(name, s, topk_of(t, 5), temperature=1.5).item()
    assert math.isfinite(value) and value >= 0


def test_distillation_loss_combines_ce_and_scaled_divergence():
    cfg = D.DistillConfig(alpha=0.3, temperature=2.0, divergence="jsd", beta=0.25)
    s, t = rand(2, 6, 9, seed=18).float(), rand(2, 6, 9, seed=19).float()
    targets = torch.randint(0, 9, (2, 6), generator=torch.Generator().manual_seed(1))
    targets[0, :2] = IGNORE_INDEX
    loss, metrics = D.distillation_loss(s, t, targets, cfg)
    mask = targets != IGNORE_INDEX
    ce = torch.nn.functional.cross_entropy(s[mask], targets[mask])
    kd = D.generalized_jsd(s, t, mask, 2.0, 0.25)
    assert loss.item() == pytest.approx((0.3 * ce + 0.7 * 4.0 * kd).item(), rel=1e-6)
    assert set(metrics) == {"ce", "kd"} and metrics["kd"].item() == pytest.approx(kd.item())


def test_config_validation():
    assert D.DistillConfig(divergence="tvd").divergence == "total_variation"
    with pytest.raises(ConfigError, match="distill.divergence"):
        D.DistillConfig(divergence="hellinger").validate()
    with pytest.raises(ConfigError, match="distill.beta"):
        D.DistillConfig.from_dict({"beta": 1.0})
    with pytest.raises(ConfigError, match="distill.alpah"):
        D.DistillConfig.from_dict({"alpah": 0.1})
    assert D.DistillConfig.from_dict({"alpha": "0.25"}).alpha == 0.25


# ---- hidden states and attention ------------------------------------------------------------------
def test_hidden_and_attention_losses_zero_for_the_same_model_positive_otherwise(tok):
    teacher_model = tiny_model(tok.vocab_size, seed=0, n_layers=4)
    teacher = D.OnlineTeacher(teacher_model)
    ids = torch.randint(5, tok.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    batch = Batch(ids, torch.roll(ids, -1, 1))
    cfg = D.DistillConfig(hidden_weight=1.0, attention_weight=1.0, hidden_loss="mse", layer_map=[0, 1, 2, 3])
    same = D.DistillObjective(cfg, teacher, teacher_model.cfg)
    _, metrics = same(teacher_model, batch)
    assert metrics["distill_hidden"].item() == pytest.approx(0.0, abs=1e-6)
    assert metrics["distill_attn"].item() == pytest.approx(0.0, abs=1e-6)
    assert metrics["distill_kd"].item() == pytest.approx(0.0, abs=1e-6)

    student = tiny_model(tok.vocab_size, seed=1, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32).train()
    other = D.DistillObjective(D.DistillConfig(hidden_weight=1.0, attention_weight=1.0), teacher, student.cfg)
    assert isinstance(other.hidden.proj, torch.nn.Linear) and other.hidden.layer_map == [1, 3]
    loss, metrics = other(student, batch)
    assert metrics["distill_hidden"] > 0 and metrics["distill_attn"] > 0
    loss.backward()
    assert other.hidden.proj.weight.grad is not None and student.embed.weight.grad is not None
    assert all(p.grad is None for p in teacher_model.parameters())


def test_attention_transfer_averages_heads_when_counts_differ():
    a = torch.rand(1, 2, 3, 3).softmax(-1)
    b = a.mean(1, keepdim=True).expand(1, 4, 3, 3)  # same head-average, other head count
    assert D.attention_transfer(a, b).item() == pytest.approx(0.0, abs=1e-6)
    assert D.attention_transfer(a, a.flip(-1)).item() > 0


def test_layer_map_is_validated():
    with pytest.raises(ConfigError, match="layer_map"):
        D.HiddenStateLoss(8, 8, 2, 4, layer_map=[0, 4])


# ---- teachers and vocabularies ---------------------------------------------------------------------
def test_flashlm_teacher_dir_and_mismatched_tokenizer(tmp_path, tok, other_tok):
    tiny_model(tok.vocab_size).save_pretrained(tmp_path / "t", tok)
    teacher = D.load_teacher(tmp_path / "t", device="cpu", student_tokenizer=tok)
    assert isinstance(teacher, D.OnlineTeacher) and teacher.kind == "flashlm"
    assert teacher.vocab_size == tok.vocab_size
    with pytest.raises(FlashLMError) as err:
        D.load_teacher(tmp_path / "t", device="cpu", student_tokenizer=other_tok)
    message = str(err.value)
    assert "\n" not in message and "different tokenizers" in message and "id " in message


def test_check_vocab_names_the_differing_ids():
    with pytest.raises(FlashLMError, match=r"1 ids differ: id 2: student 'c', teacher 'x'"):
        D.check_vocab({"a": 0, "b": 1, "c": 2}, {"a": 0, "b": 1, "x": 2})


def test_hf_llama_teacher_works(tmp_path, tok):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size + 4,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    assert D.teacher_kind(tmp_path / "hf") == "hf"
    teacher = D.load_teacher(tmp_path / "hf", device="cpu", student_tokenizer=tok, need_attentions=True)
    ids = torch.randint(0, tok.vocab_size, (2, 10))
    out = teacher(ids, return_hidden_states=True, return_attentions=True)
    assert out.logits.shape == (2, 10, tok.vocab_size)  # the 4 padded rows sliced off
    assert len(out.hidden_states) == 3 and out.attentions[-1].shape == (2, 4, 10, 10)
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
    student = tiny_model(tok.vocab_size)
    cfg = D.DistillConfig(hidden_weight=1.0, attention_weight=0.5)
    objective = D.DistillObjective(cfg, teacher, student.cfg)
    loss, metrics = objective(student, Batch(ids, torch.roll(ids, -1, 1)))
    assert torch.isfinite(loss) and metrics["distill_kd"] > 0
    with pytest.raises(FlashLMError, match="causal"):
        teacher(ids, mode="bidirectional")


# ---- the cache ---------------------------------------------------------------------------------------
class _Interrupting:
    """A teacher that raises after `calls` forward passes (a crash mid-run)."""

    def __init__(self, teacher: D.OnlineTeacher, calls: int) -> None:
        self.teacher, self.calls = teacher, calls

    def __getattr__(self, name):
        return getattr(self.teacher, name)

    def __call__(self, *args, **kwargs):
        if self.calls == 0:
            raise KeyboardInterrupt
        self.calls -= 1
        return self.teacher(*args, **kwargs)


def _stream(vocab: int, n: int = 1000) -> np.ndarray:
    return np.random.default_rng(3).integers(0, vocab, size=n).astype(np.uint16)


def test_cache_round_trips(tmp_path, tok):
    model = tiny_model(tok.vocab_size)
    teacher, tokens = D.OnlineTeacher(model, vocab=D.vocab_of(tok)), _stream(tok.vocab_size)
    k, seq_len = 8, 32
    cache = D.build_logit_cache(
        teacher, tokens, tmp_path / "c", top_k=k, seq_len=seq_len, batch_size=4, progress=False, stride=seq_len
    )  # consecutive windows
    assert len(cache) == len(tokens) and cache.bytes_per_token == k * 4 and cache.ids.dtype == np.uint16
    assert cache.meta["tokenizer_fingerprint"] == D.vocab_fingerprint(D.vocab_of(tok))
    with torch.no_grad():
        for w in range(0, len(tokens), seq_len):
            window = torch.from_numpy(tokens[w : w + seq_len].astype(np.int64))[None]
            values, ids = model(window).logits.float().log_softmax(-1).topk(k, dim=-1)
            np.testing.assert_array_equal(cache.ids[w : w + seq_len], ids[0].numpy())
            np.testing.assert_array_equal(cache.logprobs[w : w + seq_len], values[0].half().numpy())
    starts = np.array([0, 5, 31, 1000 - 20])
    ids, logprobs = cache.lookup(starts, 20)
    assert ids.shape == logprobs.shape == (4, 20, k)
    for row, s in enumerate(starts):
        np.testing.assert_array_equal(ids[row], cache.ids[s : s + 20])
        np.testing.assert_array_equal(logprobs[row], cache.logprobs[s : s + 20])
    with pytest.raises(FlashLMError, match="run past"):
        cache.lookup(np.array([990]), 20)


def test_overlapping_cache_windows_give_every_position_its_context(tmp_path, tok):
    model = tiny_model(tok.vocab_size)
    teacher, tokens = D.OnlineTeacher(model), _stream(tok.vocab_size, 203)
    seq_len, stride, k = 32, 8, 5
    cache = D.build_logit_cache(teacher, tokens, tmp_path / "c", top_k=k, seq_len=seq_len, batch_size=3, progress=False)
    assert cache.stride == seq_len // 2 == 16
    cache = D.build_logit_cache(
        teacher, tokens, tmp_path / "s", top_k=k, seq_len=seq_len, batch_size=3, progress=False, stride=stride
    )
    assert cache.stride == stride
    with torch.no_grad():
        for i in (0, 7, 8, 30, 31, 100, 202):  # read by the window ending with i's block: >= 24 tokens before it
            block = i - i % stride
            lo = max(0, block + stride - seq_len)
            window = torch.from_numpy(tokens[lo : min(block + stride, len(tokens))].astype(np.int64))[None]
            values, ids = model(window).logits.float().log_softmax(-1)[0, i - lo].topk(k)
            np.testing.assert_array_equal(cache.ids[i], ids.numpy())
            np.testing.assert_allclose(
                cache.logprobs[i].astype(np.float32), values.half().float().numpy(), rtol=0, atol=1e-3
            )


def test_cache_resume_after_interruption_is_identical(tmp_path, tok):
    teacher, tokens = D.OnlineTeacher(tiny_model(tok.vocab_size)), _stream(tok.vocab_size)
    args = dict(top_k=6, seq_len=16, batch_size=3, progress=False, stride=16)
    D.build_logit_cache(teacher, tokens, tmp_path / "whole", **args)
    with pytest.raises(KeyboardInterrupt):
        D.build_logit_cache(_Interrupting(teacher, 5), tokens, tmp_path / "resumed", **args)
    assert json.loads((tmp_path / "resumed" / D.CACHE_PROGRESS).read_text())["positions"] == 5 * 3 * 16
    with pytest.raises(FlashLMError, match="incomplete"):
        D.LogitCache(tmp_path / "resumed")
    with pytest.raises(FlashLMError, match="other settings"):
        D.build_logit_cache(teacher, tokens, tmp_path / "resumed", **{**args, "top_k": 5})
    counting = _Interrupting(teacher, 10**6)
    D.build_logit_cache(counting, tokens, tmp_path / "resumed", **args)
    assert 10**6 - counting.calls == math.ceil(1000 / 48) - 5  # only the missing chunks ran
    for name in (D.CACHE_IDS, D.CACHE_LOGPROBS):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()


def test_cached_teacher_objective_matches_online_on_aligned_windows(tmp_path, tok):
    from flashlm.data.shards import TokenShards, prepare_shards

    prepare_shards(iter(_texts(2, 200)), tok, tmp_path / "shards", workers=1, progress=False)
    tokens = TokenShards(tmp_path / "shards").tokens
    model = tiny_model(tok.vocab_size)
    model.save_pretrained(tmp_path / "teacher", tok)
    online = D.load_teacher(tmp_path / "teacher", device="cpu", student_tokenizer=tok)
    D.build_logit_cache(
        online, tmp_path / "shards", tmp_path / "cache", top_k=tok.vocab_size, seq_len=16, progress=False, stride=16
    )
    cached = D.load_teacher(tmp_path / "cache", student_tokenizer=tok)
    assert isinstance(cached, D.CachedTeacher)
    student, cfg = tiny_model(tok.vocab_size, seed=5), D.DistillConfig(alpha=0.2, temperature=2.0)
    starts = np.array([0, 16, 48])  # teacher windows: same context as the student's
    windows = np.stack([tokens[s : s + 17] for s in starts]).astype(np.int64)
    batch = Batch(
        torch.from_numpy(windows[:, :-1]), torch.from_numpy(windows[:, 1:]), extras={"starts": torch.from_numpy(starts)}
    )
    loss_cached, m_cached = D.DistillObjective(cfg, cached, student.cfg)(student, batch)
    loss_online, m_online = D.DistillObjective(cfg, online, student.cfg)(student, batch)
    assert loss_cached.item() == pytest.approx(loss_online.item(), rel=1e-3)
    assert m_cached["distill_kd"].item() == pytest.approx(m_online["distill_kd"].item(), rel=1e-2)
    with pytest.raises(FlashLMError, match="starts"):
        D.DistillObjective(cfg, cached, student.cfg)(student, Batch(batch.input_ids, batch.targets))
    with pytest.raises(ConfigError, match="cached teacher"):
        D.DistillObjective(D.DistillConfig(hidden_weight=1.0), cached, student.cfg)


def test_distill_batch_records_starts(tok):
    from flashlm.config import TrainConfig

    tokens = _stream(tok.vocab_size).astype(np.int64)
    slot = BatchSlot(seed=1, step=3, batch_size=4)
    batch = D.distill_batch(TokenStream(tokens), slot, TrainConfig(seq_len=16))
    starts = batch.extras["starts"].numpy()
    for row, s in enumerate(starts):
        np.testing.assert_array_equal(batch.input_ids[row].numpy(), tokens[s : s + 16])
        np.testing.assert_array_equal(batch.targets[row].numpy(), tokens[s + 1 : s + 17])


# ---- student initialisation ---------------------------------------------------------------------------
def test_init_student_from_teacher_takes_every_kth_layer(tok):
    teacher = tiny_model(tok.vocab_size, n_layers=4)
    student = D.init_student_from_teacher(teacher, tiny_cfg(tok.vocab_size, n_layers=2))
    for s_layer, t_layer in ((0, 0), (1, 2)):
        for (name, p), (_, q) in zip(
            student.layers[s_layer].named_parameters(), teacher.layers[t_layer].named_parameters(), strict=True
        ):
            assert torch.equal(p, q), name
    assert torch.equal(student.embed.weight, teacher.embed.weight)
    with pytest.raises(ConfigError, match="d_model 16 vs 32"):
        D.init_student_from_teacher(teacher, tiny_cfg(tok.vocab_size, d_model=16, n_heads=2, n_kv_heads=1))
