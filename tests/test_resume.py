"""Resuming as users do it: from an older checkpoint, with changed settings, into a new folder,
after a failed start or a failed write. One timeline, nothing lost, nothing silently different."""

import glob
import json
import os
import shutil

import pytest
import torch
import transformers

import trainer
from conftest import model_weights, read_log, train_in_process

RUN = ["--max_train_samples", 64, "--per_device_train_batch_size", 8, "--learning_rate", 1e-3]


def logged_steps(out):
    return [r["step"] for r in read_log(out) if "loss" in r]


def test_resuming_from_an_older_checkpoint_retires_the_abandoned_timeline(
    tiny_model, tmp_path, capsys
):
    out = train_in_process(tiny_model, str(tmp_path / "run"), *RUN, "--max_steps", 8,
                           "--save_steps", 2, "--save_total_limit", 10, "--do_predict")  # fmt: skip
    abandoned_final = model_weights(f"{out}/final")
    # Back to step 4 with another learning rate: a new timeline from there.
    train_in_process(tiny_model, out, *RUN, "--max_steps", 6, "--save_steps", 2, "--learning_rate", 5e-4,
                     "--save_total_limit", 10, "--resume_from_checkpoint", f"{out}/checkpoint-4")  # fmt: skip
    console = capsys.readouterr().out
    assert "moved to" in console and "abandoned-after-step-4" in console
    [abandoned] = glob.glob(f"{out}/abandoned-after-step-4-*")
    retired = sorted(os.listdir(abandoned))
    assert retired == [
        "MRPC.tsv",
        "best",
        "checkpoint-6",
        "checkpoint-8",
        "final",
        "log.jsonl",
        "results.json",
    ]
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == [
        "checkpoint-2", "checkpoint-4", "checkpoint-6"]  # fmt: skip
    assert not os.path.exists(f"{out}/MRPC.tsv")  # this run did not ask for predictions
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]  # each step once, from the current timeline
    assert [r["lr"] for r in read_log(out) if r.get("step", 0) > 4 and "lr" in r][0] < 5e-4
    # A later 'auto' continues the new timeline, never the abandoned one.
    train_in_process(tiny_model, out, *RUN, "--max_steps", 6, "--save_steps", 2, "--learning_rate", 5e-4,
                     "--save_total_limit", 10, "--resume_from_checkpoint", "auto")  # fmt: skip
    assert "resuming from" in capsys.readouterr().out
    assert json.load(open(f"{out}/results.json"))["global_step"] == 6
    final = model_weights(f"{out}/final")
    assert any(not torch.equal(final[k], abandoned_final[k]) for k in final)


