"""What a run tells while it runs: each log record to a `report` function (TensorBoard with
--report_to tensorboard), where the run is and how long is left, and how far tokenizing is."""

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import types

import pytest
import torch
from test_bad_input import snapshot

import data
import train_glue
import trainer
from conftest import (
    GLUE,
    ROOT,
    assert_tensorboard_shows_the_log,
    minilm_path,
    read_log,
    run_cli,
    write_rows,
)

RUN = ["--max_train_samples", 48, "--per_device_train_batch_size", 8, "--learning_rate", 1e-3]


KILLED_AT_6 = """
import os, signal, sys
import train_glue, trainer
save = trainer.save_checkpoint
def kill_before_saving_6(output_dir, model, optimizer, scaler, progress, flags):
    if progress["step"] == 6:  # its log records are written: kill -9 before its checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
    save(output_dir, model, optimizer, scaler, progress, flags)
trainer.save_checkpoint = kill_before_saving_6
train_glue.main(sys.argv[1:])
"""


def test_tensorboard_shows_what_the_log_holds_each_step_once_after_a_kill(tiny_model, tmp_path):
    """A kill -9 right after step 6 is logged: TensorBoard has it (flushed), and the resume from
    checkpoint-4 redoes steps 5 and 6, which then show once (purged)."""
    out = str(tmp_path / "run")
    args = ["--task_name", "mrpc", "--data_dir", GLUE, "--model_name_or_path", tiny_model,
            "--output_dir", out, *RUN, "--max_steps", 8, "--save_steps", 2, "--eval_steps", 3,
            "--logging_steps", 1, "--report_to", "tensorboard", "--resume_from_checkpoint", "auto"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AT_6, *map(str, args)], env=env, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL and max(r["step"] for r in read_log(out)) == 6
    assert sorted(os.listdir(out)) == [
        ".lock",
        "checkpoint-2.pt",
        "checkpoint-4.pt",
        "log.jsonl",
        "runs",
    ]
    shown_before = assert_tensorboard_shows_the_log(out)  # nothing lost to the kill
    assert [step for step, _ in shown_before["train/loss"]] == [1, 2, 3, 4, 5, 6]
    run_cli(args)  # resumes from checkpoint-4
    shown = assert_tensorboard_shows_the_log(out)
    assert [step for step, _ in shown["train/loss"]] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [step for step, _ in shown["eval/accuracy"]] == [3, 6, 8]


