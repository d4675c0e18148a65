"""Behaviour of the FlashLM model: attention modes, windows, documents, cache, GQA, presets."""

import pytest
import torch

from flashlm.config import count_parameters, get_preset, replace
from flashlm.errors import CheckpointError, ConfigError
from flashlm.model.cache import KVCache
from flashlm.model.heads import NSP_HEAD_FILE, FlashLMForPretraining, NSPHead, junction_evidence
from flashlm.model.transformer import FlashLM

FLAVOURS = ["gemma", "llama"]


def make_model(flavour="gemma", seed=0, **changes) -> FlashLM:
    cfg = replace(get_preset("nano"), flavour=flavour, qk_norm=flavour == "gemma", **changes)
    torch.manual_seed(seed)
    model = FlashLM(cfg).eval()
    with torch.no_grad():  # move norms away from their init so every weight matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def ids(batch=2, length=40, vocab=512, seed=1):
    return torch.randint(5, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def changed_positions(model, x, mode, at, **kw) -> torch.Tensor:
    """Which output positions change when token `at` changes."""
    y = x.clone()
    y[:, at] = (y[:, at] + 7) % model.cfg.vocab_size
    with torch.no_grad():
        a, b = model(x, mode=mode, **kw).logits, model(y, mode=mode, **kw).logits
    return ((a - b).abs().amax(-1) > 1e-6)[0]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_causal_output_ignores_future_tokens(flavour):
    model, x = make_model(flavour), ids()
    changed = changed_positions(model, x, "causal", at=20)
    assert not changed[:20].any() and changed[20:].all()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_bidirectional_output_sees_future_tokens(flavour):
    model, x = make_model(flavour, layer_pattern="G"), ids()
    assert changed_positions(model, x, "bidirectional", at=30).all()


def test_prefix_mode_is_bidirectional_exactly_inside_prefix():
    model, x = make_model(layer_pattern="G"), ids()
    p = 10
    # a change inside the prefix reaches every position, earlier ones included
    assert changed_positions(model, x, "prefix", at=p - 1, prefix_len=torch.tensor([p, p])).all()
    # a change after the prefix reaches only later positions
    changed = changed_positions(model, x, "prefix", at=p + 5, prefix_len=torch.tensor([p, p]))
    assert not changed[: p + 5].any() and changed[p + 5 :].all()


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_local_layers_see_nothing_beyond_the_window(mode):
    window = 6
    model, x = make_model(layer_pattern="L", n_layers=1, sliding_window=window), ids()
    at = 20
    changed = changed_positions(model, x, mode, at=at)
    reach = torch.arange(x.shape[1])
    inside = (reach - at >= 0) & (reach - at < window)
    if mode == "bidirectional":
        inside = (reach - at).abs() < window
    assert torch.equal(changed, inside)


def test_stacked_local_layers_widen_the_receptive_field():
    window = 5
    model, x = make_model(layer_pattern="L", n_layers=2, sliding_window=window), ids()
    changed = changed_positions(model, x, "causal", at=10)
    reach = torch.arange(x.shape[1]) - 10
    assert torch.equal(changed, (reach >= 0) & (reach < 2 * window - 1))


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_no_attention_across_packed_documents(mode):
    model, x = make_model(layer_pattern="G"), ids(batch=1)
    doc_ids = torch.tensor([[0] * 15 + [1] * 10 + [2] * 15])
    changed = changed_positions(model, x, mode, at=17, doc_ids=doc_ids)
    assert not changed[:15].any() and not changed[25:].any()
    assert changed[17:25].all()
    # a packed document equals that document run alone
    with torch.no_grad():
        packed = model(x, mode=mode, doc_ids=doc_ids).logits[:, 15:25]
        alone = model(x[:, 15:25], mode=mode).logits
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("chunks", [[1] * 60, [7] + [1] * 53, [40, 20], [16, 16, 16, 12]])
def test_kv_cache_decoding_matches_full_forward(flavour, chunks):
    model = make_model(flavour, layer_pattern="LG" if flavour == "gemma" else "G", sliding_window=16)
    x = ids(length=60)  # longer than the window: the ring buffer wraps several times
    cache = KVCache(model.cfg, batch_size=2, max_len=64)
    outs, start = [], 0
    with torch.no_grad():
        full = model(x).logits
        for n in chunks:
            outs.append(model(x[:, start : start + n], cache=cache).logits)
            start += n
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-4, rtol=0)


def test_local_cache_stays_window_sized():
    cfg = replace(get_preset("tiny"), layer_pattern="LLLLLG", sliding_window=128)
    cache = KVCache(cfg, batch_size=1, max_len=8192, device="meta")
    sizes = [k.shape[2] for k in cache.keys]
    assert sizes == [128] * 5 + [8192]


