"""Resuming as users do it: with changed settings, with another run's settings, after a failed
start or a failed write, into a folder another run left. One timeline, nothing lost, nothing
silently different."""

import json
import os
import shutil

import pytest
import torch
import transformers
from test_bad_input import snapshot

from conftest import model_weights, read_log, train_in_process

RUN = ["--max_train_samples", 64, "--per_device_train_batch_size", 8, "--learning_rate", 1e-3]
AUTO = ["--resume_from_checkpoint", "auto"]


def logged_steps(out):
    return [r["step"] for r in read_log(out) if "loss" in r]


def test_changed_settings_on_resume_are_applied_and_said(tiny_model, tmp_path, capsys):
    out = train_in_process(
        tiny_model, str(tmp_path / "run"), *RUN, "--max_steps", 4, "--save_steps", 2
    )
    capsys.readouterr()
    train_in_process(tiny_model, out, *RUN, "--max_steps", 8, "--save_steps", 2, "--learning_rate", 2e-3,
                     "--weight_decay", 0.1, "--logging_steps", 2, *AUTO)  # fmt: skip
    console = capsys.readouterr().out
    for change in ("learning_rate 0.001 -> 0.002", "max_steps 4 -> 8", "weight_decay 0.01 -> 0.1",
                   "logging_steps 1 -> 2"):  # fmt: skip
        assert change in console, console
    log = {r["step"]: r for r in read_log(out) if "lr" in r}
    # The new peak on the new 8-step linear schedule, at step 6: 2e-3 * (1 - 5 / 8).
    assert sorted(log) == [1, 2, 3, 4, 6, 8] and log[6]["lr"] == pytest.approx(2e-3 * (1 - 5 / 8))
    state = torch.load(f"{out}/checkpoint-8.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.1
    assert state["flags"]["learning_rate"] == 2e-3


@pytest.mark.parametrize(
    "change,message",
    [
        (["--per_device_train_batch_size", 16], "global_batch_size 8 -> 16"),
        (["--gradient_accumulation_steps", 2], "global_batch_size 8 -> 16"),
        (["--max_seq_length", 64], "train_data .*; changed: max_seq_length, max_steps, train_data"),
        (["--max_train_samples", 32], "train_data '64 examples"),
        (["--seed", 7], "seed 42 -> 7"),
        (["--bf16"], "bf16 False -> True"),
    ],
)
def test_a_resume_that_would_train_another_run_is_refused(
    tiny_model, tmp_path, change, message, bf16_anywhere
):
    out = train_in_process(tiny_model, str(tmp_path / "run"), *RUN, "--max_steps", 2)
    before = sorted(os.listdir(out)), open(f"{out}/log.jsonl").read()
    with pytest.raises(ValueError, match=f"cannot resume .*another run .*{message}"):
        train_in_process(tiny_model, out, *RUN, "--max_steps", 4, *AUTO, *change)
    assert (sorted(os.listdir(out)), open(f"{out}/log.jsonl").read()) == before


def test_another_model_or_task_is_another_run(tiny_model, tiny_model_dropout, tmp_path):
    out = train_in_process(tiny_model, str(tmp_path / "run"), *RUN, "--max_steps", 2)
    with pytest.raises(ValueError, match="another run .*model_name_or_path"):
        train_in_process(tiny_model_dropout, out, *RUN, "--max_steps", 4, *AUTO)
    with pytest.raises(ValueError, match="another run .*train_data .*changed: task_name"):
        train_in_process(tiny_model, out, *RUN, "--max_steps", 4, *AUTO, task="rte")


def test_a_resume_that_fails_while_loading_changes_nothing(tiny_model, tmp_path):
    """A model folder rewritten in place with another shape: the checkpoint no longer fits."""
    model = str(tmp_path / "model")
    shutil.copytree(tiny_model, model)
    out = train_in_process(model, str(tmp_path / "run"), *RUN, "--max_steps", 4, "--save_steps", 2)
    before = snapshot(out)
    config = transformers.BertConfig.from_pretrained(model)
    config.intermediate_size = 48
    transformers.BertForSequenceClassification(config).save_pretrained(model)
    with pytest.raises(ValueError, match="checkpoint-4.pt does not fit this model"):
        train_in_process(model, out, *RUN, "--max_steps", 6, *AUTO)
    assert snapshot(out) == before  # not a byte written, the lock file included


def test_each_step_is_logged_once_after_a_resume_whatever_the_log_holds(tiny_model, tmp_path):
    common = [*RUN, "--max_steps", 8, "--save_steps", 2]
    straight = train_in_process(tiny_model, str(tmp_path / "straight"), *common)
    out = train_in_process(tiny_model, str(tmp_path / "run"), *common)
    os.remove(f"{out}/checkpoint-8.pt")  # as if killed after step 8's log line, before its save
    with open(f"{out}/log.jsonl", "a") as f:
        f.write('{"oops": 1}\n["a list"]\n{"step": 7, "loss": 0.1}{"step"')  # junk, a cut line
    train_in_process(tiny_model, out, *common, *AUTO)
    assert logged_steps(out) == list(range(1, 9))

    def records(run):
        return [
            (r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in read_log(run) if "loss" in r
        ]

    assert records(out) == records(straight)


def test_relaunching_a_finished_run_logs_each_step_once_and_writes_final(tiny_model, tmp_path):
    out = train_in_process(tiny_model, str(tmp_path / "run"), *RUN, "--max_steps", 2)
    log = read_log(out)
    train_in_process(tiny_model, out, *RUN, "--max_steps", 2, *AUTO)  # finished: relaunched
    shutil.rmtree(f"{out}/final")  # killed after its last checkpoint, before final/
    train_in_process(tiny_model, out, *RUN, "--max_steps", 2, *AUTO)
    results = json.load(open(f"{out}/final/eval.json"))
    assert results["step"] == 2 and results["eval"] == log[-1]["eval"]
    assert read_log(out) == log and [(r["step"], "eval" in r) for r in log] == [
        (1, False),
        (2, False),
        (2, True),
    ]


def failing_save_pretrained(monkeypatch, failing_folder):
    real = transformers.PreTrainedModel.save_pretrained

    def save_pretrained(self, path, *args, **kwargs):
        if os.path.basename(path) == failing_folder + ".tmp":
            os.makedirs(path, exist_ok=True)
            open(os.path.join(path, "model.safetensors"), "wb").write(b"half")
            raise OSError(28, "No space left on device")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_pretrained)


def test_a_failing_write_of_final_keeps_the_previous_one(tiny_model, tmp_path, monkeypatch):
    out = train_in_process(tiny_model, str(tmp_path / "run"), *RUN, "--max_steps", 2)
    previous = model_weights(f"{out}/final")
    failing_save_pretrained(monkeypatch, "final")
    with pytest.raises(OSError, match=f"could not write {out}/final .*No space left on device"):
        train_in_process(tiny_model, out, *RUN, "--max_steps", 4, *AUTO)
    assert model_weights(f"{out}/final").keys() == previous.keys()  # whole, and loadable
    monkeypatch.undo()
    train_in_process(tiny_model, out, *RUN, "--max_steps", 4, *AUTO)
    assert json.load(open(f"{out}/final/eval.json"))["step"] == 4
    assert not os.path.exists(f"{out}/final.tmp")


def test_a_crash_between_the_two_renames_of_final_loses_nothing(tiny_model, tmp_path, monkeypatch):
    out = train_in_process(tiny_model, str(tmp_path / "run"), *RUN, "--max_steps", 2)
    os.rename(f"{out}/final", f"{out}/final.old")  # the first rename done, the second not
    previous = json.load(open(f"{out}/final.old/eval.json"))
    failing_save_pretrained(monkeypatch, "final")  # and the next save fails too
    with pytest.raises(OSError, match="No space left on device"):
        train_in_process(tiny_model, out, *RUN, "--max_steps", 3, *AUTO)
    assert json.load(open(f"{out}/final/eval.json")) == previous  # put back, whole
    assert not os.path.exists(f"{out}/final.old")


def test_a_failing_predictions_write_keeps_the_previous_file(tiny_model, tmp_path, monkeypatch):
    out = train_in_process(
        tiny_model, str(tmp_path / "run"), *RUN, "--max_steps", 2, "--do_predict"
    )
    previous = open(f"{out}/MRPC.tsv").read()
    real_replace = os.replace

    def replace(src, dst):
        if dst.endswith("MRPC.tsv"):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="could not write .*MRPC.tsv \\(.*Input/output error\\)"):
        train_in_process(tiny_model, out, *RUN, "--max_steps", 3, "--do_predict", *AUTO)
    assert open(f"{out}/MRPC.tsv").read() == previous
    assert not os.path.exists(f"{out}/MRPC.tsv.tmp")
    assert json.load(open(f"{out}/final/eval.json"))["step"] == 2  # not marked complete


def test_overwrite_deletes_exactly_what_the_trainer_writes(tiny_model, tmp_path):
    out = train_in_process(tiny_model, str(tmp_path / "run"), *RUN, "--max_steps", 4, "--save_steps", 2,
                           "--do_predict")  # fmt: skip
    os.makedirs(f"{out}/final.tmp")  # what a crash mid-write leaves
    for mine in ("notes.txt", "analysis", "MRPC.tsv.bak"):
        open(f"{out}/{mine}", "w").write("the user's")
    train_in_process(tiny_model, out, *RUN, "--max_steps", 2, "--overwrite_output_dir")
    assert sorted(os.listdir(out)) == [".lock", "MRPC.tsv.bak", "analysis", "checkpoint-2.pt", "final",
                                       "log.jsonl", "notes.txt"]  # fmt: skip
    assert logged_steps(out) == [1, 2]
