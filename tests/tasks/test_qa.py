"""Question answering: the bAbI parser and task, span decoding, windows and SQuAD end to end."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from corpora import real_data

from flashlm.config import ModelConfig
from flashlm.errors import ConfigError, DataError
from flashlm.tasks import babi, squad
from flashlm.tasks.babi import BabiConfig, Question, parse_babi, read_task, run_babi, score, source_text
from flashlm.tasks.squad import (
    SquadConfig,
    SquadItem,
    best_span,
    make_windows,
    merge_windows,
    read_squad,
    run_squad,
    squad_from_babi,
)
from flashlm.tokenizer import Tokenizer
from flashlm.training.finetune import FinetuneConfig, collate_prefix


def babi_data() -> Path:
    """The real bAbI 1k folder (the tests that need it skip without ../shared/data)."""
    return real_data("babi-en-1k")


SNIPPET = """\
1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary? \tbathroom\t1
4 Daniel went back to the hallway.
5 Sandra moved to the garden.
6 Where is Daniel? \thallway\t4
1 Sandra travelled to the office.
2 Sandra went to the bathroom.
3 Where is Sandra? \tbathroom\t2
"""

TINY = ModelConfig(
    vocab_size=512,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=4,
    d_ff=128,
    layer_pattern="G",
    max_seq_len=128,
)


# ---- bAbI ---------------------------------------------------------------------------------------
def test_parse_babi_resets_stories_and_reads_answers_and_support():
    questions = parse_babi(SNIPPET.splitlines(), task=1)
    assert len(questions) == 3
    first, second, third = questions
    assert first.story == ("Mary moved to the bathroom.", "John went to the hallway.")
    assert (first.question, first.answer, first.supporting) == ("Where is Mary?", "bathroom", (0,))
    # the earlier question line is not part of the story; IDs map past it
    assert second.story[-2:] == ("Daniel went back to the hallway.", "Sandra moved to the garden.")
    assert len(second.story) == 4 and second.supporting == (2,)
    assert third.story == ("Sandra travelled to the office.", "Sandra went to the bathroom.")
    assert third.supporting == (1,) and third.task == 1


def test_parse_babi_rejects_malformed_lines():
    with pytest.raises(DataError):
        parse_babi(["Mary moved to the bathroom."])


def test_source_text_keeps_the_last_sentences_and_lowercases():
    q = Question(1, ("A b.", "C d.", "E f."), "Where is X?", "g", (2,))
    assert source_text(q, 2) == "c d. e f. where is x?"
    assert source_text(q, 0) == "where is x?"


def test_target_lists_supporting_facts_in_the_windows_then_the_answer():
    q = Question(2, ("A b.", "C d.", "E f."), "Where is X?", "Garden", (2, 0))
    assert babi.target_text(q, 50) == " garden"
    assert babi.target_text(q, 50, facts=True) == " e f. a b. = garden"
    assert babi.target_text(q, 2, facts=True) == " e f. = garden"  # "a b." is outside the window
    assert babi.target_text(q, 0, facts=True) == " = garden"
    assert babi.answer_of(" e f. a b. = garden") == " garden" and babi.answer_of("garden") == "garden"
    assert babi.answer_of("e f. = garden = garden =") == " garden "  # ran on past its <eos>
    assert score(["e f. = garden", "garden =", "garden", "a b. = kitchen"], [q] * 4) == {2: 0.5}


def test_babi_model_learns_to_write_a_statement_then_the_answer():
    """Trained with supporting facts, the model writes "statement. = answer"; answer-only, no mark."""
    train = read_task(babi_data(), 1, "train", limit=200)
    for facts in (True, False):
        net, tok, _ = babi.train_model(train, tiny_babi(100, 16, supporting_facts=facts))
        written = babi.predict(net, tok, [source_text(q, 50) for q in train[:32]], 32, 16)
        chains = [w.partition(babi.ANSWER_MARK)[0].strip() for w in written if babi.ANSWER_MARK in w]
        if facts:
            assert len(chains) == 32 and all(c.endswith(".") for c in chains)
        else:
            assert not chains


def test_chain_grammar_admits_whole_statements_then_the_mark():
    grammar = babi.ChainGrammar([[1, 2, 3], [1, 4], [5]], mark=[9])
    assert sorted(grammar.allowed([])) == [1, 5]  # a chain cites at least one statement
    assert babi.ChainGrammar([], mark=[9]).allowed([]) == [9]  # unless its story has none
    assert sorted(grammar.allowed([1])) == [2, 4] and grammar.allowed([1, 2]) == [3]
    assert sorted(grammar.allowed([1, 2, 3])) == [1, 5, 9] and sorted(grammar.allowed([5, 1, 4])) == [1, 5, 9]
    assert grammar.allowed([5, 9]) is None and grammar.allowed([9, 7, 7]) is None  # the answer is free

    for task in (3, 17, 19):  # qa17 and qa19 chains restate their facts as a walk: those are citable too
        questions = read_task(babi_data(), task, "train", limit=20)
        tok = Tokenizer.train(babi.corpus(questions, 50, True), 400, show_progress=False)
        for q in questions:
            grammar, ids = babi.chain_grammar(tok, q, 50), tok.encode(babi.target_text(q, 50, facts=True))
            for k in range(len(ids)):
                follows = grammar.allowed(ids[:k])
                assert follows is None or ids[k] in follows, (q, k)
            assert grammar.allowed(ids[:1]) is not None  # and it does constrain


def test_copy_statements_decoding_cites_only_the_story():
    """Even an untrained model, decoding under the grammar, writes chains of whole story statements."""
    questions = read_task(babi_data(), 2, "train", limit=40)
    net, tok, _ = babi.train_model(questions, tiny_babi(2, 8, tasks=(2,)))
    grammars = [babi.chain_grammar(tok, q, 50) for q in questions[:12]]
    cited = 0
    for beam in (1, 3):
        written = babi.predict(net, tok, [source_text(q, 50) for q in questions[:12]], 12, 48, beam, grammars)
        for q, w in zip(questions, written, strict=False):
            statements = [s.lower() for s in q.story]
            *whole, rest = w.partition(babi.ANSWER_MARK)[0].split(".")
            assert all(s.strip() + "." in statements for s in whole), (w, q.story)
            assert any(s.startswith(rest.strip()) for s in statements), (w, q.story)  # one cut short
            cited += len(whole)
    assert cited > 0


def test_score_is_exact_match_per_task():
    qs = [
        Question(1, (), "q", "garden", ()),
        Question(1, (), "q", "n,w", ()),
        Question(2, (), "q", "Bill", ()),
    ]
    assert score(["garden", "n, w", "bill"], qs) == {1: 1.0, 2: 1.0}
    assert score(["kitchen", "n,w", "Fred"], qs) == {1: 0.5, 2: 0.0}


def test_renaming_keeps_questions_consistent_and_capitals():
    q = parse_babi(SNIPPET.splitlines(), task=1)[1]  # Where is Daniel? hallway
    renaming = {"daniel": "john", "john": "daniel", "hallway": "garden", "garden": "hallway"}
    out = babi.rename(q, renaming)
    assert out.story == (
        "Mary moved to the bathroom.",
        "Daniel went to the garden.",
        "John went back to the garden.",
        "Sandra moved to the hallway.",
    )
    assert (out.question, out.answer, out.supporting) == ("Where is John?", "garden", q.supporting)


def test_entity_classes_follow_each_tasks_cast_and_keep_gender():
    questions = [q for t in (1, 20) for q in read_task(babi_data(), t, "train", limit=200)]
    cast = babi.task_entities(questions)
    women, men, places = cast[1][:3]
    assert set(women) == {"mary", "sandra"} and set(men) == {"daniel", "john"}
    assert set(places) <= set(babi.PLACES) and len(places) == 6
    assert all(set(names) <= set(babi.WOMEN) | set(babi.MEN) for names in cast[20])  # qa20: people only
    rng = np.random.default_rng(0)
    for _ in range(20):
        renaming = babi.entity_renaming(rng, cast[1])
        assert sorted(renaming) == sorted(renaming.values())  # a permutation
        assert all((old in babi.WOMEN) == (new in babi.WOMEN) for old, new in renaming.items())


def test_renaming_animals_keeps_deductions_true():
    """qa15 ("sheep are afraid of wolves. gertrude is a sheep." → wolf) under random renamings of the
    animals, plurals included: solving the renamed story still gives the renamed answer."""
    questions = read_task(babi_data(), 15, "train", limit=200)
    cast = babi.task_entities(questions)[15]
    assert set(babi.ANIMALS[:4]) in [set(names) for names in cast]
    singular = {plural: name for name, plural in babi.PLURALS.items()}
    species = lambda word: singular.get(word.rstrip("."), word.rstrip("."))
    rng = np.random.default_rng(1)
    for q in questions:
        r = babi.rename(q, babi.entity_renaming(rng, cast))
        who = r.question.lower().rstrip("?").split()[2]  # "what is <who> afraid of"
        kind = next(s.split()[-1] for s in map(str.lower, r.story) if s.startswith(f"{who} is a"))
        fears = {species(s.split()[0]): species(s.split()[-1]) for s in map(str.lower, r.story) if " afraid " in s}
        assert fears[species(kind)] == r.answer.lower()


def test_augmenting_collate_is_seeded_and_renames(tmp_path):
    questions = read_task(babi_data(), 1, "train")
    tok = Tokenizer.train(babi.corpus(questions, 50), vocab_size=1024, show_progress=False)  # a token a word
    batches = [babi.augmenting_collate(tok, questions, 50, 256, seed)(questions[:32]) for seed in (0, 0, 1)]
    assert torch.equal(batches[0].input_ids, batches[1].input_ids)
    assert not torch.equal(batches[0].input_ids, batches[2].input_ids)
    plain = collate_prefix(babi.build_examples(tok, questions[:32], 50, 256))
    assert not torch.equal(batches[0].input_ids, plain.input_ids)
    assert len(batches[0].prefix_len) == len(plain.prefix_len)  # lengths change: "went" may become "went back"


def test_reword_swaps_synonymous_verbs_statement_by_statement():
    q = Question(
        2,
        (
            "Mary went back to the kitchen.",
            "John put down the apple there.",
            "The box is to the left of the cat.",
            "Fred left the milk.",
            "Jeff gave the milk to Bill.",
        ),
        "Where is the milk?",
        "kitchen",
        (1, 3),
    )
    rng = np.random.default_rng(0)
    seen: list[set[str]] = [set() for _ in q.story]
    for _ in range(200):
        r = babi.reword(q, rng)
        assert (r.question, r.answer, r.supporting) == (q.question, q.answer, q.supporting)
        assert r.story[2] == q.story[2]  # "to the left of" is a place, not a verb
        for seen_here, statement in zip(seen, r.story, strict=True):
            seen_here.add(statement)
    assert seen[0] == {f"Mary {v} to the kitchen." for v in babi.VERB_SYNONYMS[0]}
    assert seen[1] == {f"John {v} the apple there." for v in babi.VERB_SYNONYMS[2]}
    assert seen[4] == {f"Jeff {v} the milk to Bill." for v in babi.VERB_SYNONYMS[3]}


def test_path_finding_chain_walks_the_route_and_turned_maps_stay_consistent():
    """qa19: the chain restates each supporting fact along the route, so its directions are the answer,
    on every training question as given and under random quarter-turns, mirrors and converses."""
    walk = re.compile(r"^from the (\w+) the (\w+) is (north|east|south|west)\.$")
    q = Question(
        19,
        ("The kitchen is north of the office.", "The office is west of the garden."),
        "How do you go from the kitchen to the garden?",
        "s,e",
        (0, 1),
    )
    assert babi.target_text(q, 50, facts=True) == (
        " from the kitchen the office is south. from the office the garden is east. = s,e"
    )
    rng = np.random.default_rng(0)
    answers = set()
    for q in read_task(babi_data(), 19, "train"):
        for turned in (q, babi.turn_map(q, rng)):
            chain = babi.travel_chain([turned.story[i] for i in turned.supporting], turned.question)
            hops = [walk.match(text).groups() for text in chain]
            route = re.search(r"from the (\w+) to the (\w+)", turned.question).groups()
            assert hops[0][0] == route[0] and hops[-1][1] == route[1]
            assert all(a[1] == b[0] for a, b in zip(hops, hops[1:], strict=False))
            assert ",".join(h[2][0] for h in hops) == turned.answer
            if turned is not q:
                answers.add((q.answer, turned.answer))
    assert len({new for old, new in answers if old == "s,e"}) == 8  # all four turns, mirrored or not
    assert babi.travel_chain(["Mary went to the office."], q.question) == ["Mary went to the office."]


def test_positional_chain_walks_from_the_asked_object_and_answers_by_its_relations():
    """qa17: the chain walks the supporting statements from the question's first object to its second,
    each as its converse where needed, so "yes" is the answer exactly when the asked relation is on the
    walk: on every training question."""
    walk = re.compile(r"^the (.+?) is (above|below|to the left of|to the right of) the (.+?)\.$")
    q = Question(
        17,
        ("The triangle is above the pink rectangle.", "The blue square is to the left of the triangle."),
        "Is the pink rectangle to the right of the blue square?",
        "yes",
        (0, 1),
    )
    assert babi.target_text(q, 50, facts=True) == (
        " the pink rectangle is below the triangle. the triangle is to the right of the blue square. = yes"
    )
    turned_round = 0
    for q in read_task(babi_data(), 17, "train"):
        statements = [q.story[i] for i in q.supporting]
        chain = babi.relation_chain(statements, q.question)
        hops = [walk.match(text).groups() for text in chain]
        x, relation, y = re.match(
            r"^Is the (.+?) (above|below|to the left of|to the right of) the (.+?)\?$", q.question
        ).groups()
        assert hops[0][0] == x and hops[-1][2] == y
        assert all(a[2] == b[0] for a, b in zip(hops, hops[1:], strict=False))
        assert (relation in {h[1] for h in hops}) == (q.answer == "yes")
        turned_round += sum(text.lower() not in {s.lower() for s in statements} for text in chain)
    assert turned_round > 500  # converses are common
    assert babi.relation_chain(["Mary went to the office."], q.question) == ["Mary went to the office."]


def test_task_groups_and_their_parsing():
    assert babi.task_groups((1, 2, 3, 4), ((2, 3),)) == [[1], [2, 3], [4]]
    assert babi.task_groups((3, 5), ((2, 3),)) == [[3], [5]]  # a group keeps the tasks asked for
    assert babi.task_groups((1, 2), ()) == [[1], [2]]
    assert sorted([[1], [2, 3], [20], [21]], key=babi.scheduled) == [[20], [1], [2, 3], [21]]
    assert sorted(babi.TASKS) == sorted(babi.SCHEDULE)
    assert babi.parse_groups("2,3;7,8") == ((2, 3), (7, 8))
    assert babi.parse_groups("none") == ()
    for bad in ("2,x", "2,3;3,4", "0,21"):
        with pytest.raises(ConfigError, match="--groups"):
            babi.parse_groups(bad)


def test_real_babi_files_parse_to_1000_questions_per_task():
    for task in (1, 3, 20):
        assert len(read_task(babi_data(), task, "train")) == 1000
        assert len(read_task(babi_data(), task, "test")) == 1000


def tiny_babi(steps: int, batch_size: int, **changes) -> BabiConfig:
    """Tasks 1 and 4 on subsets with the tiny model, for a few steps."""
    ft = FinetuneConfig(max_steps=steps, batch_size=batch_size, progress=False, precision="fp32")
    return BabiConfig(**{"tasks": (1, 4), "model": TINY, "vocab_size": 400, "finetune": ft, **changes})


def test_babi_end_to_end_tiny(tmp_path):
    results = run_babi(babi_data(), tiny_babi(6, 16, train_limit=60, test_limit=12))
    assert set(results["accuracy"]) == {"1", "4"}
    assert all(0.0 <= a <= 1.0 for a in results["accuracy"].values())
    assert results["mean_accuracy"] == pytest.approx(sum(results["accuracy"].values()) / 2)
    assert results["runs"][0]["steps"] == 6
    assert "qa4" in babi.markdown(results)


def test_next_budget_shares_unclaimed_worker_time():
    # 2 workers, 100 s left: one task running with 30 s to go leaves 170 s for the 2 waiting tasks
    assert babi.next_budget(100.0, 2, [30.0], [1, 1]) == pytest.approx(85.0)
    # a task that ended early frees its time: with nothing running, the 2 tasks waiting share both
    # workers' time; a single model runs on one worker, so it gets no more than the time left
    assert babi.next_budget(100.0, 2, [], [1, 1]) == pytest.approx(100.0)
    assert babi.next_budget(100.0, 2, [], [2, 1]) == pytest.approx(100.0)
    assert babi.next_budget(100.0, 2, [], [1, 3]) == pytest.approx(50.0)
    assert babi.next_budget(100.0, 2, [], [1]) == pytest.approx(100.0)
    assert babi.next_budget(100.0, 2, [], [1], overhead=5.0) == pytest.approx(95.0)
    # overdue tasks claim nothing, and a budget never drops to zero
    assert babi.next_budget(100.0, 2, [-5.0], [1, 1, 1, 1]) == pytest.approx(50.0)
    assert babi.next_budget(0.0, 2, [10.0], [1]) == 1.0
    # start-up and scoring of the unfinished tasks (here 5 s each, 3 of them) are set aside first
    assert babi.next_budget(100.0, 2, [30.0], [1, 1], overhead=5.0) == pytest.approx(77.5)
    # a model of 2 tasks (next) with models of 3 tasks waiting after it: 2/5 of the 170 s
    assert babi.next_budget(100.0, 2, [30.0], [2, 3]) == pytest.approx(170.0 * 2 / 5)


def test_babi_cli_refuses_jobs_without_per_task(tmp_path):
    from typer.testing import CliRunner

    from flashlm.cli import app
    from flashlm.errors import ConfigError

    bad = CliRunner().invoke(app, ["eval", "babi", "--jobs", "2", "--data", str(babi_data()), "--out", str(tmp_path)])
    assert isinstance(bad.exception, ConfigError) and "--per-task" in str(bad.exception)


@pytest.mark.slow
def test_babi_per_task_in_two_processes_matches_one(tmp_path):
    cfg = tiny_babi(3, 8, per_task=True, train_limit=40, test_limit=8)
    serial = run_babi(babi_data(), cfg)
    parallel = run_babi(babi_data(), replace(cfg, jobs=2, threads=2), save_dir=tmp_path)
    assert [r["tasks"] for r in parallel["runs"]] == [[1], [4]]
    assert parallel["accuracy"] == serial["accuracy"]
    assert [r["final_loss"] for r in parallel["runs"]] == pytest.approx([r["final_loss"] for r in serial["runs"]])
    assert (tmp_path / "qa4").is_dir()


# ---- span decoding ------------------------------------------------------------------------------
def test_best_span_picks_the_best_valid_span():
    start = torch.tensor([9.0, 1.0, 0.0, 5.0, 0.0, 0.0])
    end = torch.tensor([9.0, 8.0, 0.0, 0.0, 1.0, 6.0])
    valid = torch.tensor([False, True, True, True, True, True])  # position 0 is outside the context
    # (0, 0) = 18 is outside the context and (3, 1) = 13 ends before it starts: (3, 5) = 11 wins
    assert best_span(start, end, valid, max_answer_len=10) == (3, 5, 11.0)
    assert best_span(start, end, valid, max_answer_len=3) == (3, 5, 11.0)
    # at most 2 tokens: (3, 5) is too long and (1, 1) = 9 beats (3, 4) = 6
    assert best_span(start, end, valid, max_answer_len=2) == (1, 1, 9.0)


def test_best_span_never_ends_before_it_starts():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        start, end = torch.randn(12, generator=gen), torch.randn(12, generator=gen)
        valid = torch.rand(12, generator=gen) > 0.3
        if not valid.any():
            continue
        s, e, _ = best_span(start, end, valid, max_answer_len=3)
        assert s <= e < s + 3 and valid[s] and valid[e]


def test_merge_windows_keeps_the_best_score_per_item():
    merged = merge_windows([(0, "garden", 1.0), (0, "kitchen", 3.0), (1, "office", -2.0), (0, "hall", 2.0)])
    assert merged == {0: "kitchen", 1: "office"}


@pytest.fixture(scope="module")
def babi_tokenizer() -> Tokenizer:
    text = [" ".join(q.story) + " " + q.question for q in read_task(babi_data(), 1, "train", 300)]
    return Tokenizer.train(iter(text), vocab_size=400, show_progress=False)


def test_windows_overlap_and_map_the_answer_back_to_text(babi_tokenizer):
    words = [f"w{i}" for i in range(60)]
    context = " ".join(words[:40]) + " the garden " + " ".join(words[40:])
    item = SquadItem("x", "Where is it?", context, ("garden",), (context.index("garden"),))
    windows = make_windows(babi_tokenizer, [item], max_len=48, doc_stride=12)
    assert len(windows) > 2
    n_context = len(babi_tokenizer.encode(context))
    covered = set()
    for w in windows:
        assert len(w.ids) <= 48 and w.ids[0] == babi_tokenizer.bos_id and w.ids[-1] == babi_tokenizer.eos_id
        first = w.offsets[0]
        covered.update(i for i, off in enumerate(babi_tokenizer.backend.encode(context).offsets) if off in w.offsets)
        if w.start:
            a, b = w.offsets[w.start - w.context_start][0], w.offsets[w.end - w.context_start][1]
            assert context[a:b].strip() == "garden"
        assert first[0] <= len(context)
    assert len(covered) == n_context
    assert sum(1 for w in windows if w.start) >= 1 and sum(1 for w in windows if w.start == 0) >= 1
    for prev, nxt in zip(windows, windows[1:], strict=False):
        assert set(prev.offsets) & set(nxt.offsets)  # neighbours overlap


def test_squad_from_babi_points_at_the_answer():
    data = squad_from_babi(parse_babi(SNIPPET.splitlines(), 1))
    for para in data["data"][0]["paragraphs"]:
        answer = para["qas"][0]["answers"][0]
        assert para["context"][answer["answer_start"] :][: len(answer["text"])] == answer["text"]


def test_squad_end_to_end_on_babi_stories(tmp_path):
    for split, limit in (("train", 120), ("test", 20)):
        data = squad_from_babi(read_task(babi_data(), 1, split, limit))
        (tmp_path / f"{split}.json").write_text(json.dumps(data))
    assert len(read_squad(tmp_path / "test.json")) == 20
    cfg = SquadConfig(
        max_len=48,
        doc_stride=16,
        model=TINY,
        vocab_size=400,
        finetune=FinetuneConfig(max_steps=8, batch_size=16, progress=False),
    )
    results = run_squad(tmp_path / "train.json", tmp_path / "test.json", cfg)
    assert 0.0 <= results["exact_match"] <= 100.0 and 0.0 <= results["f1"] <= 100.0
    assert results["f1"] >= results["exact_match"]
    assert results["eval_windows"] >= 20 and results["train"]["steps"] == 8


def test_span_qa_saves_and_loads(tmp_path, babi_tokenizer):
    from flashlm.model.transformer import FlashLM

    qa = squad.SpanQA(FlashLM(TINY)).eval()
    qa.save_pretrained(tmp_path / "qa", babi_tokenizer)
    again = squad.SpanQA.from_pretrained(tmp_path / "qa")
    ids = torch.tensor([[1, 20, 30, 4, 50, 60, 2]])
    assert torch.allclose(qa(ids), again(ids), atol=1e-6)


@pytest.mark.parametrize("data", [{"data": 5}, [1, 2], {"data": [{"paragraphs": [{"qas": [{"question": "q"}]}]}]}])
def test_json_of_another_shape_is_one_data_error(tmp_path, data):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="not SQuAD v1.1 JSON at question 0"):
        read_squad(path)
