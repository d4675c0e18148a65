"""An exported model in `transformers` behaves as in FlashLM: the same <bos> framing, the same greedy text,
the same chat prompt, the same special tokens; and a SentencePiece continuation keeps its leading space."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from corpora import real_data, stories

from flashlm.chat import chat_prompt
from flashlm.config import get_preset, replace
from flashlm.generation import Sampling, generate, stream
from flashlm.model.transformer import FlashLM
from flashlm.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

from flashlm.interop.hf import export_hf  # noqa: E402

PROMPT = "Once upon a time, there was a little"
NEW_TOKENS = 24
NANO = get_preset("nano")
FLAVOURS = {
    "gemma": NANO,
    "llama": replace(NANO, flavour="llama", layer_pattern="G", qk_norm=False),
}
CHATS = [
    [{"role": "user", "content": "Tell me a story."}],
    [{"role": "system", "content": " Be kind. "}, {"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello.\n"},
        {"role": "user", "content": "A story about a cat?"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(iter(stories(300)), 512, show_progress=False)


def _model(cfg, seed: int = 0) -> FlashLM:
    """Random weights, the embeddings sharpened so that greedy paths are far from ties."""
    torch.manual_seed(seed)
    model = FlashLM(cfg).eval()
    with torch.no_grad():
        model.embed.weight.mul_(4.0)
    return model


@pytest.fixture(scope="module", params=sorted(FLAVOURS))
def exported(request, tokenizer, tmp_path_factory) -> tuple[FlashLM, Path]:
    model = _model(FLAVOURS[request.param])
    return model, export_hf(model, tmp_path_factory.mktemp(f"hf-{request.param}"), tokenizer)


def _pipeline(folder: Path, prompt: str, new_tokens: int, **kwargs) -> dict:
    pipe = transformers.pipeline("text-generation", model=str(folder), device="cpu")
    return pipe(prompt, max_new_tokens=new_tokens, do_sample=False, **kwargs)[0]


def _pipeline_text(folder: Path, prompt: str, new_tokens: int) -> str:
    return _pipeline(folder, prompt, new_tokens, return_full_text=False)["generated_text"]


# ---- <bos> framing and greedy text ---------------------------------------------------------------------
def test_exported_tokenizer_puts_bos_first_as_flashlm_does(exported, tokenizer):
    _, folder = exported
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert theirs("Once upon a time")["input_ids"] == tokenizer.encode("Once upon a time", add_bos=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False  # for tools that read the flag
    assert theirs.decode(theirs("a cat.")["input_ids"], skip_special_tokens=True) == "a cat."


def test_pipeline_greedy_text_equals_flashlm_generate(exported, tokenizer):
    model, folder = exported
    ours = generate(model, tokenizer, PROMPT, Sampling(max_new_tokens=NEW_TOKENS, temperature=0))
    assert len(tokenizer.encode(ours)) >= NEW_TOKENS // 2  # a real continuation, not an immediate <eos>
    assert _pipeline_text(folder, PROMPT, NEW_TOKENS) == ours


def test_shards_frame_documents_with_bos_and_eos(tokenizer, tmp_path):
    from flashlm.data.shards import TokenShards, prepare_shards

    docs = stories(20)
    meta = prepare_shards(iter(docs), tokenizer, tmp_path, val_fraction=0, progress=False)
    shards = TokenShards(tmp_path)
    assert meta["bos_id"] == tokenizer.bos_id and meta["eos_id"] == tokenizer.eos_id
    for i, doc in enumerate(docs):
        assert shards.document(i).tolist() == tokenizer.encode(doc, add_bos=True, add_eos=True)
    assert int((shards.tokens == tokenizer.bos_id).sum()) == int((shards.tokens == tokenizer.eos_id).sum()) == 20


def test_eval_ppl_scores_framed_documents_and_counts_text_bytes_only(tokenizer):
    from flashlm.evaluate.lm import perplexity

    text = stories(1)[0]
    ids = tokenizer.encode(text, add_bos=True, add_eos=True)
    model = _model(replace(NANO, max_seq_len=len(ids)))  # one window holds the whole document
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].float()
    nats = float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
    result = perplexity(model, tokenizer, [text])
    assert result["tokens"] == len(ids) - 1  # every token after <bos>, the closing <eos> included
    assert result["nats"] == pytest.approx(nats, rel=1e-5)
    assert result["bytes"] == len(text.encode("utf-8"))


# ---- tokenizer_config: special tokens and the chat template --------------------------------------------
def test_exported_tokenizer_config_names_every_special_token(exported, tokenizer):
    _, folder = exported
    config = json.loads((folder / "tokenizer_config.json").read_text())
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    roles = {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "mask": "<mask>", "sep": "<sep>"}
    for role, name in roles.items():
        assert config[f"{role}_token"] == name
        assert getattr(theirs, f"{role}_token") == name
        assert getattr(theirs, f"{role}_token_id") == getattr(tokenizer, f"{role}_id")


@pytest.mark.parametrize("messages", CHATS, ids=["user", "system", "multi-turn"])
def test_apply_chat_template_renders_the_server_prompt_with_one_bos(exported, tokenizer, messages):
    from flashlm.serve.engine import Engine

    model, folder = exported
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template starts with bos_token, as Gemma's and Llama's do; the rest is the server's prompt exactly.
    assert text == "<bos>" + chat_prompt(messages)
    server_ids = Engine(model, tokenizer).encode(chat_prompt(messages))
    ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert list(ids["input_ids"]) == server_ids and server_ids.count(tokenizer.bos_id) == 1
    assert theirs(text, add_special_tokens=False)["input_ids"] == server_ids
    assert theirs(chat_prompt(messages))["input_ids"] == server_ids  # the bare prompt: <bos> from add_bos_token
    without = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without + "\nAssistant:" == text


def test_a_bare_fast_tokenizer_on_flashlm_tokenizer_json(tokenizer, tmp_path):
    """What `PreTrainedTokenizerFast(tokenizer_file=...)` finds without a tokenizer_config.json."""
    bare = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer.save(tmp_path)))
    ids = bare("a cat sat.")["input_ids"]
    assert ids == tokenizer.encode("a cat sat.", add_bos=True)  # <bos> from the post-processor
    assert bare.decode([*ids, tokenizer.eos_id], skip_special_tokens=True) == "a cat sat."  # flagged special
    specials = {tok.content for tok in bare.added_tokens_decoder.values() if tok.special}
    assert specials == {"<pad>", "<bos>", "<eos>", "<mask>", "<sep>"}
    # tokenizer.json has no field naming roles: bos_token & co. come from tokenizer_config.json (or kwargs).
    assert bare.bos_token is None and bare.eos_token is None


# ---- imported stories260K (SentencePiece): greedy text and the leading space ----------------------------
STORY_PROMPT = "The cat sat on the"


@pytest.fixture(scope="module")
def stories260k(tmp_path_factory) -> Path:
    from flashlm.interop.llama2c import import_llama2c

    folder = real_data("llama2c-stories260K")
    out = tmp_path_factory.mktemp("stories260K")
    return import_llama2c(folder / "stories260K.bin", folder / "tok512.model", out / "model")


def test_stories260k_tokenizer_puts_bos_first(stories260k):
    ours = Tokenizer.load(stories260k)
    bare = transformers.PreTrainedTokenizerFast(tokenizer_file=str(stories260k / "tokenizer.json"))
    assert bare(STORY_PROMPT)["input_ids"] == ours.encode(STORY_PROMPT, add_bos=True)
    assert ours.bos_id == 1 and ours.encode(STORY_PROMPT, add_bos=True)[0] == 1


def test_stories260k_pipeline_equals_generate_with_the_leading_space(stories260k, tmp_path):
    model, tok = FlashLM.from_pretrained(stories260k).eval(), Tokenizer.load(stories260k)
    sampling = Sampling(max_new_tokens=NEW_TOKENS, temperature=0)
    ours = generate(model, tok, STORY_PROMPT, sampling)
    assert ours.startswith(" ") and not ours.startswith("  ")  # "The cat sat on the ground", not "theground"
    assert "".join(stream(model, tok, STORY_PROMPT, sampling)) == ours
    folder = export_hf(model, tmp_path / "hf", tok)
    # The pipeline's whole greedy sequence, decoded as transformers decodes a sequence, is prompt + ours.
    ids = _pipeline(folder, STORY_PROMPT, NEW_TOKENS, return_tensors=True)["generated_token_ids"]
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert ids[: len(tok.encode(STORY_PROMPT)) + 1] == tok.encode(STORY_PROMPT, add_bos=True)
    assert theirs.decode(ids, skip_special_tokens=True) == STORY_PROMPT + ours
    # transformers' NEW_TEXT decodes the new tokens alone, so its Metaspace decoder drops their first space
    # (its behaviour with any SentencePiece tokenizer, Llama 2's included); the words are the same.
    assert " " + _pipeline_text(folder, STORY_PROMPT, NEW_TOKENS) in (ours, " " + ours)


def test_stories260k_served_completion_keeps_the_leading_space(stories260k):
    from fastapi.testclient import TestClient

    from flashlm.serve.app import create_app
    from flashlm.serve.engine import Engine

    engine = Engine.load(stories260k, precision="fp32")
    expected = generate(engine.model, engine.tokenizer, STORY_PROMPT, Sampling(max_new_tokens=16, temperature=0))
    client = TestClient(create_app(engine))
    body = {"prompt": STORY_PROMPT, "max_tokens": 16, "temperature": 0}
    reply = client.post("/v1/completions", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == expected and expected.startswith(" ")
    streamed = client.post("/v1/completions", json={**body, "stream": True})
    assert streamed.status_code == 200, streamed.text
    events = [line[len("data: ") :] for line in streamed.text.split("\n\n") if line.startswith("data: {")]
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events) == expected


# ---- docs/elsewhere.md ----------------------------------------------------------------------------------
def _docs_block(language: str) -> str:
    text = (Path(__file__).resolve().parents[2] / "docs" / "elsewhere.md").read_text(encoding="utf-8")
    block = text.split("<!-- transformers:begin -->")[1].split("<!-- transformers:end -->")[0]
    return block.split(f"```{language}\n")[1].split("```")[0]


def test_docs_transformers_block(tokenizer, tmp_path, monkeypatch):
    """docs/elsewhere.md's transformers block, as written: the pipeline prints `flashlm generate`'s line and the
    chat template renders <bos> + the server's prompt."""
    import contextlib
    import io
    import shlex

    from typer.testing import CliRunner

    from flashlm.cli import app

    monkeypatch.chdir(tmp_path)
    _model(NANO).save_pretrained(tmp_path / "runs" / "quick" / "latest", tokenizer=tokenizer)
    outputs = []
    for line in _docs_block("bash").splitlines():
        words = shlex.split(line)
        assert words[0] == "flashlm"
        result = CliRunner().invoke(app, words[1:])
        assert result.exit_code == 0, result.output
        outputs.append(result.stdout)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(_docs_block("python"), "docs/elsewhere.md", "exec"), {})
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell me a story."}]
    assert len(outputs[1]) > len("Once upon a time\n")
    assert printed.getvalue() == outputs[1] + repr("<bos>" + chat_prompt(messages)) + "\n"
