"""Configuration: presets, YAML, overrides and one-line validation errors."""

import pytest

from flashlm.config import (
    ModelConfig,
    RunConfig,
    apply_overrides,
    get_preset,
    load_run_config,
    save_yaml,
)
from flashlm.errors import ConfigError


def test_yaml_round_trip_with_preset_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: nano\n  n_layers: 3\ntrain:\n  steps: 7\n  seq_len: 64\n")
    cfg = load_run_config(path, ["model.d_model=128", "train.lr=1e-3", "train.compile=true"])
    assert cfg.model.n_layers == 3 and cfg.model.d_model == 128 and cfg.model.head_dim == 32
    assert cfg.train.steps == 7 and cfg.train.lr == 1e-3 and cfg.train.compile is True
    save_yaml(cfg, tmp_path / "saved.yaml")
    again = load_run_config(tmp_path / "saved.yaml")
    assert again == cfg


def test_gemma_defaults():
    cfg = get_preset("tiny")
    assert cfg.flavour == "gemma" and cfg.qk_norm and cfg.tie_embeddings
    assert cfg.layer_types == ["local"] * 5 + ["global"]
    assert cfg.rope_base_local == 10_000 and cfg.rope_base_global == 1_000_000


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"d_model": 100, "n_heads": 3}, "model.d_model"),
        ({"n_kv_heads": 3}, "model.n_kv_heads"),
        ({"sliding_window": 4096}, "model.sliding_window"),
        ({"flavour": "gpt"}, "model.flavour"),
        ({"layer_pattern": "LX"}, "model.layer_pattern"),
        ({"n_layers": 0}, "model.n_layers"),
    ],
)
def test_invalid_model_values_name_the_key(changes, key):
    data = {**get_preset("nano").to_dict(), **changes}
    data.pop("head_dim")
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(data)
    message = str(info.value)
    assert message.startswith(key) and "\n" not in message


def test_unknown_keys_are_refused_with_a_hint():
    with pytest.raises(ConfigError, match=r"model\.n_layer: unknown key \(did you mean n_layers\?\)"):
        RunConfig.from_dict({"model": {"n_layer": 2}})
    with pytest.raises(ConfigError, match=r"train\.stepz: unknown key"):
        RunConfig.from_dict({"train": {"stepz": 2}})
    with pytest.raises(ConfigError, match="unknown preset"):
        RunConfig.from_dict({"model": {"preset": "huge"}})


def test_bad_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["model.n_layers"])
    with pytest.raises(ConfigError, match="section.name"):
        apply_overrides({}, ["n_layers=2"])
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(bad)


def test_a_config_that_is_not_a_mapping_is_one_line(tmp_path):
    for text in ("just a string\n", "- a\n- list\n"):
        path = tmp_path / "top.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match="top level must be a mapping"):
            load_run_config(path)
    with pytest.raises(ConfigError, match="model: must be a mapping"):
        RunConfig.from_dict({"model": [1, 2]})
    with pytest.raises(ConfigError, match="train: must be a mapping"):
        RunConfig.from_dict({"model": {"preset": "nano"}, "train": "fast"})
    from flashlm.errors import CheckpointError
    from flashlm.model.transformer import FlashLM

    (tmp_path / "config.json").write_text("[1, 2]")  # a model folder's config.json
    with pytest.raises(CheckpointError, match="config.json: unreadable model config .*must be a mapping"):
        FlashLM.load_config(tmp_path)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.lr=.inf", r"train\.lr: must be a finite number"),
        ("train.weight_decay=.nan", r"train\.weight_decay: must be a finite number"),
        ("model.init_std=.inf", r"model\.init_std: must be a finite number"),
        ("train.masking.rate=.nan", r"train\.masking\.rate: must be a finite number"),
        ("train.betas=[2, 3]", r"train\.betas: must be two numbers in \[0, 1\)"),
        ("train.weight_decay=-1", r"train\.weight_decay: must be >= 0"),
        ("train.grad_clip=-1", r"train\.grad_clip: must be >= 0"),
    ],
)
def test_numbers_that_would_train_to_nan_are_refused(override, match):
    """inf and NaN (YAML's .inf / .nan) and out-of-range optimizer settings stop before any training."""
    with pytest.raises(ConfigError, match=match):
        load_run_config(None, ["model.preset=nano", override])


def test_an_infinite_distillation_temperature_is_refused():
    with pytest.raises(ConfigError, match=r"distill\.temperature: must be a finite number"):
        load_run_config(None, ["model.preset=nano", "distill.teacher=t", "distill.temperature=.inf"])


def test_seq_len_cannot_exceed_context():
    with pytest.raises(ConfigError, match="train.seq_len"):
        RunConfig.from_dict({"model": {"preset": "nano"}, "train": {"seq_len": 1024}})


def test_masking_and_objectives_are_typed_and_nested_overrides_reach_them(tmp_path):
    from flashlm.config import MaskingConfig, ObjectiveTerm, TrainConfig

    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  preset: nano\ntrain:\n  seq_len: 64\n  objective: hybrid\n"
        "  objectives:\n    clm: {ratio: 1}\n    mlm: {ratio: 3, nsp_weight: 0.5}\n"
        "  masking:\n    rate: 0.3\n    max_span: 3\n"
    )
    cfg = load_run_config(
        path, ["train.masking.rate_end=0.15", "train.objectives.mlm.nsp_weight=1", "train.objectives.nsp.ratio=2"]
    )
    assert cfg.train.masking == MaskingConfig(rate=0.3, rate_end=0.15, max_span=3)
    assert list(cfg.train.objectives) == ["clm", "mlm", "nsp"]
    assert cfg.train.objectives["mlm"] == ObjectiveTerm("mlm", ratio=3, nsp_weight=1.0)
    assert cfg.train.objectives["nsp"].nsp_weight == 1.0 and cfg.train.objectives["clm"].nsp_weight == 0.0
    saved = cfg.to_dict()["train"]
    assert saved["masking"]["max_span"] == 3 and saved["objectives"]["clm"] == {"ratio": 1, "weight": 1.0}
    assert RunConfig.from_dict(cfg.to_dict()) == cfg  # round trip through plain mappings
    replaced = load_run_config(path, ["train.masking={next_token: false}"])  # a whole mapping replaces
    assert replaced.train.masking == MaskingConfig(next_token=False)
    assert TrainConfig(masking={"rate": "0.2"}).masking.rate == 0.2  # strings as YAML may give them
    with pytest.raises(ConfigError, match=r"^train\.masking\.rate: must be in \(0, 1\)"):
        load_run_config(path, ["train.masking.rate=2"])
    with pytest.raises(ConfigError, match=r"^train\.objectives\.clm\.nsp_weight: unknown key"):
        load_run_config(path, ["train.objectives.clm.nsp_weight=1"])
    with pytest.raises(ConfigError, match=r"train\.seq_len is not a mapping"):
        apply_overrides({"train": {"seq_len": 64}}, ["train.seq_len.x=1"])
    with pytest.raises(ConfigError, match=r"^train\.objectives\.mlm\.ratio"):
        ObjectiveTerm("mlm", ratio=0)


def test_config_does_not_import_training():
    import subprocess
    import sys

    code = "import sys, flashlm.config; print(any(m.startswith('flashlm.training') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
