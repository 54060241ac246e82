import json
import math

from transformers import pipeline

from conftest import GLUE, run_cli


def test_readme_command_under_torchrun_on_real_minilm_and_mrpc(tmp_path):
    """The README's command (bf16, default model) on a slice of real MRPC, launched the way the
    README launches several GPUs (torchrun, 2 processes), so that DDP runs end to end too."""
    out = tmp_path / "mrpc"
    run_cli(
        [
            "--task_name",
            "mrpc",
            "--data_dir",
            GLUE,
            "--output_dir",
            out,
            "--bf16",
            "--max_train_samples",
            192,
            "--num_train_epochs",
            1,
            "--logging_steps",
            1,
        ],
        torchrun=2,
        timeout=240,
    )
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 3
    assert 0.0 <= results["final"]["accuracy"] <= 1.0 and not math.isnan(results["final"]["f1"])
    assert results["train_samples_per_second"] > 0
    classify = pipeline("text-classification", model=str(out / "best"))
    prediction = classify(
        {"text": "The cat sat on the mat.", "text_pair": "A cat was sitting on the mat."}
    )
    assert prediction["label"] in ("equivalent", "not_equivalent") and 0 <= prediction["score"] <= 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["samples_per_second"] > 0 for r in log if "loss" in r)
