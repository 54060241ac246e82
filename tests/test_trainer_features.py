"""What Hugging Face Trainer users reach for: GLUE from the hub (tested on a local folder in the
hub's layout), the best model at the end, early stopping, class weights."""

import contextlib
import functools
import json
import math
import os
import threading
import types

import datasets
import pytest
import torch
import torch.nn.functional as F

import data
import train_glue
import trainer
from conftest import GLUE, model_weights, read_log, train_in_process, write_rows

SHORT = ["--max_train_samples", 32, "--per_device_train_batch_size", 8, "--learning_rate", 1e-3]


@pytest.fixture(scope="module")
def hub_glue(tmp_path_factory):
    """MRPC laid out as nyu-mll/glue is (a parquet file per split, the configs in the README's
    YAML header, class names in the features), built from ../shared/glue's classic files."""
    root = tmp_path_factory.mktemp("hub-glue")
    task = data.glue_task("mrpc", GLUE, with_test=True)
    features = {"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                "label": datasets.ClassLabel(names=task["classes"]), "idx": datasets.Value("int32")}  # fmt: skip
    for split, hub_split in [("train", "train"), ("dev", "validation"), ("test", "test")]:
        table = data.read_split(task, split)
        rows = {"sentence1": table["#1 String"], "sentence2": table["#2 String"],
                "label": [int(v) for v in table["Quality"]] if split != "test" else [-1] * len(table),
                "idx": [int(i) for i in table["index"]] if split == "test" else list(range(len(table)))}  # fmt: skip
        dataset = datasets.Dataset.from_dict(rows, features=datasets.Features(features))
        dataset.to_parquet(str(root / "mrpc" / f"{hub_split}-00000-of-00001.parquet"))
    splits = "".join(
        f"\n  - split: {s}\n    path: mrpc/{s}-*" for s in ("train", "validation", "test")
    )
    (root / "README.md").write_text(
        f"---\nconfigs:\n- config_name: mrpc\n  data_files:{splits}\n---\n"
    )
    return str(root)


def test_glue_from_the_hubs_layout_gives_the_classic_files_run(tiny_model, hub_glue, tmp_path):
    runs = {}
    for source, flags in [("classic", ["--data_dir", GLUE]), ("hub", ["--dataset_name", hub_glue])]:
        out = str(tmp_path / source)
        args = ["--task_name", "mrpc", *flags, "--model_name_or_path", tiny_model, "--output_dir", out,
                "--max_steps", 2, "--do_predict", *SHORT]  # fmt: skip
        train_glue.run(train_glue.parse_args([str(a) for a in args]), threading.Event())
        runs[source] = out
    classic, hub = (json.load(open(f"{runs[s]}/final/eval.json")) for s in ("classic", "hub"))
    assert classic["eval"] == hub["eval"] and classic["step"] == hub["step"] == 2
    assert open(f"{runs['classic']}/MRPC.tsv").read() == open(f"{runs['hub']}/MRPC.tsv").read()
    logs = [
        [r | {"samples_per_second": 0, "eta_seconds": 0} for r in read_log(runs[s])]
        for s in ("classic", "hub")
    ]
    assert logs[0] == logs[1]  # the same losses, norms and scores at every step


def test_without_data_dir_and_offline_the_hub_is_one_clear_error(
    tiny_model, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at start
    monkeypatch.delenv("GLUE_DIR", raising=False)
    argv = [
        "--task_name",
        "rte",
        "--model_name_or_path",
        tiny_model,
        "--output_dir",
        str(tmp_path / "out"),
    ]
    with pytest.raises(SystemExit) as exit_:
        train_glue.main(argv)
    error = capsys.readouterr().err
    assert (
        exit_.value.code == 1
        and "error: cannot load nyu-mll/glue rte train (offline, give --data_dir)" in error
    )
    assert not (tmp_path / "out").exists()


SCORES = {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.95, 5: 0.6, 6: 0.7, 7: 0.8, 8: 0.99}  # accuracy by step


def scripted_run(tiny_model, out, monkeypatch, *extra):
    """Accuracy by step from SCORES, an evaluation and a checkpoint every step."""
    monkeypatch.setattr(
        train_glue, "evaluate", lambda *args: {"accuracy": SCORES[args[-1]], "f1": 0.0}
    )
    return train_in_process(tiny_model, out, *SHORT, "--max_steps", 8, "--eval_steps", 1,
                            "--save_steps", 1, *extra)  # fmt: skip


def test_the_best_model_is_final_and_the_last_evaluation_is_reported_beside(
    tiny_model, tmp_path, monkeypatch
):
    out = scripted_run(tiny_model, str(tmp_path / "run"), monkeypatch, "--load_best_model_at_end")
    record = json.load(open(f"{out}/final/eval.json"))
    assert record["step"] == 8 and record["eval"]["accuracy"] == 0.99  # the last: the honest one
    assert record["best"]["step"] == 8 and "optimistic" in record["best"]["note"]
    out = scripted_run(tiny_model, str(tmp_path / "f1"), monkeypatch, "--load_best_model_at_end",
                       "--metric_for_best_model", "eval_f1", "--max_steps", 7)  # fmt: skip
    record = json.load(open(f"{out}/final/eval.json"))
    assert record["best"]["step"] == 1 and record["eval"]["accuracy"] == 0.8  # f1 never improves
    best = torch.load(f"{out}/checkpoint-1.pt", weights_only=True)
    final = model_weights(f"{out}/final")
    assert all(torch.equal(final[k], best["model"][k]) for k in final)  # the rotation kept it
    assert sorted(os.listdir(out)) == [".lock", "checkpoint-1.pt", "checkpoint-6.pt", "checkpoint-7.pt",
                                       "final", "log.jsonl"]  # fmt: skip


def test_early_stopping_after_patience_evaluations_without_improvement(
    tiny_model, tmp_path, monkeypatch
):
    out = scripted_run(
        tiny_model, str(tmp_path / "run"), monkeypatch, "--early_stopping_patience", 3
    )
    record = json.load(open(f"{out}/final/eval.json"))
    assert record["step"] == 7 and record["early_stopped"] is True  # best at 4; 5, 6, 7 worse
    assert max(r["step"] for r in read_log(out)) == 7


def test_best_model_and_early_stopping_resume_exactly_after_a_kill_past_an_improvement(
    tiny_model_dropout, tmp_path, monkeypatch
):
    flags = ["--load_best_model_at_end", "--early_stopping_patience", 3]
    straight = scripted_run(tiny_model_dropout, str(tmp_path / "straight"), monkeypatch, *flags)
    out = str(tmp_path / "killed")
    real_save = trainer.save_checkpoint
    for kill_at in (4, 6):  # 4 improved the best, 6 did not: neither checkpoint lands

        def killed(output_dir, model, optimizer, scaler, progress, flags, kill_at=kill_at):
            if progress["step"] == kill_at:
                raise RuntimeError("killed")
            return real_save(output_dir, model, optimizer, scaler, progress, flags)

        monkeypatch.setattr(trainer, "save_checkpoint", killed)
        with pytest.raises(RuntimeError, match="killed"):
            scripted_run(
                tiny_model_dropout, out, monkeypatch, *flags, "--resume_from_checkpoint", "auto"
            )
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    scripted_run(tiny_model_dropout, out, monkeypatch, *flags, "--resume_from_checkpoint", "auto")
    a, b = (json.load(open(f"{run}/final/eval.json")) for run in (straight, out))
    assert a["step"] == b["step"] == 7 and a["best"] == b["best"] and a["best"]["step"] == 4
    weights = model_weights(f"{straight}/final"), model_weights(f"{out}/final")
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    logs = [
        [r | {"samples_per_second": 0, "eta_seconds": 0} for r in read_log(run)]
        for run in (straight, out)
    ]
    assert logs[0] == logs[1]


def test_a_metric_the_task_does_not_report_is_refused(tiny_model, tmp_path, capsys):
    argv = ["--task_name", "mrpc", "--data_dir", GLUE, "--model_name_or_path", tiny_model, "--output_dir",
            str(tmp_path / "out"), "--load_best_model_at_end", "--metric_for_best_model", "pearson"]  # fmt: skip
    with pytest.raises(SystemExit):
        train_glue.main(argv)
    assert (
        "error: --metric_for_best_model must be one of ['accuracy', 'f1']"
        in capsys.readouterr().err
    )


@pytest.mark.slow  # compiling even the tiny model takes a minute or two on 2 cores
def test_torch_compile_trains_the_same_steps_through_compiled_code(tiny_model, tmp_path):
    """The compiled model gives the eager one's losses and weights (to rounding: the kernels
    differ), its final/ has the plain names, and compiled graphs did run."""
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    runs = [train_in_process(tiny_model, str(tmp_path / f"run{i}"), *SHORT, "--max_steps", 3, *flags)
            for i, flags in enumerate([[], ["--torch_compile"]])]  # fmt: skip
    torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] > graphs_before
    losses = [[r["loss"] for r in read_log(run) if "loss" in r] for run in runs]
    assert len(losses[1]) == 3 and torch.allclose(
        torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-4
    )
    eager, compiled = (model_weights(f"{run}/final") for run in runs)
    assert eager.keys() == compiled.keys()
    assert all(torch.allclose(eager[k], compiled[k], atol=1e-5) for k in eager)


class Classifier(torch.nn.Linear):
    """A linear layer answering as a Hugging Face classifier does: an object with `.logits`."""

    def forward(self, input_ids):
        return types.SimpleNamespace(logits=super().forward(input_ids))


def test_a_weighted_step_is_the_weighted_sum_of_each_examples_gradient():
    """--class_weights multiplies each example's loss by its class's weight and divides by the
    step's examples, across micro-batches: not torch's weighted mean, which divides each
    micro-batch by its own weights' sum."""
    torch.manual_seed(0)
    model, x = Classifier(4, 3), torch.randn(10, 4)
    y, weights = torch.tensor([0, 1, 2, 2, 2, 0, 1, 2, 2, 2]), torch.tensor([1.0, 4.0, 0.5])
    expected = (
        sum(
            weights[y[i]]
            * torch.autograd.grad(
                F.cross_entropy(model(x[i : i + 1]).logits, y[i : i + 1]), model.weight
            )[0]
            for i in range(10)
        )
        / 10
    )
    before, optimizer = model.weight.detach().clone(), torch.optim.SGD(model.parameters(), lr=1.0)
    micro_batches = [{"input_ids": x[:3], "labels": y[:3]}, {"input_ids": x[3:], "labels": y[3:]}]
    loss_fn = functools.partial(train_glue.loss_sum, weights)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    trainer.train_step(
        model, micro_batches, 10, 1.0, loss_fn, optimizer, scaler, contextlib.nullcontext, math.inf
    )
    torch.testing.assert_close(before - model.weight.detach(), expected)


def test_balanced_class_weights_on_a_skewed_file_weigh_each_class_alike(
    tiny_model, tmp_path, capsys
):
    rows = [{"sentence": f"text {i}", "label": "rare" if i < 2 else "common"} for i in range(8)]
    path = write_rows(tmp_path / "train.jsonl", rows)
    argv = ["--train_file", path, "--validation_file", path, "--model_name_or_path", tiny_model,
            "--output_dir", str(tmp_path / "run"), "--max_steps", 1, "--class_weights", "balanced"]  # fmt: skip
    train_glue.run(train_glue.parse_args([str(a) for a in argv]), threading.Event())
    assert "8 examples (common / rare), 1 steps" in capsys.readouterr().out  # the weights' order
    weights = torch.load(tmp_path / "run/checkpoint-1.pt", weights_only=True)["flags"][
        "class_weights"
    ]
    assert weights == pytest.approx([8 / (2 * 6), 8 / (2 * 2)])  # 6 common, 2 rare: 6 x 2/3 = 2 x 2


def test_an_early_stop_between_checkpoints_saves_and_a_relaunch_redoes_nothing(
    tiny_model, tmp_path, monkeypatch
):
    """Patience 3 after step 4's best: the run stops at 7, which no --save_steps reaches."""
    out = scripted_run(tiny_model, str(tmp_path / "run"), monkeypatch, "--early_stopping_patience", 3,
                       "--save_steps", 100)  # fmt: skip
    assert os.path.exists(f"{out}/checkpoint-7.pt")
    log = open(f"{out}/log.jsonl").read()
    scripted_run(tiny_model, out, monkeypatch, "--early_stopping_patience", 3, "--save_steps", 100,
                 "--resume_from_checkpoint", "auto")  # fmt: skip
    assert open(f"{out}/log.jsonl").read() == log  # no step redone, nothing evaluated again


def test_a_resume_whose_best_checkpoint_is_gone_stops_before_writing_anything(
    tiny_model, tmp_path, monkeypatch
):
    from test_bad_input import snapshot

    out = scripted_run(
        tiny_model, str(tmp_path / "run"), monkeypatch, "--load_best_model_at_end", "--max_steps", 6
    )
    os.remove(f"{out}/checkpoint-4.pt")  # the best, kept by the rotation
    before = snapshot(out)
    with pytest.raises(
        ValueError, match="checkpoint-4.pt, the best evaluation's, is gone: put it back"
    ):
        scripted_run(
            tiny_model,
            out,
            monkeypatch,
            "--load_best_model_at_end",
            "--resume_from_checkpoint",
            "auto",
        )
    assert snapshot(out) == before


def test_a_finished_run_without_checkpoints_is_not_trained_again_over_its_final(
    tiny_model, tmp_path
):
    from test_bad_input import snapshot

    out = train_in_process(tiny_model, str(tmp_path / "run"), *SHORT, "--max_steps", 2)
    for name in os.listdir(out):
        if name.startswith("checkpoint-"):
            os.remove(os.path.join(out, name))
    before = snapshot(out)
    with pytest.raises(
        ValueError,
        match="holds a finished run \\(final/\\) and no checkpoint: train it again with --overwrite_output_dir",
    ):
        train_in_process(
            tiny_model, out, *SHORT, "--max_steps", 2, "--resume_from_checkpoint", "auto"
        )
    assert snapshot(out) == before


def test_a_hub_layout_folder_edited_or_moved_is_read_afresh(tmp_path):
    """datasets keys a hub-layout folder's cache by its name and config alone: an edited folder,
    another of the same name, or one whose files were renamed would be served the first rows."""

    def hub_folder(parent, rows):
        root = tmp_path / parent / "glue"
        (root / "rte").mkdir(parents=True, exist_ok=True)
        table = datasets.Dataset.from_dict({"sentence1": [f"s{i}" for i in range(rows)], "sentence2": ["t"] * rows,
                                            "label": [0] * rows, "idx": list(range(rows))})  # fmt: skip
        table.to_parquet(str(root / "rte" / "train-00000-of-00001.parquet"))
        (root / "README.md").write_text(
            "---\nconfigs:\n- config_name: rte\n  data_files:\n  - split: train\n    path: rte/train-*\n---\n"
        )
        return str(root)

    assert len(data.read_hub(hub_folder("a", 3), "rte", "train")) == 3
    assert len(data.read_hub(hub_folder("b", 5), "rte", "train")) == 5  # the same name elsewhere
    assert len(data.read_hub(hub_folder("a", 7), "rte", "train")) == 7  # edited in place
    # Renamed without a byte changed, files in the same order: the other file is now the split.
    folder = hub_folder("c", 7)
    datasets.Dataset.from_dict({"sentence1": ["s", "s"], "sentence2": ["t", "t"], "label": [0, 0],
                                "idx": [0, 1]}).to_parquet(folder + "/rte/u.parquet")  # fmt: skip
    assert len(data.read_hub(folder, "rte", "train")) == 7
    os.rename(folder + "/rte/train-00000-of-00001.parquet", folder + "/rte/s.parquet")
    os.rename(folder + "/rte/u.parquet", folder + "/rte/train-00001-of-00001.parquet")
    assert len(data.read_hub(folder, "rte", "train")) == 2
