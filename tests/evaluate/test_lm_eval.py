"""lm-eval itself on a FlashLM model: through the server (`local-completions`) and natively (`--model flashlm`).

A tiny model is exported with `flashlm export hf` (lm-eval's `local-completions` tokenises with that folder),
served on a free loopback port, and evaluated on three local YAML tasks over JSONL files written here
(multiple choice, rolling log-likelihood, generation). No network: the datasets are local files and the
Hub is switched off.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("lm_eval", reason="lm-eval (the `eval` extra) is not installed")

import torch  # noqa: E402
from corpora import stories  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from flashlm import cli  # noqa: E402
from flashlm.config import get_preset  # noqa: E402
from flashlm.evaluate.lm import perplexity  # noqa: E402
from flashlm.model.transformer import FlashLM  # noqa: E402
from flashlm.serve.app import create_app  # noqa: E402
from flashlm.serve.engine import Engine  # noqa: E402
from flashlm.tokenizer import Tokenizer  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

QUESTIONS = [
    {"question": "Once upon a time, there was a little", "choices": [" girl", " dog", " tree"], "answer": 0},
    {"question": "The cat sat on the", "choices": [" mat", " sky"], "answer": 0},
    {"question": "Tom and Lily went to the", "choices": [" park", " moon", " shop"], "answer": 2},
    {"question": "She was very", "choices": [" happy", " sad"], "answer": 1},
]
TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "Tom liked to play with his red ball in the park.",
    "The sun was warm and the birds were singing.",
]


def write_tasks(folder) -> dict[str, str]:
    """Three lm-eval task YAMLs over JSONL files in `folder`; returns task name -> kind."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "choice.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    gen = [{"question": q["question"], "answer": q["choices"][q["answer"]]} for q in QUESTIONS]
    (folder / "gen.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gen))

    def data(name: str) -> str:
        return f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / name}\ntest_split: test\n"

    (folder / "choice.yaml").write_text(
        "task: flashlm_tiny_choice\n" + data("choice.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"  # as docs/elsewhere.md shows it
    )
    (folder / "rolling.yaml").write_text(
        "task: flashlm_tiny_ppl\n" + data("texts.jsonl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    (folder / "gen.yaml").write_text(
        "task: flashlm_tiny_gen\n" + data("gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 8\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    return {"flashlm_tiny_choice": "choice", "flashlm_tiny_ppl": "rolling", "flashlm_tiny_gen": "gen"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A nano model (random weights, sharpened), its HF export, and the task folder."""
    root = tmp_path_factory.mktemp("lmeval")
    tokenizer = Tokenizer.train(iter(stories(300)), 512, show_progress=False)
    torch.manual_seed(0)
    model = FlashLM(get_preset("nano")).eval()
    with torch.no_grad():
        model.embed.weight.mul_(4.0)
    model_dir = model.save_pretrained(root / "tiny", tokenizer=tokenizer)
    result = CliRunner().invoke(cli.app, ["export", "hf", str(model_dir), "--out", str(root / "hf")])
    assert result.exit_code == 0, result.output
    tasks = write_tasks(root / "tasks")
    return {"model": model_dir, "hf": root / "hf", "tasks": root / "tasks", "names": tasks, "root": root}


@pytest.fixture(scope="module")
def offline():
    saved = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def server(tiny):
    """`create_app` served by uvicorn in a thread on a free loopback port; yields (base_url, engine)."""
    import uvicorn

    engine = Engine.load(tiny["model"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1/completions", engine
    srv.should_exit = True
    thread.join(timeout=10)
    engine.close()


def evaluate(tiny, model: str, model_args: str) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=list(tiny["names"]),
        task_manager=TaskManager(include_path=str(tiny["tasks"]), include_defaults=False),  # only ours: fast
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


def responses(results: dict, task: str) -> list:
    """Per document (in order), the model's raw answers: [(loglikelihood, greedy)...], [ll], or [text]."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0] for r in s["resps"]] for s in samples]


def server_args(url: str, tiny) -> str:
    context = get_preset("nano").max_seq_len
    return (
        f"base_url={url},tokenizer_backend=huggingface,tokenizer={tiny['hf']},"
        f"num_concurrent=1,max_retries=1,max_length={context}"
    )


@pytest.fixture(scope="module")
def served_results(tiny, server, offline):
    url, _ = server
    return evaluate(tiny, "local-completions", server_args(url, tiny))


@pytest.fixture(scope="module")
def native_results(tiny, offline):
    import flashlm.evaluate.lm_eval_model  # noqa: F401 - registers the `flashlm` model

    return evaluate(tiny, "flashlm", f"path={tiny['model']},device=cpu,precision=fp32")


def test_lm_eval_through_the_server(served_results, tiny):
    """`local-completions` runs every task type on /v1/completions and gets sane metrics."""
    res = served_results["results"]
    assert 0.0 <= res["flashlm_tiny_choice"]["acc,none"] <= 1.0
    ppl = res["flashlm_tiny_ppl"]
    assert ppl["byte_perplexity,none"] > 1.0 and ppl["bits_per_byte,none"] > 0.0
    assert 1.0 < ppl["word_perplexity,none"] < float("inf")
    assert 0.0 <= res["flashlm_tiny_gen"]["exact_match,none"] <= 1.0
    choice = responses(served_results, "flashlm_tiny_choice")
    assert [len(c) for c in choice] == [len(q["choices"]) for q in QUESTIONS]
    assert all(ll < 0 and isinstance(greedy, bool) for doc in choice for ll, greedy in doc)
    assert all(isinstance(text, str) for doc in responses(served_results, "flashlm_tiny_gen") for text in doc)


def test_server_loglikelihoods_equal_flashlm_eval(served_results, server):
    """The rolling log-likelihood lm-eval got from the server is `flashlm.evaluate.lm.perplexity`'s
    (the text after <bos>, no <eos>), within 1e-4 nats."""
    _, engine = server
    rolling = responses(served_results, "flashlm_tiny_ppl")
    for text, (loglikelihood,) in zip(TEXTS, rolling, strict=True):
        reference = perplexity(engine.model, engine.tokenizer, [text], add_eos=False)
        assert loglikelihood == pytest.approx(-reference["nats"], abs=1e-4)


def test_native_model_equals_the_server(native_results, served_results):
    """`--model flashlm` (no server) gives the server's log-likelihoods, greedy flags and generations."""
    for task in ("flashlm_tiny_choice", "flashlm_tiny_ppl"):
        native, served = responses(native_results, task), responses(served_results, task)
        assert len(native) == len(served) > 0
        for doc_native, doc_served in zip(native, served, strict=True):
            for a, b in zip(doc_native, doc_served, strict=True):
                if isinstance(a, tuple):
                    assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
                else:
                    assert a == pytest.approx(b, abs=1e-4)
    assert responses(native_results, "flashlm_tiny_gen") == responses(served_results, "flashlm_tiny_gen")
    for task, metric in (("flashlm_tiny_choice", "acc,none"), ("flashlm_tiny_ppl", "bits_per_byte,none")):
        assert native_results["results"][task][metric] == pytest.approx(served_results["results"][task][metric])


@pytest.mark.slow
def test_native_command_line(tiny, tmp_path):
    """The documented command: `python -m flashlm.evaluate.lm_eval_model --model flashlm ...` (lm-eval's CLI)."""
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "flashlm.evaluate.lm_eval_model",
        "--model",
        "flashlm",
        "--model_args",
        f"path={tiny['model']}",
        "--device",
        "cpu",
        "--tasks",
        "flashlm_tiny_choice,flashlm_tiny_ppl",
        "--include_path",
        str(tiny["tasks"]),
        "--output_path",
        str(out),
    ]
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    files = list(out.rglob("results_*.json"))
    assert len(files) == 1, done.stderr[-2000:]
    res = json.loads(files[0].read_text())["results"]
    assert 0.0 <= res["flashlm_tiny_choice"]["acc,none"] <= 1.0
    assert res["flashlm_tiny_ppl"]["bits_per_byte,none"] > 0.0


def test_native_model_paths(tiny, tmp_path):
    """`path=` takes a model folder or a run folder (its `latest`); anything else is one clear error."""
    from flashlm.errors import CheckpointError
    from flashlm.evaluate.lm_eval_model import FlashLMEval, model_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "latest").symlink_to(tiny["model"], target_is_directory=True)
    assert model_dir(run) == run / "latest" and model_dir(tiny["model"]) == tiny["model"]
    lm = FlashLMEval.create_from_arg_string(f"path={run},device=cpu", {"device": "cuda", "batch_size": 2})
    assert lm.model.cfg.max_seq_len == get_preset("nano").max_seq_len and lm.batch_size == 2  # model_args win
    with pytest.raises(CheckpointError, match="no config.json"):
        FlashLMEval(path=str(tmp_path / "missing"))
