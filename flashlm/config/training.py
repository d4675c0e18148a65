"""Training settings: `TrainConfig` with its typed masking (`MaskingConfig`) and hybrid objective terms
(`ObjectiveTerm`), and `DistillConfig`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from flashlm.config.fields import as_mapping, as_number, check_keys, coerce_fields
from flashlm.errors import ConfigError

# ---- masking and the hybrid objective's terms ------------------------------------------------------
OBJECTIVE_TERMS = ("clm", "mlm", "nsp", "prefix_lm")
TERM_KEYS = {
    "clm": ("ratio", "weight"),
    "mlm": ("ratio", "weight", "nsp_weight"),
    "nsp": ("ratio", "weight", "nsp_weight"),
    "prefix_lm": ("ratio", "weight"),
}


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
        span = as_number(self.max_span, "train.masking.max_span", integer=True)
        if span < 1:
            raise ConfigError(f"train.masking.max_span: must be an integer >= 1, got {self.max_span!r}")
        object.__setattr__(self, "max_span", int(span))
        for key in ("rate", "rate_end", "mask_prob", "random_prob"):
            value = getattr(self, key)
            if key == "rate_end" and value is None:
                continue
            number = as_number(value, f"train.masking.{key}")
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
        data = as_mapping(raw, "train.masking", "{rate: 0.3, rate_end: 0.15, max_span: 3}")
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
        ratio = as_number(self.ratio, f"{where}.ratio", integer=True)
        if ratio < 1:
            raise ConfigError(f"{where}.ratio: must be an integer >= 1, got {self.ratio!r}")
        object.__setattr__(self, "ratio", int(ratio))
        for key in ("weight", "nsp_weight"):
            value = getattr(self, key)
            number = as_number(value, f"{where}.{key}")
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
    data = as_mapping(raw, "train.objectives", "{clm: {ratio: 1}, mlm: {ratio: 3}}")
    terms = {}
    for name, options in data.items():
        if isinstance(options, ObjectiveTerm):
            terms[name] = options
            continue
        where = f"train.objectives.{name}"
        if name not in OBJECTIVE_TERMS:
            raise ConfigError(f"{where}: unknown objective; choose among {', '.join(OBJECTIVE_TERMS)}")
        options = as_mapping(options, where, "{ratio: 1, weight: 1.0}")
        for key in options:
            if key not in TERM_KEYS[name]:
                raise ConfigError(f"{where}.{key}: unknown key; {name} takes {', '.join(TERM_KEYS[name])}")
        terms[name] = ObjectiveTerm(name, **options)
    return terms


# ---- training -----------------------------------------------------------------------------------
OPTIMIZERS = ("adamw", "muon")


@dataclass
class TrainConfig:
    """Optimisation and run settings for `flashlm train` (objectives and distillation extend it)."""

    data: str = ""  # token-shard directory (from `flashlm data prepare`)
    out: str = "runs/train"
    steps: int = 1000
    minutes: float = 0.0  # training-time budget (0: none; evaluation and saves not counted); ends at this or `steps`
    batch_size: int = 16  # sequences per rank per micro-step
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3  # AdamW's peak lr (with muon: of the parameters Muon does not step)
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' hidden matrices, AdamW for the rest)
    muon_lr: float = 0.02  # Muon's peak lr (the schedule scales it like lr)
    muon_momentum: float = 0.95
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    peak_flops: float = 0.0  # FLOP/s of one device for MFU; 0: measured by a short matmul at the start
    activation_checkpointing: bool = False
    distributed: str = "ddp"  # ddp | fsdp (used when launched by torchrun)
    seed: int = 1337
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    tensorboard: bool = False
    wandb: bool = False  # Weights & Biases: the same scalars as TensorBoard (pip install wandb)
    wandb_project: str = "flashlm"
    wandb_mode: str = ""  # offline | online | disabled; "": the WANDB_MODE variable, else offline
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
        need(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        need(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0: no clipping), got {self.grad_clip}")
        need(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "betas",
            f"must be two numbers in [0, 1), got {list(self.betas)}",
        )
        need(
            self.optimizer in OPTIMIZERS,
            "optimizer",
            f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}",
        )
        need(
            isinstance(self.peak_flops, (int, float)) and self.peak_flops >= 0,
            "peak_flops",
            f"must be FLOP/s >= 0 (0: measure), got {self.peak_flops!r}",
        )
        need(self.muon_lr > 0, "muon_lr", f"must be positive, got {self.muon_lr}")
        need(0 <= self.muon_momentum < 1, "muon_momentum", f"must be in [0, 1), got {self.muon_momentum}")
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
            self.wandb_mode in ("", "offline", "online", "disabled"),
            "wandb_mode",
            f"must be offline, online or disabled (empty: WANDB_MODE, else offline), got {self.wandb_mode!r}",
        )
        need(bool(str(self.wandb_project).strip()), "wandb_project", "must be a project name, got an empty one")
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
        check_keys(cls, data, "distill")
        cfg = cls(**coerce_fields(cls, data, "distill"))
        cfg.validate()
        return cfg
