"""Student initialisation (``distill.student_init: teacher``): a student whose blocks copy every k-th teacher
block, DistilBERT style."""

from __future__ import annotations

from flashlm.config import ModelConfig
from flashlm.errors import ConfigError
from flashlm.model.transformer import FlashLM
from flashlm.training.distill.teachers import OnlineTeacher

_SHAPE_FIELDS = (
    "vocab_size",
    "d_model",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "d_ff",
    "flavour",
    "qk_norm",
    "tie_embeddings",
)


def init_student_from_teacher(
    teacher_model: FlashLM | OnlineTeacher, student_cfg: ModelConfig, layers: list[int] | None = None
) -> FlashLM:
    """A student whose blocks copy every k-th teacher block (k = teacher layers // student layers, DistilBERT
    style; or `layers`), plus the teacher's embeddings, final norm and heads. Widths must match.

    Local/global attention, windows and RoPE bases follow the student's own `layer_pattern`.
    """
    model = teacher_model.model if isinstance(teacher_model, OnlineTeacher) else teacher_model
    if not isinstance(model, FlashLM):
        raise ConfigError(
            "distill.student_init: teacher initialisation needs a FlashLM teacher; "
            "convert HF models with `flashlm import hf` first"
        )
    t_cfg = model.cfg
    diffs = [
        f"{k} {getattr(student_cfg, k)} vs {getattr(t_cfg, k)}"
        for k in _SHAPE_FIELDS
        if getattr(student_cfg, k) != getattr(t_cfg, k)
    ]
    if diffs:
        raise ConfigError(
            f"distill.student_init: the student cannot copy the teacher ({'; '.join(diffs)}); "
            "match the widths or initialise from scratch"
        )
    if student_cfg.n_layers > t_cfg.n_layers:
        raise ConfigError(
            f"distill.student_init: the student has {student_cfg.n_layers} layers, more than "
            f"the teacher's {t_cfg.n_layers}"
        )
    step = t_cfg.n_layers // student_cfg.n_layers
    layers = list(layers) if layers is not None else [i * step for i in range(student_cfg.n_layers)]
    student = FlashLM(student_cfg)
    source = model.state_dict()
    state = {name: source[_teacher_name(name, layers)].detach().clone().float() for name in student.state_dict()}
    student.load_state_dict(state)
    return student


def _teacher_name(name: str, layers: list[int]) -> str:
    if not name.startswith("layers."):
        return name
    _, idx, rest = name.split(".", 2)
    return f"layers.{layers[int(idx)]}.{rest}"
