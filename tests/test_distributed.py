import json
import math

import torch

from conftest import GLUE, model_weights, run_cli


def test_ddp_two_processes_match_one_process_and_evaluate_every_example_once(tiny_model, tmp_path):
    """37 examples at global batch 8: a short last step; 41 dev examples: not divisible by 2 ranks."""
    common = [
        "--task_name",
        "mrpc",
        "--data_dir",
        GLUE,
        "--model_name_or_path",
        tiny_model,
        "--num_train_epochs",
        2,
        "--max_train_samples",
        37,
        "--max_eval_samples",
        41,
        "--learning_rate",
        1e-3,
        "--do_predict",
    ]
    single = run_cli(
        common + ["--output_dir", tmp_path / "single", "--per_device_train_batch_size", 8]
    )
    double = run_cli(
        common + ["--output_dir", tmp_path / "ddp", "--per_device_train_batch_size", 4], torchrun=2
    )
    assert single.returncode == double.returncode == 0
    one, two = (
        model_weights(tmp_path / "single" / "final"),
        model_weights(tmp_path / "ddp" / "final"),
    )
    assert any(not torch.equal(one[k], model_weights(tiny_model)[k]) for k in one)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    results = [
        json.loads((tmp_path / run / "results.json").read_text()) for run in ("single", "ddp")
    ]
    assert results[0]["eval_samples"] == results[1]["eval_samples"] == 41
    assert results[0]["final"] == results[1]["final"] and not math.isnan(
        results[1]["final"]["accuracy"]
    )
    assert results[0]["global_step"] == results[1]["global_step"] == 10
    predictions = [
        (tmp_path / run / "MRPC.tsv").read_text().splitlines() for run in ("single", "ddp")
    ]
    with open(f"{GLUE}/MRPC/test.tsv", encoding="utf-8-sig") as f:
        test_ids = [line.split("\t")[0] for line in f.read().splitlines()[1:]]
    assert [
        line.split("\t")[0] for line in predictions[1][1:]
    ] == test_ids  # every test row once, in order
    assert predictions[0] == predictions[1]
