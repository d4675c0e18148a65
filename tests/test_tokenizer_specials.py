"""FlashLM's <bos> convention in tokenizer.json, decoding a continuation after its prompt (SentencePiece-style
Metaspace tokenizers lose a leading space decoded alone), and the one chat template."""

from __future__ import annotations

import json

import pytest
import tokenizers
import torch
from corpora import stories
from tokenizers import decoders, models, pre_tokenizers, trainers

from flashlm.chat import CHAT_STOP, chat_prompt, render_chat
from flashlm.config import get_preset, replace
from flashlm.generation import Sampling, generate, stream
from flashlm.model.transformer import FlashLM
from flashlm.tokenizer import BOS_ID, Tokenizer, add_bos_post_processor


@pytest.fixture(scope="module")
def metaspace() -> Tokenizer:
    """A SentencePiece-style BPE ("▁" marks spaces, the decoder strips the first one), trained here."""
    backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    specials = [tokenizers.AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    backend.train_from_iterator(stories(300), trainer=trainer)
    add_bos_post_processor(backend)
    return Tokenizer(backend)


def test_a_continuation_decoded_alone_loses_its_space_after_its_prompt_it_keeps_it(metaspace):
    prompt, rest = metaspace.encode("The cat sat on the", add_bos=True), metaspace.encode(" ground. She ran.")
    full = metaspace.encode("The cat sat on the ground. She ran.", add_bos=True)
    assert full == prompt + rest  # "▁ground" is one piece after the prompt
    assert metaspace.decode(rest) == "ground. She ran."  # the Metaspace decoder strips the first "▁"
    assert metaspace.decode_continuation(prompt, rest) == " ground. She ran."
    assert metaspace.decode(prompt) + metaspace.decode_continuation(prompt, rest) == metaspace.decode(full)
    assert metaspace.decode_continuation([metaspace.bos_id], metaspace.encode("Once")) == "Once"  # text start
    assert metaspace.decode_continuation([], rest) == "ground. She ran."


def test_byte_level_continuations_decode_as_before(trained_tokenizer):
    prompt, rest = trained_tokenizer.encode("Once upon", add_bos=True), trained_tokenizer.encode(" a time")
    assert trained_tokenizer.decode_continuation(prompt, rest) == trained_tokenizer.decode(rest) == " a time"
    broken = trained_tokenizer.encode("é")  # a multi-byte character cut in two stays as decode gives it
    assert trained_tokenizer.decode_continuation(prompt, broken[:1]) == trained_tokenizer.decode(broken[:1])


def test_generate_and_stream_decode_the_continuation_after_the_prompt(metaspace):
    torch.manual_seed(0)
    model = FlashLM(replace(get_preset("nano"), vocab_size=metaspace.vocab_size)).eval()
    with torch.no_grad():
        model.embed.weight.mul_(4.0)
    prompt = "The cat sat on the"
    text = generate(model, metaspace, prompt, Sampling(max_new_tokens=12, temperature=0))
    ids = metaspace.encode(prompt, add_bos=True)
    new = [t for t in _greedy_ids(model, ids, 12) if t != metaspace.eos_id]
    assert text == metaspace.decode(ids + new)[len(metaspace.decode(ids)) :]
    assert "".join(stream(model, metaspace, prompt, Sampling(max_new_tokens=12, temperature=0))) == text


def _greedy_ids(model: FlashLM, ids: list[int], n: int) -> list[int]:
    from flashlm.generation import generate_tokens

    return [step[0] for step in generate_tokens(model, [ids], Sampling(max_new_tokens=n, temperature=0))]


# ---- <bos> in tokenizer.json ----------------------------------------------------------------------------
def test_trained_tokenizer_json_puts_bos_first_but_encode_decides_itself(trained_tokenizer):
    spec = json.loads(trained_tokenizer.to_str())
    assert spec["post_processor"]["type"] == "TemplateProcessing"
    with_specials = trained_tokenizer.backend.encode("a cat", add_special_tokens=True).ids
    assert with_specials == trained_tokenizer.encode("a cat", add_bos=True) and with_specials[0] == BOS_ID
    assert trained_tokenizer.encode("a cat")[0] != BOS_ID  # encode never runs the post-processor
    flagged = {t["content"] for t in spec["added_tokens"] if t["special"]}
    assert flagged == {"<pad>", "<bos>", "<eos>", "<mask>", "<sep>"}


def test_add_bos_post_processor_keeps_an_existing_one_and_needs_a_bos(trained_tokenizer, metaspace):
    backend = Tokenizer.from_str(trained_tokenizer.to_str()).backend
    assert add_bos_post_processor(backend) is False  # already there
    assert metaspace.backend.encode("hi", add_special_tokens=True).ids[0] == metaspace.bos_id  # "<s>"
    bare = tokenizers.Tokenizer(models.BPE())
    assert add_bos_post_processor(bare) is False and bare.post_processor is None


# ---- the chat template ----------------------------------------------------------------------------------
def test_chat_prompt_is_the_template_rendered_without_bos():
    messages = [
        {"role": "system", "content": " Be kind.\n"},
        {"role": "user", "content": "Hi {{ x }}"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "A story?"},
    ]
    expected = "System: Be kind.\nUser: Hi {{ x }}\nAssistant: Hello.\nUser: A story?\nAssistant:"
    assert chat_prompt(messages) == expected
    assert render_chat(messages, bos_token="<bos>") == "<bos>" + expected
    assert render_chat(messages, add_generation_prompt=False) == expected.removesuffix("\nAssistant:")
    assert CHAT_STOP == "\nUser:"
    with pytest.raises(ValueError, match="chat roles are system, user and assistant, got tool"):
        chat_prompt([{"role": "tool", "content": "x"}])