def test_left_padded_rows_match_unpadded_rows():
    model = make_model(layer_pattern="LG", sliding_window=8)
    x = ids(batch=1, length=20)
    pad = 6
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), x], dim=1)
    with torch.no_grad():
        ref = model(x).logits
        cache = KVCache(model.cfg, 1, 32, pad_left=torch.tensor([pad]))
        out = model(padded, cache=cache).logits[:, pad:]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_gqa_with_as_many_kv_heads_equals_multi_head_attention():
    """With n_kv_heads == n_heads grouped-query attention is plain MHA: compare against a direct computation."""
    model = make_model(layer_pattern="G", n_layers=1, n_kv_heads=4)
    attn = model.layers[0].attn
    x = torch.randn(2, 12, model.cfg.d_model)
    cos, sin = (torch.ones(1, 1, 12, attn.head_dim), torch.zeros(1, 1, 12, attn.head_dim))  # no rotation
    with torch.no_grad():
        out, _ = attn(x, cos, sin, "causal")
        mha = torch.nn.MultiheadAttention(model.cfg.d_model, attn.n_heads, bias=False, batch_first=True)
        q = attn.q_norm(attn.q_proj(x).view(2, 12, 4, -1)).reshape(2, 12, -1)
        k = attn.k_norm(attn.k_proj(x).view(2, 12, 4, -1)).reshape(2, 12, -1)
        mha.out_proj.weight.copy_(attn.o_proj.weight)
        mha.in_proj_weight.copy_(torch.eye(model.cfg.d_model).repeat(3, 1))
        scale_fix = (attn.head_dim**0.5) * attn.scale  # MHA scales by head_dim ** -0.5
        causal = torch.ones(12, 12, dtype=torch.bool).triu(1)
        ref, _ = mha(q * scale_fix, k, attn.v_proj(x), attn_mask=causal, need_weights=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_gqa_equals_mha_with_repeated_kv_heads():
    model = make_model(layer_pattern="G", n_kv_heads=2)
    cfg_mha = replace(model.cfg, n_kv_heads=4)
    mha = FlashLM(cfg_mha).eval()
    state = model.state_dict()
    hd = model.cfg.head_dim
    for key, value in list(state.items()):
        if key.endswith(("k_proj.weight", "v_proj.weight")):  # duplicate each KV head for its query group
            state[key] = value.view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(state)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, mha(x).logits, atol=1e-5, rtol=0)


