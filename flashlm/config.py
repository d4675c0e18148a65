"""Configuration: ModelConfig (+ named presets), TrainConfig, DistillConfig, RunConfig; YAML in/out,
dotted overrides.

Every invalid value raises `ConfigError` with one line naming the key, what is wrong and what to do.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from flashlm.errors import ConfigError

FLAVOURS = ("gemma", "llama")


@dataclass
class ModelConfig:
    """Shape and flavour of a FlashLM transformer.

    `layer_pattern` is tiled over the layers: "L" a local (sliding-window) layer, "G" a global one.
    "LLLLLG" is Gemma 3's 5 local : 1 global; "G" makes every layer global.
    """

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # default d_model // n_heads
    d_ff: int | None = None  # MLP hidden width; default 4 * d_model
    flavour: str = "gemma"
    layer_pattern: str = "LLLLLG"
    sliding_window: int = 128
    rope_base_local: float = 10_000.0
    rope_base_global: float = 1_000_000.0
    qk_norm: bool | None = None  # default: True for gemma, False for llama
    query_pre_attn_scalar: float | None = None  # scores scaled by this ** -0.5; default head_dim
    attn_softcap: float | None = None
    final_softcap: float | None = None
    tie_embeddings: bool = True
    max_seq_len: int = 512
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dropout: float = 0.0  # on the embeddings and every residual branch, in training mode only

    def __post_init__(self) -> None:
        if self.head_dim is None and isinstance(self.d_model, int) and isinstance(self.n_heads, int):
            self.head_dim = self.d_model // self.n_heads if self.n_heads > 0 else 0
        if self.d_ff is None and isinstance(self.d_model, int):
            self.d_ff = 4 * self.d_model
        if self.qk_norm is None:
            self.qk_norm = self.flavour == "gemma"
        if self.query_pre_attn_scalar is None:
            self.query_pre_attn_scalar = float(self.head_dim or 1)
        self.validate()

    # ---- derived -------------------------------------------------------------------------------
    @property
    def layer_types(self) -> list[str]:
        """Per layer: "local" or "global"."""
        pat = self.layer_pattern
        return ["global" if pat[i % len(pat)] == "G" else "local" for i in range(self.n_layers)]

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.d_model) if self.flavour == "gemma" else 1.0

    # ---- validation ------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"model.{key}: {msg}")

        for key in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "d_ff",
            "sliding_window",
            "max_seq_len",
        ):
            value = getattr(self, key)
            need(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                key,
                f"must be a positive integer, got {value!r}",
            )
        need(self.flavour in FLAVOURS, "flavour", f"must be one of {', '.join(FLAVOURS)}, got {self.flavour!r}")
        need(
            self.d_model % self.n_heads == 0,
            "d_model",
            f"{self.d_model} is not divisible by n_heads={self.n_heads}; pick a multiple of n_heads",
        )
        need(
            self.n_heads % self.n_kv_heads == 0,
            "n_kv_heads",
            f"{self.n_kv_heads} does not divide n_heads={self.n_heads}; use a divisor of n_heads",
        )
        need(
            isinstance(self.layer_pattern, str)
            and len(self.layer_pattern) > 0
            and set(self.layer_pattern) <= {"L", "G"},
            "layer_pattern",
            f"must be a non-empty string of 'L' (local) and 'G' (global), got {self.layer_pattern!r}",
        )
        if "local" in self.layer_types:
            need(
                self.sliding_window <= self.max_seq_len,
                "sliding_window",
                f"{self.sliding_window} is larger than the context max_seq_len={self.max_seq_len}; "
                "lower it or make every layer global (layer_pattern: G)",
            )
        need(self.norm_eps > 0, "norm_eps", f"must be positive, got {self.norm_eps}")
        need(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        for key in ("attn_softcap", "final_softcap"):
            value = getattr(self, key)
            need(value is None or value > 0, key, f"must be positive or null, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], prefix: str = "model") -> ModelConfig:
        data = dict(data)
        preset = data.pop("preset", None)
        if preset is not None:
            get_preset(preset)  # validates the name
        base = dict(PRESETS[preset]) if preset else {}
        _check_keys(cls, data, prefix)
        base.update(_coerce(cls, data, prefix))
        return cls(**base)


def _coerce(cls: type, data: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Convert values to each field's declared type (YAML reads `1e-3` as a string); refuse the rest."""
    types = {f.name: str(f.type) for f in fields(cls)}
    out = {}
    for key, value in data.items():
        kind = types.get(key, "")
        base = kind.replace(" | None", "")
        try:
            if value is None and "None" in kind:
                pass
            elif base == "float" and not isinstance(value, bool):
                value = float(value)
            elif base == "int" and isinstance(value, str):
                value = int(value)
            elif base == "bool" and not isinstance(value, bool):
                raise ValueError
            elif base.startswith("tuple"):
                value = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{prefix}.{key}: expected {kind}, got {value!r}") from None
        out[key] = value
    return out