def test_changed_settings_on_resume_are_applied_and_said(tiny_model, tmp_path, capsys):
    out = train_in_process(
        tiny_model, str(tmp_path / "run"), *RUN, "--max_steps", 4, "--save_steps", 2
    )
    capsys.readouterr()
    train_in_process(tiny_model, out, *RUN, "--max_steps", 8, "--save_steps", 2, "--learning_rate", 2e-3,
                     "--weight_decay", 0.1, "--logging_steps", 2, "--resume_from_checkpoint", "latest")  # fmt: skip
    console = capsys.readouterr().out
    for flag in ("--learning_rate changed from 0.001 to 0.002", "--max_steps changed from 4 to 8",
                 "--weight_decay changed from 0.01 to 0.1", "--logging_steps changed from 1 to 2"):  # fmt: skip
        assert flag in console, console
    log = {r["step"]: r for r in read_log(out) if "lr" in r}
    # The new peak on the new 8-step linear schedule, at step 5: 2e-3 * (1 - 4 / 8).
    assert sorted(log) == [1, 2, 3, 4, 6, 8] and log[6]["lr"] == pytest.approx(2e-3 * (1 - 5 / 8))
    state = torch.load(f"{out}/checkpoint-8/state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.1
    assert state["settings"]["learning_rate"] == 2e-3


def test_resuming_into_a_new_folder_starts_best_model_tracking_afresh(tiny_model, tmp_path, capsys):
    out = train_in_process(tiny_model, str(tmp_path / "run"), *RUN, "--max_steps", 4, "--save_steps", 2,
                           "--eval_steps", 2)  # fmt: skip
    new = str(tmp_path / "new")
    train_in_process(tiny_model, new, *RUN, "--max_steps", 6, "--save_steps", 2, "--eval_steps", 2,
                     "--resume_from_checkpoint", f"{out}/checkpoint-4")  # fmt: skip
    assert "best/ does not hold step" in capsys.readouterr().out
    results = json.load(open(f"{new}/results.json"))
    assert results["best_step"] == 6 and json.load(open(f"{new}/best/eval.json"))["step"] == 6


def test_a_resume_that_fails_while_loading_changes_nothing(
    tiny_model, tiny_model_dropout, tmp_path
):
    out = train_in_process(
        tiny_model, str(tmp_path / "run"), *RUN, "--max_steps", 4, "--save_steps", 2
    )
    before = open(f"{out}/log.jsonl").read()
    broken = str(tmp_path / "other-shape")
    config = transformers.BertConfig.from_pretrained(tiny_model)
    config.intermediate_size = 48  # the same tokenizer, weights of another shape
    transformers.BertForSequenceClassification(config).save_pretrained(broken)
    transformers.AutoTokenizer.from_pretrained(tiny_model).save_pretrained(broken)
    with pytest.raises(ValueError, match="the checkpoint does not fit this model"):
        train_in_process(broken, out, *RUN, "--max_steps", 4, "--resume_from_checkpoint", f"{out}/checkpoint-2",
                         "--ignore_checkpoint_mismatch")  # fmt: skip
    assert open(f"{out}/log.jsonl").read() == before
    assert not glob.glob(f"{out}/abandoned-*")


def test_a_position_past_the_end_of_the_new_epoch_continues_with_the_next_one(
    tiny_model, tmp_path, capsys
):
    """The hang of issue 9: 64 examples make 8 steps an epoch; resumed on 24 (3 steps) at step 5."""
    out = train_in_process(
        tiny_model, str(tmp_path / "run"), *RUN, "--max_steps", 5, "--save_steps", 5
    )
    train_in_process(tiny_model, out, *RUN, "--max_train_samples", 24, "--max_steps", 9,
                     "--resume_from_checkpoint", "latest", "--ignore_checkpoint_mismatch")  # fmt: skip
    assert "continuing with the next epoch" in capsys.readouterr().out
    assert logged_steps(out) == list(range(1, 10))


def failing_save_pretrained(monkeypatch, failing_folder):
    real = transformers.PreTrainedModel.save_pretrained

    def save_pretrained(self, path, *args, **kwargs):
        if os.path.basename(path) == failing_folder + ".tmp":
            os.makedirs(path, exist_ok=True)
            open(os.path.join(path, "model.safetensors"), "wb").write(b"half")
            raise OSError(28, "No space left on device")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_pretrained)


@pytest.mark.parametrize("folder", ["best", "final"])
def test_a_failing_write_of_best_or_final_is_one_error_and_the_next_run_recovers(
    tiny_model, tmp_path, monkeypatch, folder
):
    out = str(tmp_path / "run")
    train_in_process(tiny_model, out, *RUN, "--max_steps", 2, "--save_steps", 1, "--eval_steps", 1)
    best_before = model_weights(f"{out}/best")
    improving = iter(range(2, 100))  # above any real accuracy: every evaluation a new best
    monkeypatch.setattr(
        trainer, "evaluate", lambda *args, **kwargs: {"accuracy": next(improving), "f1": 0.5}
    )
    failing_save_pretrained(monkeypatch, folder)
    args = [*RUN, "--max_steps", 4, "--save_steps", 1, "--eval_steps", 1, "--learning_rate", 1e-2]
    with pytest.raises(
        OSError, match=f"could not write {out}/{folder} \\(No space left on device\\)"
    ):
        train_in_process(tiny_model, out, *args, "--resume_from_checkpoint", "auto")
    assert not os.path.exists(f"{out}/{folder}.tmp")
    assert model_weights(f"{out}/best").keys() == best_before.keys()  # still loadable
    monkeypatch.undo()
    train_in_process(tiny_model, out, *args, "--resume_from_checkpoint", "auto")
    assert json.load(open(f"{out}/results.json"))["global_step"] == 4


