import json
import math

from transformers import pipeline

from conftest import GLUE, minilm_path, run_cli


def test_readme_command_under_torchrun_on_real_minilm_and_mrpc(tmp_path):
    """The README's command (fp32, real MiniLM, its MRPC recipe) on a slice of real MRPC, launched
    the way the README launches several GPUs (torchrun, 2 processes): DDP runs end to end too."""
    out = tmp_path / "mrpc"
    readme = ["--task_name", "mrpc", "--data_dir", GLUE, "--model_name_or_path", minilm_path(),
              "--output_dir", out, "--learning_rate", "1e-4", "--warmup_ratio", "0.1"]  # fmt: skip
    slice_ = [
        "--max_train_samples",
        192,
        "--max_eval_samples",
        64,
        "--num_train_epochs",
        1,
        "--logging_steps",
        1,
    ]
    run_cli(readme + slice_, torchrun=2, timeout=240)
    results = json.loads((out / "final" / "eval.json").read_text())
    assert results["step"] == 3 and results["skipped_steps"] == 0
    assert 0.0 <= results["eval"]["accuracy"] <= 1.0 and not math.isnan(results["eval"]["f1"])
    assert results["train_samples_per_second"] > 0
    classify = pipeline("text-classification", model=str(out / "final"))
    prediction = classify(
        {"text": "The cat sat on the mat.", "text_pair": "A cat was sitting on the mat."}
    )
    assert prediction["label"] in ("equivalent", "not_equivalent") and 0 <= prediction["score"] <= 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["samples_per_second"] > 0 for r in log if "loss" in r)