def _check_keys(cls: type, data: dict[str, Any], prefix: str) -> None:
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            close = [k for k in known if k.startswith(str(key)[:3])]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{prefix}.{key}: unknown key{hint}; known keys: {', '.join(sorted(known))}")


# ---- presets ------------------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    # tests: well under 1M parameters
    "nano": dict(
        vocab_size=512,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=128,
        layer_pattern="LG",
        sliding_window=16,
        max_seq_len=128,
    ),
    # CPU sizes
    "micro": dict(
        vocab_size=4096,
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        d_ff=384,
        layer_pattern="LLLG",
        sliding_window=64,
        max_seq_len=256,
    ),
    "tiny": dict(
        vocab_size=4096,
        d_model=256,
        n_layers=6,
        n_heads=4,
        n_kv_heads=2,
        d_ff=640,
        layer_pattern="LLLLLG",
        sliding_window=128,
        max_seq_len=512,
    ),  # ~5M
    "small": dict(
        vocab_size=8192,
        d_model=384,
        n_layers=8,
        n_heads=6,
        n_kv_heads=2,
        d_ff=1536,
        layer_pattern="LLLLLG",
        sliding_window=256,
        max_seq_len=1024,
    ),  # ~20M
    # GPU sizes
    "base": dict(
        vocab_size=32768,
        d_model=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=4,
        d_ff=3072,
        layer_pattern="LLLLLG",
        sliding_window=512,
        max_seq_len=2048,
    ),
    "1b": dict(
        vocab_size=65536,
        d_model=2048,
        n_layers=20,
        n_heads=16,
        n_kv_heads=4,
        d_ff=8192,
        layer_pattern="LLLLLG",
        sliding_window=512,
        max_seq_len=8192,
    ),
    # Llama-3-8B widths with a tied 128k vocabulary: ≈7.5B parameters
    "7.5b": dict(
        vocab_size=128256,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        d_ff=14336,
        layer_pattern="LLLLLG",
        sliding_window=1024,
        max_seq_len=8192,
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**PRESETS[name])


def layer_parameters(cfg: ModelConfig) -> int:
    """Parameters of one transformer block of `FlashLM(cfg)`."""
    d, h = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * h + 2 * d * cfg.n_kv_heads * h + cfg.n_heads * h * d
    mlp = 3 * d * cfg.d_ff
    norms = (4 if cfg.flavour == "gemma" else 2) * d + (2 * h if cfg.qk_norm else 0)
    return attn + mlp + norms


def count_parameters(cfg: ModelConfig, include_embedding: bool = True) -> int:
    """Parameters of `FlashLM(cfg)`, computed from the config alone (the LM head included; task heads
    such as NSP live outside the base model)."""
    d = cfg.d_model
    total = cfg.n_layers * layer_parameters(cfg) + d
    if include_embedding:
        total += cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return total


# ---- masking and the hybrid objective's terms ------------------------------------------------------
OBJECTIVE_TERMS = ("clm", "mlm", "nsp", "prefix_lm")
TERM_KEYS = {
    "clm": ("ratio", "weight"),
    "mlm": ("ratio", "weight", "nsp_weight"),
    "nsp": ("ratio", "weight", "nsp_weight"),
    "prefix_lm": ("ratio", "weight"),
}


