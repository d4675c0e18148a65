"""Knowledge distillation: divergences, the KD loss, teachers (online or cached top-k), the logit cache.

The loss on the positions an objective trains (``targets != IGNORE_INDEX``), in fp32, averaged over them::

    loss = α·CE(student, hard labels) + (1 − α)·T²·D(teacher_T ‖ student_T)
           [+ w_h·hidden-state loss] [+ w_a·attention transfer]

with ``p_T = softmax(z/T)`` on both sides and D one of forward KL, reverse KL, generalised JSD(β) or
total variation. The teacher is either full logits or a `TopK` pair (ids, log-probs) from a cache.

**In the training loop** (`flashlm.training.train(cfg)` with a ``distill:`` section, see `DistillConfig` in
flashlm.config; the loop itself takes the objective and never builds a teacher): `distill_objective`
wraps the run's own objective; its loss is the hard-label term, so the
student can be distilled under CLM, masked LM / NSP or their hybrid (masked batches: the teacher sees the
same corrupted input, bidirectionally). The hidden-state projection is trained and checkpointed with the
student. ``student_init: teacher`` copies every k-th teacher layer before training. With the plain CLM
objective at T = 1 the CE and D share one log-softmax, so a cached-teacher step costs about a CE step.

One job a module; each imports only from those listed above it:

- `losses`: the divergences (and how a top-k teacher's missing mass is handled), `distillation_loss`,
  `HiddenStateLoss`, `attention_transfer`: functions of tensors only;
- `vocab`: token → id maps and `check_vocab`, the check that teacher and student share a tokenizer;
- `cache`: the top-k logit cache's files and `LogitCache`, its reader (how the teacher's windows cover the
  stream, and what that costs a student window);
- `teachers`: `OnlineTeacher` (FlashLM or HF), `CachedTeacher`, `load_teacher`;
- `caching`: `build_logit_cache` and `cache_teacher`, a teacher run over token shards to fill a cache;
- `student_init`: `init_student_from_teacher`;
- `objective`: `DistillObjective`, its batch makers, `distill_objective` (the loop's), `distill_objective_for`
  (its factory, what `flashlm.training.train` passes the loop) and `distill_student`.

The names below are re-exported here: ``from flashlm.training.distill import X`` works for each.
"""

from flashlm.config import DIVERGENCES, DistillConfig
from flashlm.training.distill.cache import CACHE_IDS, CACHE_LOGPROBS, CACHE_PROGRESS, LogitCache
from flashlm.training.distill.caching import build_logit_cache, cache_teacher
from flashlm.training.distill.losses import (
    HiddenStateLoss,
    TopK,
    attention_transfer,
    distillation_loss,
    divergence,
    forward_kl,
    generalized_jsd,
    masked_cross_entropy,
    reverse_kl,
    total_variation,
    uniform_layer_map,
)
from flashlm.training.distill.objective import (
    DistillObjective,
    distill_batch,
    distill_objective,
    distill_objective_for,
    distill_student,
)
from flashlm.training.distill.student_init import init_student_from_teacher
from flashlm.training.distill.teachers import CachedTeacher, OnlineTeacher, TeacherOutput, load_teacher, teacher_kind
from flashlm.training.distill.vocab import check_vocab, vocab_fingerprint, vocab_from_dir, vocab_of

__all__ = [
    "CACHE_IDS",
    "CACHE_LOGPROBS",
    "CACHE_PROGRESS",
    "DIVERGENCES",
    "CachedTeacher",
    "DistillConfig",
    "DistillObjective",
    "HiddenStateLoss",
    "LogitCache",
    "OnlineTeacher",
    "TeacherOutput",
    "TopK",
    "attention_transfer",
    "build_logit_cache",
    "cache_teacher",
    "check_vocab",
    "distill_batch",
    "distill_objective",
    "distill_objective_for",
    "distill_student",
    "distillation_loss",
    "divergence",
    "forward_kl",
    "generalized_jsd",
    "init_student_from_teacher",
    "load_teacher",
    "masked_cross_entropy",
    "reverse_kl",
    "teacher_kind",
    "total_variation",
    "uniform_layer_map",
    "vocab_fingerprint",
    "vocab_from_dir",
    "vocab_of",
]