def test_a_failing_results_write_keeps_the_previous_file(tiny_model, tmp_path, monkeypatch):
    out = train_in_process(tiny_model, str(tmp_path / "run"), *RUN, "--max_steps", 2)
    previous = open(f"{out}/results.json").read()
    real_replace = os.replace

    def replace(src, dst):
        if dst.endswith("results.json"):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="could not write .*results.json \\(Input/output error\\)"):
        train_in_process(
            tiny_model, out, *RUN, "--max_steps", 3, "--resume_from_checkpoint", "auto"
        )
    assert open(f"{out}/results.json").read() == previous
    assert not os.path.exists(f"{out}/results.json.tmp")


def test_overwrite_removes_exactly_what_the_trainer_wrote(tiny_model, tmp_path):
    out = train_in_process(tiny_model, str(tmp_path / "run"), *RUN, "--max_steps", 4, "--save_steps", 2,
                           "--do_predict", "--save_total_limit", 5)  # fmt: skip
    train_in_process(
        tiny_model, out, *RUN, "--max_steps", 4, "--resume_from_checkpoint", f"{out}/checkpoint-2"
    )
    assert glob.glob(f"{out}/abandoned-after-step-2-*")
    os.makedirs(f"{out}/best.tmp")  # what a crash mid-write leaves
    train_in_process(tiny_model, out, *RUN, "--max_steps", 2, "--overwrite_output_dir")
    assert sorted(os.listdir(out)) == ["best", "checkpoint-2", "final", "log.jsonl", "results.json"]
    shutil.rmtree(f"{out}/best")


@pytest.mark.parametrize(
    "planted",
    [
        "checkpoint-2/state.pt.backup",
        "checkpoint-9/notes.txt",
        "best/weights.bin",
        "final/analysis.ipynb",
    ],
)
def test_overwrite_refuses_a_folder_named_like_ours_that_it_did_not_write(
    tiny_model, tmp_path, planted
):
    out = train_in_process(tiny_model, str(tmp_path / "run"), *RUN, "--max_steps", 2)
    folder = os.path.dirname(f"{out}/{planted}")
    if os.path.basename(folder) == "best":  # somebody's own best/ (no eval.json), instead of ours
        shutil.rmtree(folder)
    os.makedirs(folder, exist_ok=True)
    open(f"{out}/{planted}", "w").write("not the trainer's")
    with pytest.raises(ValueError, match=f"{os.path.basename(folder)}.*did not write"):
        train_in_process(tiny_model, out, *RUN, "--max_steps", 2, "--overwrite_output_dir")
    assert os.path.exists(f"{out}/{planted}")


def test_resume_survives_a_log_line_without_a_step_and_skips_a_renamed_checkpoint(
    tiny_model, tmp_path, capsys
):
    out = train_in_process(tiny_model, str(tmp_path / "run"), *RUN, "--max_steps", 6, "--save_steps", 2,
                           "--save_total_limit", 5)  # fmt: skip
    with open(f"{out}/log.jsonl", "a") as f:
        f.write('{"oops": 1}\n{"step": 7, "loss": 0.1}{"step"')  # junk, and a line a kill cut short
    os.rename(f"{out}/checkpoint-4", f"{out}/checkpoint-40")  # 'auto' must not trust the name
    train_in_process(tiny_model, out, *RUN, "--max_steps", 8, "--save_steps", 2, "--save_total_limit", 5,
                     "--resume_from_checkpoint", "auto")  # fmt: skip
    captured = capsys.readouterr()
    assert "checkpoint-40 holds step 4: a renamed checkpoint" in captured.err
    assert "resuming from" in captured.out and "checkpoint-6 (step 6)" in captured.out
    assert logged_steps(out) == list(range(1, 9))