def _number(value: Any, key: str, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if integer and number != int(number):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return number


def _mapping(value: Any, key: str, example: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a mapping, e.g. {example}; got {value!r}")
    return value


@dataclass(frozen=True)
class MaskingConfig:
    """`train.masking`: how masked batches are corrupted and predicted (flashlm.training.mixing)."""

    rate: float = 0.15  # share of tokens predicted; rate_end: linear schedule to it over train.steps
    rate_end: float | None = None
    mask_prob: float = 0.8  # of chosen tokens -> <mask>; random_prob -> random token; rest kept
    random_prob: float = 0.1
    max_span: int = 1  # > 1: spans of 1..max_span tokens
    next_token: bool = True  # masked next-token prediction (GPT-BERT); false: in place (BERT)
    per_document: bool = True  # masked windows attend only inside their documents

    def __post_init__(self) -> None:
        for key in ("next_token", "per_document"):
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise ConfigError(f"train.masking.{key}: expected true or false, got {value!r}")
        span = _number(self.max_span, "train.masking.max_span", integer=True)
        if span < 1:
            raise ConfigError(f"train.masking.max_span: must be an integer >= 1, got {self.max_span!r}")
        object.__setattr__(self, "max_span", int(span))
        for key in ("rate", "rate_end", "mask_prob", "random_prob"):
            value = getattr(self, key)
            if key == "rate_end" and value is None:
                continue
            number = _number(value, f"train.masking.{key}")
            low_open = key in ("rate", "rate_end")
            if not (0 < number < 1 if low_open else 0 <= number <= 1):
                bounds = "(0, 1)" if low_open else "[0, 1]"
                raise ConfigError(f"train.masking.{key}: must be in {bounds}, got {value!r}")
            object.__setattr__(self, key, number)
        if self.mask_prob + self.random_prob > 1 + 1e-9:
            raise ConfigError(
                f"train.masking.random_prob: mask_prob + random_prob must be <= 1, got "
                f"{self.mask_prob} + {self.random_prob}"
            )

    @classmethod
    def from_value(cls, raw: Any) -> MaskingConfig:
        """`train.masking` as YAML gives it (a mapping, possibly partial, or None) or already typed."""
        if isinstance(raw, cls):
            return raw
        data = _mapping(raw, "train.masking", "{rate: 0.3, rate_end: 0.15, max_span: 3}")
        known = [f.name for f in fields(cls)]
        for key in data:
            if key not in known:
                raise ConfigError(f"train.masking.{key}: unknown key; known keys: {', '.join(known)}")
        return cls(**data)

    def rate_at(self, step: int, total_steps: int) -> float:
        """The masking rate at (1-based) `step`: linear from rate to rate_end over the run."""
        if self.rate_end is None or total_steps <= 1:
            return self.rate
        frac = min(max((step - 1) / (total_steps - 1), 0.0), 1.0)
        return self.rate + (self.rate_end - self.rate) * frac

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ObjectiveTerm:
    """One entry of `train.objectives` (a hybrid's term): ``name: {ratio, weight[, nsp_weight]}``.

    ratio: steps per cycle (integer >= 1); weight: loss multiplier (> 0); nsp_weight (mlm, nsp only;
    default 0 for mlm, 1 for nsp): > 0 makes the masked batches NSP pairs, weighting the NSP loss."""

    name: str
    ratio: int = 1
    weight: float = 1.0
    nsp_weight: float | None = None  # None: the term's default

    def __post_init__(self) -> None:
        where = f"train.objectives.{self.name}"
        if self.name not in OBJECTIVE_TERMS:
            raise ConfigError(f"{where}: unknown objective; choose among {', '.join(OBJECTIVE_TERMS)}")
        if self.nsp_weight is None:
            object.__setattr__(self, "nsp_weight", 1.0 if self.name == "nsp" else 0.0)
        elif "nsp_weight" not in TERM_KEYS[self.name]:
            raise ConfigError(f"{where}.nsp_weight: unknown key; {self.name} takes {', '.join(TERM_KEYS[self.name])}")
        ratio = _number(self.ratio, f"{where}.ratio", integer=True)
        if ratio < 1:
            raise ConfigError(f"{where}.ratio: must be an integer >= 1, got {self.ratio!r}")
        object.__setattr__(self, "ratio", int(ratio))
        for key in ("weight", "nsp_weight"):
            value = getattr(self, key)
            number = _number(value, f"{where}.{key}")
            if number < 0 or (key == "weight" and number == 0):
                sign = "positive" if key == "weight" else ">= 0"
                raise ConfigError(f"{where}.{key}: must be {sign}, got {value!r}")
            object.__setattr__(self, key, number)

    @property
    def uses_nsp(self) -> bool:
        return self.name in ("mlm", "nsp") and self.nsp_weight > 0

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in TERM_KEYS[self.name]}


def objective_terms(raw: Any) -> dict[str, ObjectiveTerm]:
    """`train.objectives` as typed terms by name, in order (empty: no mix); ConfigError naming the key."""
    data = _mapping(raw, "train.objectives", "{clm: {ratio: 1}, mlm: {ratio: 3}}")
    terms = {}
    for name, options in data.items():
        if isinstance(options, ObjectiveTerm):
            terms[name] = options
            continue
        where = f"train.objectives.{name}"
        if name not in OBJECTIVE_TERMS:
            raise ConfigError(f"{where}: unknown objective; choose among {', '.join(OBJECTIVE_TERMS)}")
        options = _mapping(options, where, "{ratio: 1, weight: 1.0}")
        for key in options:
            if key not in TERM_KEYS[name]:
                raise ConfigError(f"{where}.{key}: unknown key; {name} takes {', '.join(TERM_KEYS[name])}")
        terms[name] = ObjectiveTerm(name, **options)
    return terms


# ---- training -----------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Optimisation and run settings for `flashlm train` (objectives and distillation extend it)."""

    data: str = ""  # token-shard directory (from `flashlm data prepare`)
    out: str = "runs/train"
    steps: int = 1000
    minutes: float = 0.0  # wall-clock budget (0: none); the run ends at this or `steps`, whichever comes first
    batch_size: int = 16  # sequences per rank per micro-step
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    activation_checkpointing: bool = False
    distributed: str = "ddp"  # ddp | fsdp (used when launched by torchrun)
    seed: int = 1337
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    tensorboard: bool = False
    objective: str = "clm"  # a name in flashlm.training.objectives.OBJECTIVES
    objectives: dict[str, ObjectiveTerm] = field(default_factory=dict)  # hybrid mix {term: {ratio, ...}}
    masking: MaskingConfig = field(default_factory=MaskingConfig)  # masked-LM settings
    packed_attention: bool = False  # attention (and loss) never cross document boundaries
    val_data: str = ""  # shard directory for evaluation; default: the "val" split of `data`
    tokenizer: str = ""  # tokenizer.json copied into checkpoints; default: the one in `data`
    resume: bool | str = False  # true: latest checkpoint under out/; or a checkpoint path
    device: str = "auto"  # auto (cuda when available) | cpu | cuda

    def __post_init__(self) -> None:
        """Mappings as YAML gives them become typed settings (validated, one-line errors naming the key)."""
        self.masking = MaskingConfig.from_value(self.masking)
        self.objectives = objective_terms(self.objectives)

    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"train.{key}: {msg}")

        for key in (
            "steps",
            "batch_size",
            "seq_len",
            "grad_accum",
            "eval_every",
            "eval_batches",
            "save_every",
            "keep_last",
            "log_every",
        ):
            value = getattr(self, key)
            need(isinstance(value, int) and value > 0, key, f"must be a positive integer, got {value!r}")
        need(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        need(
            isinstance(self.minutes, (int, float)) and self.minutes >= 0,
            "minutes",
            f"must be a number of minutes >= 0 (0: no time budget), got {self.minutes!r}",
        )
        need(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        need(self.schedule in ("cosine", "wsd"), "schedule", f"must be cosine or wsd, got {self.schedule!r}")
        need(
            self.precision in ("auto", "fp32", "bf16"),
            "precision",
            f"must be auto, fp32 or bf16, got {self.precision!r}",
        )
        need(self.distributed in ("ddp", "fsdp"), "distributed", f"must be ddp or fsdp, got {self.distributed!r}")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        need(self.device in ("auto", "cpu", "cuda"), "device", f"must be auto, cpu or cuda, got {self.device!r}")
        need(
            isinstance(self.resume, (bool, str)),
            "resume",
            f"must be true, false or a checkpoint path, got {self.resume!r}",
        )
        self.masking = MaskingConfig.from_value(self.masking)  # fields set after construction
        self.objectives = objective_terms(self.objectives)
        if self.objectives and self.objective not in ("clm", "hybrid"):
            raise ConfigError(
                f"train.objective: {self.objective!r} conflicts with train.objectives (a mix); drop one of them"
            )
        if not self.objectives and self.objective == "hybrid":
            raise ConfigError(
                "train.objectives: train.objective hybrid needs terms, e.g. {clm: {ratio: 1}, mlm: {ratio: 3}}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The settings as YAML holds them (masking and objectives as mappings)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["betas"] = list(self.betas)
        out["masking"] = self.masking.to_dict()
        out["objectives"] = {name: term.to_dict() for name, term in self.objectives.items()}
        return out


def canonical_train_settings(data: dict[str, Any]) -> dict[str, Any]:
    """A saved `train` mapping (e.g. a checkpoint's, which may spell masking and objectives partially)
    with masking and objectives in `TrainConfig.to_dict` form, to compare with a run's; values that no
    longer parse are kept as they are."""
    out = dict(data)
    try:
        out["masking"] = MaskingConfig.from_value(data.get("masking")).to_dict()
        out["objectives"] = {n: t.to_dict() for n, t in objective_terms(data.get("objectives")).items()}
    except ConfigError:
        pass
    return out


# ---- distillation -------------------------------------------------------------------------------
DIVERGENCES = ("forward_kl", "reverse_kl", "generalized_jsd", "total_variation")
DIVERGENCE_ALIASES = {
    "kl": "forward_kl",
    "fkl": "forward_kl",
    "rkl": "reverse_kl",
    "jsd": "generalized_jsd",
    "tvd": "total_variation",
}


@dataclass
class DistillConfig:
    """The optional `distill:` section: train the model as a student of a teacher (flashlm.training.distill).

    loss = alpha·(the objective's loss on hard labels) + (1 − alpha)·T²·D(teacher_T ‖ student_T)
           [+ hidden_weight·hidden-state loss] [+ attention_weight·last-layer attention transfer]
    """

    teacher: str = ""  # FlashLM checkpoint dir, local HF causal-LM dir, or a `flashlm distill cache` dir
    cache: str = ""  # train from a top-k cache in this dir; built from `teacher` over train.data if missing
    top_k: int = 64  # ids kept per position when `cache` is built
    alpha: float = 0.5  # weight of the hard-label loss; the KD term gets 1 − alpha
    temperature: float = 1.0
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | generalized_jsd | total_variation
    beta: float = 0.5  # generalised JSD interpolation, in (0, 1)
    hidden_weight: float = 0.0  # hidden-state loss weight (0: off); needs an online teacher
    hidden_loss: str = "cosine"  # cosine | mse (through a learned projection when widths differ)
    layer_map: list[int] | None = None  # teacher block per student block (0-based); default uniform
    attention_weight: float = 0.0  # last-layer attention transfer weight (0: off); online teacher
    student_init: str = "scratch"  # scratch | teacher (every k-th teacher layer; widths must match)

    def __post_init__(self) -> None:
        self.divergence = DIVERGENCE_ALIASES.get(self.divergence, self.divergence)

    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"distill.{key}: {msg}")

        need(
            isinstance(self.teacher, str) and isinstance(self.cache, str),
            "teacher",
            "teacher and cache must be paths (strings)",
        )
        need(
            isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k > 0,
            "top_k",
            f"must be a positive integer, got {self.top_k!r}",
        )
        need(0.0 <= self.alpha <= 1.0, "alpha", f"must be in [0, 1], got {self.alpha}")
        need(self.temperature > 0, "temperature", f"must be positive, got {self.temperature}")
        need(
            self.divergence in DIVERGENCES,
            "divergence",
            f"must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}",
        )
        need(0.0 < self.beta < 1.0, "beta", f"must be strictly between 0 and 1, got {self.beta}")
        need(self.hidden_weight >= 0, "hidden_weight", f"must be >= 0, got {self.hidden_weight}")
        need(self.attention_weight >= 0, "attention_weight", f"must be >= 0, got {self.attention_weight}")
        need(self.hidden_loss in ("cosine", "mse"), "hidden_loss", f"must be cosine or mse, got {self.hidden_loss!r}")
        need(
            self.layer_map is None
            or (
                isinstance(self.layer_map, (list, tuple))
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layer_map)
            ),
            "layer_map",
            f"must be a list of teacher block indices (0-based) or null, got {self.layer_map!r}",
        )
        need(
            self.student_init in ("scratch", "teacher"),
            "student_init",
            f"must be scratch or teacher, got {self.student_init!r}",
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layer_map"] = None if self.layer_map is None else list(self.layer_map)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"distill: must be a mapping of settings (teacher, alpha, ...), got {data!r}")
        _check_keys(cls, data, "distill")
        cfg = cls(**_coerce(cls, data, "distill"))
        cfg.validate()
        return cfg


# ---- a whole recipe -----------------------------------------------------------------------------
@dataclass
class RunConfig:
    """A whole recipe: what `configs/*.yaml` holds (`distill` only in distillation recipes)."""

    model: ModelConfig = field(default_factory=lambda: get_preset("tiny"))
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig | None = None

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len: {self.train.seq_len} exceeds model.max_seq_len="
                f"{self.model.max_seq_len}; lower seq_len or raise max_seq_len"
            )
        if self.distill is not None:
            self.distill.validate()
            if not self.distill.teacher and not self.distill.cache:
                raise ConfigError(
                    "distill.teacher: not set; point it at a FlashLM checkpoint, a local "
                    "transformers model dir or a `flashlm distill cache` dir"
                )

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model.to_dict(), "train": self.train.to_dict()}
        if self.distill is not None:
            out["distill"] = self.distill.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        if not isinstance(data, dict):
            raise ConfigError("config: the top level must be a mapping with sections 'model' and 'train'")
        _check_keys(cls, data, "config")
        model = ModelConfig.from_dict(data.get("model") or {})
        train_data = dict(data.get("train") or {})
        _check_keys(TrainConfig, train_data, "train")
        train = TrainConfig(**_coerce(TrainConfig, train_data, "train"))
        distill = None if data.get("distill") is None else DistillConfig.from_dict(data["distill"])
        cfg = cls(model=model, train=train, distill=distill)
        cfg.validate()
        return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass an existing YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return data or {}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML) to a config mapping.

    Keys may go deeper into nested settings: ``train.masking.rate=0.3`` changes one masking setting
    (the others keep their values), ``train.masking={rate: 0.3}`` replaces the whole mapping."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. model.n_layers=4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: the key must be section.name, e.g. train.lr=1e-3")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                what = "a section" if depth == 0 else "a mapping"
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: depth + 1])} is not {what}")
            node[part] = child = dict(child)  # a copy: the caller's mapping stays as it was
            node = child
        node[parts[-1]] = value
    return data


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    data = load_yaml(path) if path else {}
    return RunConfig.from_dict(apply_overrides(data, overrides or []))


def save_yaml(cfg: RunConfig | ModelConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def replace(cfg: ModelConfig, **changes: Any) -> ModelConfig:
    """A copy of `cfg` with some fields changed (and validated)."""
    return dataclasses.replace(cfg, **changes)
