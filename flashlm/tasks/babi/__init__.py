"""bAbI question answering (Weston et al. 2015): parse, fine-tune with prefix-LM batches, score.

File format: ``ID text`` lines; a question line is ``ID question<TAB>answer<TAB>supporting IDs``;
the ID restarts at 1 with every new story. Each question becomes one example: the story so far
(its statements only, earlier questions left out, at most the last ``max_sentences`` of them, as
End-to-End Memory Networks keep 50) plus the question as the bidirectional source, the answer as the
causal target. Text is lower-cased (names appear in both cases in task 20) and answers are compared
lower-cased after stripping spaces; predictions come from a beam search (``beam``, 4 by default; 1 is
greedy).

With ``supporting_facts`` (the default) the target first repeats the statements bAbI marks as
supporting the answer, in the file's order (the order of the reasoning), then ``= answer``: the
training files' supporting-fact labels become a scratchpad, so a multi-hop question is learnt as a
chain of single lookups. This is bAbI's strongly supervised setting (as MemNN's, not MemN2N's); at
test time the model writes its own chain and only the answer after the ``=`` is scored. With
``copy_statements`` (the default) that chain may only cite statements of its story, whole (`ChainGrammar`;
qa17 and qa19 cite them restated as steps of a walk, either way round): a memory network's choice
among its memories, made here by a beam search under the model's own probabilities. Greedy, the model
often writes a statement the story does not hold ("brian is a swan" where Brian is a lion); beam
search over whole citations instead ranks every real statement by how likely the model finds it.

With ``augment`` (the default), every training batch renames the people, places, objects, animals,
colours and shapes of its stories: one random permutation of each entity class, applied to story,
question and answer alike, and rewords each statement with a random one of bAbI's synonymous verbs
("went", "moved", "journeyed", ...; "got", "took", ...). Renaming alone leaves each story's sequence of
verbs and phrasings as a fingerprint the model memorises (its accuracy on the training questions then
runs far ahead of test; see docs/notes/babi.md); with rewording the two agree and the time goes into the rule.
The renamed question is as correct as the original (bAbI states every fact it asks about), so a
1k training set yields a fresh story at every step and the model cannot memorise who went where;
task 20 keeps its places and objects, whose meaning it asks about (hungry → kitchen). Task 19 (path
finding) also turns and mirrors its compass and states facts as their converses at random, and its
chain restates each fact along the route ("from the kitchen the office is south."; `travel_chain`).
Task 17 (positional reasoning) likewise restates its two supporting statements as a walk from the
asked object to the other ("the pink rectangle is below the triangle. ..."; `relation_chain`).

The code, by module: `flashlm.tasks.babi.data` (file format, questions, examples and chains),
`.augment` (renaming, rewording, compass turning), `.grammar` (`ChainGrammar`: what a chain may cite)
and `.run` (`BabiConfig`, fine-tuning, decoding, scoring, `run_babi`, the report section). This
package re-exports their public names.
"""

from __future__ import annotations

from flashlm.tasks.babi.augment import (
    ANIMALS,
    COLORS,
    ENTITY_CLASSES,
    KEEP_PLACES_AND_OBJECTS,
    MEN,
    OBJECTS,
    PLACES,
    PLURALS,
    SHAPES,
    VERB_SYNONYMS,
    WOMEN,
    augmenting_collate,
    entity_renaming,
    rename,
    reword,
    task_entities,
    turn_map,
)
from flashlm.tasks.babi.data import (
    ANSWER_MARK,
    DATA_SUBDIR,
    FAILED_BELOW,
    PATH_TASK,
    PATHS,
    RELATION_TASK,
    RELATIONS,
    TASKS,
    Compass,
    Question,
    answer_of,
    build_examples,
    corpus,
    find_data,
    normalize,
    parse_babi,
    read_task,
    relation_chain,
    restated,
    source_text,
    target_text,
    task_file,
    travel_chain,
)
from flashlm.tasks.babi.grammar import (
    ChainGrammar,
    chain_grammar,
    citable,
)
from flashlm.tasks.babi.run import (
    DEFAULT_MODEL,
    SCHEDULE,
    TASK_GROUPS,
    BabiConfig,
    evaluate,
    markdown,
    next_budget,
    parse_groups,
    predict,
    run_babi,
    scheduled,
    score,
    task_groups,
    train_and_score,
    train_model,
)

__all__ = [
    "ANSWER_MARK",
    "DATA_SUBDIR",
    "FAILED_BELOW",
    "PATHS",
    "PATH_TASK",
    "RELATIONS",
    "RELATION_TASK",
    "TASKS",
    "Compass",
    "Question",
    "answer_of",
    "build_examples",
    "corpus",
    "find_data",
    "normalize",
    "parse_babi",
    "read_task",
    "relation_chain",
    "restated",
    "source_text",
    "target_text",
    "task_file",
    "travel_chain",
    "ANIMALS",
    "COLORS",
    "ENTITY_CLASSES",
    "KEEP_PLACES_AND_OBJECTS",
    "MEN",
    "OBJECTS",
    "PLACES",
    "PLURALS",
    "SHAPES",
    "VERB_SYNONYMS",
    "WOMEN",
    "augmenting_collate",
    "entity_renaming",
    "rename",
    "reword",
    "task_entities",
    "turn_map",
    "ChainGrammar",
    "chain_grammar",
    "citable",
    "DEFAULT_MODEL",
    "SCHEDULE",
    "TASK_GROUPS",
    "BabiConfig",
    "evaluate",
    "markdown",
    "next_budget",
    "parse_groups",
    "predict",
    "run_babi",
    "scheduled",
    "score",
    "task_groups",
    "train_and_score",
    "train_model",
]
