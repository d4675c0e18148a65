"""The demo's report: the teacher / distilled / scratch comparison and its verdicts (the full run is `make demo`)."""

from __future__ import annotations

import json

from flashlm.demo import Stage, model_config, verdicts, write_report


def stage(name: str, loss: float, params: int, speed: float) -> Stage:
    results = {
        "parameters": params,
        "steps": 80,
        "val_loss": loss,
        "val_ppl": 2.718**loss,
        "val_bpb": loss / 3,
        "mlm_acc": 0.6,
        "nsp_acc": 0.9,
        "decode_tok_s": speed,
        "checkpoint": f"{name}/latest",
    }
    return Stage(name, seconds=10.0, results=results)


def test_verdicts_say_whether_the_story_holds():
    teacher = stage("teacher", 0.68, 4_000_000, 160)
    distilled = stage("distilled student", 0.80, 1_600_000, 480)
    scratch = stage("scratch student", 0.83, 1_600_000, 480)
    good = verdicts(teacher, distilled, scratch)
    assert good[0].startswith("teacher beats both students: yes") and "distilled student beats" in good[1]
    assert "yes" in good[1] and "3.0x as fast" in good[2] and "40% of its parameters" in good[2]
    bad = verdicts(teacher, scratch, distilled)  # the students swapped: distillation lost
    assert "NO" in bad[1]
    worse_teacher = verdicts(stage("teacher", 0.9, 4_000_000, 160), distilled, scratch)
    assert worse_teacher[0].startswith("teacher beats both students: NO")


def test_report_holds_the_table_verdicts_and_samples(tmp_path):
    data = Stage("data", 3.0, {"documents": 100, "train_tokens": 5000, "vocab_size": 512, "held_out_documents": 10})
    models = [
        stage("teacher", 0.68, 4_000_000, 160),
        stage("distilled student", 0.8, 1_600_000, 480),
        stage("scratch student", 0.83, 1_600_000, 480),
    ]
    path = write_report(tmp_path, data, models, ["Once upon a time ..."], ["a verdict"])
    text = path.read_text()
    assert "| distilled student | 1,600,000 | 80 | 10 | 0.800 |" in text and "| decode tok/s |" in text
    assert "- a verdict" in text and "- Once upon a time ..." in text and "(scratch_student/loss.png)" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["teacher", "distilled student", "scratch student"]


def test_the_student_is_a_shallow_copy_of_the_teachers_shape():
    teacher, student = model_config(1000), model_config(1000, student=True)
    assert (student.d_model, student.vocab_size) == (teacher.d_model, teacher.vocab_size)
    assert student.n_layers == 2 < teacher.n_layers and list(student.layer_types) == ["local", "global"]