def test_without_tensorboard_installed_the_flag_is_one_error_before_any_write(
    tiny_model, tmp_path, monkeypatch, capsys
):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))  # fmt: skip
    out = tmp_path / "run"
    out.mkdir()
    before = snapshot(out)
    argv = ["--task_name", "mrpc", "--data_dir", GLUE, "--model_name_or_path", tiny_model,
            "--output_dir", str(out), "--report_to", "tensorboard"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_status:
        train_glue.main(argv)
    assert exit_status.value.code == 1
    assert capsys.readouterr().err == "error: --report_to tensorboard: pip install tensorboard\n"
    assert snapshot(out) == before


def test_each_line_says_where_the_run_is_and_how_long_is_left(tmp_path, monkeypatch):
    """The pace is measured from the end of a launch's second step: the first steps compile and
    fill caches. Here they take 50 s each, every later step 2 s: 10 steps leave 2 s per step."""
    clock = [0.0]
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    inputs, targets, records = torch.randn(64, 4), torch.randn(64, 1), []

    def make_batch(ids):
        clock[0] += 50.0 if len(records) < 2 else 2.0
        return {"x": inputs[ids], "y": targets[ids]}

    def report(record):
        records.append(record)

    model = torch.nn.Linear(4, 1)
    optimizer = trainer.build_optimizer(model, 1e-2, 0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    progress, _ = trainer.start_or_resume(model, optimizer, scaler, None, {"seed": 0}, [])
    trainer.train(
        model, optimizer, scaler, progress,
        plan=lambda epoch: trainer.epoch_plan(64, epoch, batch_size=8, accumulation=1, seed=0, lengths=None),
        make_batch=make_batch,
        loss_fn=lambda m, b: (torch.nn.functional.mse_loss(m(b["x"]), b["y"], reduction="sum"), 8),
        learning_rate=lambda updates: 1e-2, autocast=contextlib.nullcontext,
        clip=1.0, evaluate=lambda model, step: {}, output_dir=str(tmp_path), flags={"seed": 0},
        total_steps=10, logging_steps=1, eval_steps=None, save_steps=None,
        stop_requested=threading.Event(), report=report,
    )  # fmt: skip
    etas = [r["eta_seconds"] for r in records if "loss" in r]
    assert etas == [None, None] + [2.0 * (10 - step) for step in range(3, 11)]
    lines, args = (
        [],
        train_glue.parse_args(
            ["--task_name", "rte", "--model_name_or_path", "m", "--output_dir", "o"]
        ),
    )
    monkeypatch.setattr("builtins.print", lambda *values, **_: lines.append("  ".join(values)))
    report = train_glue.reporter(args, total_steps=10, first_step=0)
    report(records[2])
    assert lines[0].startswith("step 3/10  loss ") and lines[0].endswith("  eta 0:00:14")
    report({"step": 10, "eval": {"accuracy": 0.5}})
    assert lines[1] == "step 10/10:  accuracy 0.5"


def test_none_means_never_for_logging_evaluation_and_saving_but_the_last_step(tmp_path):
    inputs, targets = torch.randn(64, 4), torch.randn(64, 1)
    model = torch.nn.Linear(4, 1)
    optimizer = trainer.build_optimizer(model, 1e-2, 0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    evaluated = []
    for every in (None, 0):
        out = str(tmp_path / f"every-{every}")
        progress, _ = trainer.start_or_resume(model, optimizer, scaler, out, {"seed": 0}, [])
        trainer.train(
            model, optimizer, scaler, progress,
            plan=lambda epoch: trainer.epoch_plan(64, epoch, batch_size=8, accumulation=1, seed=0, lengths=None),
            make_batch=lambda ids: {"x": inputs[ids], "y": targets[ids]},
            loss_fn=lambda m, b: (torch.nn.functional.mse_loss(m(b["x"]), b["y"], reduction="sum"), 8),
            learning_rate=lambda updates: 1e-2, autocast=contextlib.nullcontext,
            clip=1.0, evaluate=lambda model, step: evaluated.append(step) or {"s": step},
            output_dir=out, flags={"seed": 0}, total_steps=12, logging_steps=every, eval_steps=every,
            save_steps=every, stop_requested=threading.Event(), report=lambda record: None,
        )  # fmt: skip
        assert [r["step"] for r in read_log(out)] == [12, 12]
        assert [n for n in sorted(os.listdir(out)) if n.startswith("checkpoint")] == [
            "checkpoint-12.pt"
        ]
    assert evaluated == [12, 12]


def test_tokenizing_a_big_split_shows_how_far_it_is(tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    rows = [{"sentence": f"{tmp_path.name} row {i}", "label": str(i % 2)} for i in range(40)]
    path = write_rows(tmp_path / "train.jsonl", rows)  # new text: nothing in the cache
    task = data.own_task(path, path, None)
    table, tokenizer = data.read_split(task, "train"), AutoTokenizer.from_pretrained(minilm_path())
    capsys.readouterr()
    data.tokenize(table, task, "train", tokenizer, 64)
    assert "train: 100%" not in capsys.readouterr().err  # 40 rows take no time
    monkeypatch.setattr(data, "PROGRESS_ROWS", 40)
    data.tokenize(table, task, "train", tokenizer, 63)  # another length: not from the cache
    assert "train: 100%|" in capsys.readouterr().err