def test_7_5b_preset_builds_on_meta_device_and_counts_7_5b():
    cfg = get_preset("7.5b")
    with torch.device("meta"):
        model = FlashLM(cfg)
    assert all(p.is_meta for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    assert n == count_parameters(cfg)
    assert abs(n - 7.5e9) / 7.5e9 < 0.015


@pytest.mark.parametrize("preset", ["nano", "micro", "tiny", "small", "base"])
def test_parameter_count_matches_modules(preset):
    cfg = get_preset(preset)
    with torch.device("meta"):
        model = FlashLM(cfg)
    assert model.num_parameters() == count_parameters(cfg)
    assert model.num_parameters(include_embedding=False) == count_parameters(cfg, include_embedding=False)


def test_nano_is_well_under_a_million_parameters():
    assert count_parameters(get_preset("nano")) < 500_000


def test_untied_and_softcapped_variants_run():
    model = make_model(tie_embeddings=False, final_softcap=5.0, attn_softcap=20.0)
    with torch.no_grad():
        logits = model(ids()).logits
    assert logits.abs().max() <= 5.0
    assert model.lm_head is not None


def test_dropout_acts_in_training_mode_only():
    plain, dropped = make_model(), make_model(dropout=0.3)  # same seed: the same weights
    x = ids()
    with torch.no_grad():
        assert torch.equal(plain(x).logits, dropped(x).logits)  # eval mode: dropout is off
        dropped.train()
        first, second = dropped(x).logits, dropped(x).logits
    assert not torch.allclose(first, second)  # a fresh mask at every call
    with pytest.raises(ConfigError, match="model.dropout"):
        replace(get_preset("nano"), dropout=1.0)


def test_save_and_load_round_trip(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    loaded = FlashLM.from_pretrained(tmp_path)
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    assert loaded.cfg == model.cfg


def test_damaged_checkpoints_raise_one_clear_error(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged"):
        FlashLM.from_pretrained(tmp_path)
    make_model(d_model=32, n_heads=2, n_kv_heads=1).save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text((tmp_path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="disagree"):
        FlashLM.from_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match="no config.json"):
        FlashLM.from_pretrained(tmp_path / "missing")


def test_base_model_has_no_nsp_parameters():
    model = make_model()
    assert not any("nsp" in name for name, _ in model.named_parameters())
    assert not hasattr(model, "nsp_logits") and not hasattr(model, "nsp_head")


def test_nsp_head_reads_the_first_position():
    model = make_model()
    head = NSPHead.for_model(model)
    out = model(ids(), mode="bidirectional")
    logits = head(model, out.hidden)
    assert logits.shape == (2, 2)
    assert torch.allclose(logits, out.hidden[:, 0] @ head.weight.T + head.bias)
    again = NSPHead.for_model(model.cfg)  # its initial weights depend on the seed alone
    assert torch.equal(again.weight, head.weight) and not torch.equal(NSPHead.for_model(model, 1).weight, head.weight)


def test_a_training_run_s_nsp_head_draws_what_flashlm_drew_for_it():
    """Runs keep their figures: the head starts where it did as FlashLM's last parameter."""
    cfg = get_preset("nano")
    torch.manual_seed(7)
    FlashLM(cfg)
    expected = torch.empty(2, cfg.d_model).normal_(0.0, cfg.init_std)
    state = torch.get_rng_state()
    head = NSPHead.as_drawn_by_flashlm(cfg, 7)
    assert torch.equal(head.weight, expected) and not head.bias.any()
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is left alone


def test_junction_evidence_is_how_much_a_raises_the_first_token_of_b():
    model = make_model()
    pretraining = FlashLMForPretraining(model)
    pairs = ids(3, 30)
    pairs[:, 0], seps = 1, torch.tensor([5, 12, 20])  # <bos> A <sep> B
    pairs[torch.arange(3), seps] = 4
    with torch.no_grad():
        got = junction_evidence(model, pairs, seps)
        out = pretraining(pairs, mode="bidirectional")
        logits = pretraining.nsp_logits(out.hidden, pairs, seps)
        for row, sep in enumerate(seps.tolist()):
            after_a = model(pairs[row : row + 1, :sep]).logits[0, -1].log_softmax(-1)  # alone, causal
            after_bos = model(pairs[row : row + 1, :1]).logits[0, -1].log_softmax(-1)
            first_of_b = pairs[row, sep + 1]
            assert got[row] == pytest.approx(float(after_a[first_of_b] - after_bos[first_of_b]), abs=1e-4)
        plain = pretraining.nsp_head(model, out.hidden)
    assert torch.allclose(logits[:, 0], plain[:, 0]) and torch.allclose(logits[:, 1], plain[:, 1] + got)


def test_an_old_state_dict_with_nsp_keys_loads(tmp_path):
    """Checkpoints from before the NSP head left the base model keep ``nsp_head.*`` in model.safetensors:
    the base model drops them, `FlashLMForPretraining` reads its head from them."""
    from safetensors.torch import save_file

    model = make_model()
    head = {"nsp_head.weight": torch.randn(2, model.cfg.d_model), "nsp_head.bias": torch.tensor([0.5, -0.5])}
    old = {**model.state_dict(), **head}
    fresh = make_model(seed=3)
    fresh.load_state_dict(old)  # strict: the head keys are dropped, not unexpected
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    model.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in old.items()}, str(tmp_path / "model.safetensors"))
    loaded = FlashLM.from_pretrained(tmp_path)
    assert set(loaded.state_dict()) == set(model.state_dict())
    pretraining = FlashLMForPretraining.from_pretrained(tmp_path)
    assert torch.equal(pretraining.nsp_head.weight, head["nsp_head.weight"])
    assert torch.equal(pretraining.nsp_head.bias, head["nsp_head.bias"])
    pretraining.save_pretrained(tmp_path / "new")  # the new layout: the head in its own file
    assert (tmp_path / "new" / NSP_HEAD_FILE).is_file()
    again = FlashLMForPretraining.from_pretrained(tmp_path / "new")
    assert torch.equal(again.nsp_head.weight, head["nsp_head.weight"])
    assert set(FlashLM.from_pretrained(tmp_path / "new").state_dict()) == set(model.state_dict())


def test_activation_checkpointing_gives_the_same_gradients():
    model = make_model().train()
    x = ids()
    model(x).logits.square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    model.gradient_checkpointing = True
    model(x).logits.square().mean().backward()
    got = [p.grad for p in model.parameters() if p.grad is not None]
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_meta_model_materialised_draws_the_same_weights_as_a_direct_build():
    """FSDP2 builds on the meta device and initialises shard by shard; the values must not depend on it."""
    from flashlm.training.loop import materialize_shards

    cfg = get_preset("nano")
    torch.manual_seed(3)
    direct = FlashLM(cfg)
    with torch.device("meta"):
        lazy = FlashLM(cfg)
    assert all(p.is_meta for p in lazy.parameters())
    torch.manual_seed(3)
    materialize_shards(lazy, torch.device("cpu"))
    for (name, a), (_, b) in zip(direct.state_dict().items(), lazy.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
