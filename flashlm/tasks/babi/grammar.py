"""bAbI decoding grammar: supporting-fact chains may only cite statements of their story.

`ChainGrammar` is the constraint of the statement-copying beam search (`flashlm.tasks.babi.run.predict`):
whole statements (`citable`: the story's, qa17/qa19 facts restated both ways round), at least one, then
`ANSWER_MARK` and the answer; `chain_grammar` builds one for a question.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from flashlm.tasks.babi.data import ANSWER_MARK, PATH_TASK, PATHS, RELATION_TASK, RELATIONS, Question, restated


# ---- scoring ------------------------------------------------------------------------------------
class ChainGrammar:
    """What a supporting-fact chain may say: whole statements of its story (token ids, each as the
    target spells it), at least one and in any order, then `ANSWER_MARK`, after which anything goes.
    (Without "at least one", beam search fills up with short "= yes" / "= no" guesses that finish
    before any real chain does, and beam search then answers worse than greedy decoding.)

    `allowed` walks a token trie; it is the constraint of `predict`'s statement-copying decoding,
    the memory-selection of a memory network put as a decoding rule: the model still chooses which
    statements to cite and what to answer, but cannot cite one the story does not hold."""

    _END, _MARK = -1, -2  # trie keys: a statement / the mark ends here

    def __init__(self, statements: Iterable[Sequence[int]], mark: Sequence[int]) -> None:
        self.root: dict[int, dict] = {}
        for ids, end in [*((ids, self._END) for ids in statements), (mark, self._MARK)]:
            node = self.root
            for tok in ids:
                node = node.setdefault(tok, {})
            node[end] = {}
        self._first_mark = mark[0] if any(t != mark[0] for t in self.root) else None  # None: no statements

    def allowed(self, history: Sequence[int]) -> list[int] | None:
        """The tokens that may follow ``history`` (None: any, the chain is over)."""
        if not history and self._first_mark is not None:
            return [t for t in self.root if t >= 0 and t != self._first_mark]
        node = self.root
        for tok in history:
            if tok not in node and self._END in node:
                node = self.root  # a statement ended: the next one starts
            if tok not in node:
                return None  # off the grammar (cannot happen when it constrained `history`)
            node = node[tok]
            if self._MARK in node:
                return None
        ids = [t for t in node if t >= 0]
        return ids + [t for t in self.root if t >= 0] if self._END in node else ids


def citable(q: Question, max_sentences: int) -> list[str]:
    """What ``q``'s chain may cite: its last ``max_sentences`` statements, lower-cased; for qa17 and
    qa19, whose chains restate facts as steps of a walk, each fact restated both ways round."""
    facts = [f.lower() for f in q.story[-max_sentences:]] if max_sentences > 0 else []
    if q.task not in (PATH_TASK, RELATION_TASK):
        return facts
    compass = PATHS if q.task == PATH_TASK else RELATIONS
    out = []
    for fact in facts:
        step = compass.parse(fact)
        if step is None:
            out.append(fact)
            continue
        a, direction, b = step
        out += [restated(q.task, (a, direction, b)), restated(q.task, (b, compass.opposite(direction), a))]
    return out


def chain_grammar(tokenizer: Any, q: Question, max_sentences: int) -> ChainGrammar:
    """The `ChainGrammar` of ``q``'s target: it cites `citable` statements."""
    cites = [tokenizer.encode(" " + c) for c in citable(q, max_sentences)]
    return ChainGrammar(cites, tokenizer.encode(" " + ANSWER_MARK))


__all__ = ["ChainGrammar", "chain_grammar", "citable"]
