"""Bad input: one clear `error:` line on stderr, no traceback, exit code 1, the output dir
untouched (and no output dir created where there was none)."""

import hashlib
import os
import re
import shutil

import pytest

import data
import train_glue
from conftest import GLUE, run_cli, train_in_process

PREVIOUS = ["--max_train_samples", 16, "--per_device_train_batch_size", 4, "--max_steps", 2]


@pytest.fixture(scope="module")
def previous_run(tiny_model, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("previous") / "run")
    return train_in_process(tiny_model, out, *PREVIOUS)


def snapshot(folder):
    files = {}
    for root, folders, names in os.walk(folder):
        for name in names + folders:
            path = os.path.join(root, name)
            content = b""
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    content = f.read()
            files[os.path.relpath(path, folder)] = (
                os.stat(path).st_mtime_ns,
                hashlib.sha256(content).hexdigest(),
            )
    return files


RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"
RTE_OK = RTE_HEADER + "0\ta\tb\tentailment\n1\tc\td\tnot_entailment\n"
STSB_HEADER = (
    "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
)
MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"

# case: (extra flags, {task folder: {file: text or bytes}} or None, the error's pattern)
CASES = {
    # flags
    "unknown task": (["--task_name", "glue"], None, "unknown task 'glue'"),
    "fp16 and bf16": (["--fp16", "--bf16"], None, "--fp16 and --bf16 are exclusive"),
    "batch size 0": (["--per_device_train_batch_size", 0], None,
                     r"--per_device_train_batch_size must be at least 1 \(got 0\)"),
    "zero accumulation": (["--gradient_accumulation_steps", 0], None,
                          "--gradient_accumulation_steps must be at least 1"),
    "negative learning rate": (["--learning_rate=-1e-5"], None, "--learning_rate must be a finite"),
    "infinite learning rate": (["--learning_rate", "inf"], None, "--learning_rate must be a finite"),
    "nan weight decay": (["--weight_decay", "nan"], None, "--weight_decay must be a finite"),
    "infinite epochs": (["--num_train_epochs", "inf"], None, "--num_train_epochs must be a finite"),
    "zero max steps": (["--max_steps", 0], None, "--max_steps must be at least 1, or -1"),
    "negative train samples": (["--max_train_samples=-5"], None,
                               r"--max_train_samples must be at least 1 \(got -5\)"),
    "zero eval samples": (["--max_eval_samples", 0], None, "--max_eval_samples must be at least 1"),
    "negative seed": (["--seed=-1"], None, "--seed must be a finite number >= 0"),
    "warmup ratio 1": (["--warmup_ratio", 1], None, r"--warmup_ratio must be in \[0, 1\)"),
    "two warmups": (["--warmup_ratio", 0.1, "--warmup_steps", 1], None, "pick one"),
    "warmup past the end": (["--warmup_steps", 1000], None,
                            "a warmup of 1000 steps leaves none of the run's 2 steps"),
    "sequence too long": (["--max_seq_length", 4096], None, "exceeds the model's limit of 512"),
    "sequence too short for a pair": (["--max_seq_length", 2], None,
                                      "--max_seq_length 2 is too short for mrpc: at least 5"),
    "unknown best metric": (["--metric_for_best_model", "bleu"], None,
                            "--metric_for_best_model bleu is not one of"),
    # data
    "missing data dir": (["--data_dir", "/nonexistent/glue"], None,
                         "--data_dir \\(or GLUE_DIR\\) /nonexistent/glue does not exist"),
    "data dir is a file": (["--data_dir", "A_FILE"], None, "--data_dir \\(or GLUE_DIR\\) .* is a file"),
    "missing split file": (["--task_name", "rte"], {"RTE": {"train.tsv": RTE_OK}},
                           "missing data file .*dev.tsv"),
    "malformed row": (["--task_name", "rte"],
                      {"RTE": {"train.tsv": RTE_OK + "2\tonly two\n", "dev.tsv": RTE_OK}},
                      "train.tsv line 4: 2 columns"),
    "label out of range": (["--task_name", "rte"],
                           {"RTE": {"train.tsv": RTE_HEADER + "0\ta\tb\tyes\n", "dev.tsv": RTE_OK}},
                           "label 'yes' is not one of"),
    "odd label character": (["--task_name", "wnli"],
                            {"WNLI": {"train.tsv": RTE_HEADER + "0\ta\tb\t\u00b2\n", "dev.tsv": RTE_OK}},
                            "train.tsv line 2: label '\u00b2' is not one of"),
    "empty split": (["--task_name", "rte"], {"RTE": {"train.tsv": RTE_OK, "dev.tsv": RTE_HEADER}},
                    "dev.tsv has no data rows"),
    "non-numeric score": (["--task_name", "stsb"],
                          {"STS-B": {"train.tsv": STSB_HEADER + "0\tg\tf\ty\t1\tn\tn\ta\tb\tfive\n"}},
                          "score 'five' is not a number"),
    "UTF-16 file": (["--task_name", "rte"],
                    {"RTE": {"train.tsv": RTE_OK.encode("utf-16"), "dev.tsv": RTE_OK}},
                    "train.tsv is not UTF-8 text"),
    "binary file": (["--task_name", "rte"],
                    {"RTE": {"train.tsv": b"PK\x03\x04\x00\x00\x00" * 30, "dev.tsv": RTE_OK}},
                    "train.tsv is a binary file"),
    "other training data": (["--max_train_samples", 12], None,
                            "cannot resume, the run differs .*train_data"),
    # model and checkpoints
    "model path missing": (["--model_name_or_path", "/nonexistent/model"], None,
                           "cannot load model '/nonexistent/model'"),
    "resume from nowhere": (["--resume_from_checkpoint", "/nonexistent/checkpoint-9"], None,
                            "/nonexistent/checkpoint-9 does not exist"),
    "resume from a file": (["--resume_from_checkpoint", "A_FILE"], None, "is not a folder"),
    "resume from a folder that is no checkpoint": (["--resume_from_checkpoint", "EMPTY_DIR"], None,
                                                   "is not a checkpoint of this trainer"),
    "corrupt checkpoint": (["--resume_from_checkpoint", "TRUNCATED"], None,
                           "checkpoint .* is corrupt or unsafe"),
    "0-byte state.pt": (["--resume_from_checkpoint", "ZERO_BYTES"], None,
                        "checkpoint .* is corrupt or unsafe"),
    "checkpoint past the end": (["--max_steps", 1], None, "is at step 2, past this run's 1 steps"),
    "another precision": (["--bf16"], None, "precision: checkpoint has 'fp32', this run has 'bf16'"),
    # output dir
    "another run's output dir": (["NO_RESUME"], None, "already holds a run .*--overwrite_output_dir"),
    "output dir is a file": (["--output_dir", "A_FILE"], None, "--output_dir .* is a file"),
    "output dir inside a checkpoint": (["--output_dir", "INSIDE_CHECKPOINT"], None, "lies inside checkpoint .*checkpoint-2"),
    "warmup as long as the run": (["--warmup_ratio", 0.5, "--max_steps", 1], None, "a warmup of 1 steps leaves none of the run's 1 steps"),
    "overwrite a folder with foreign files": (["NO_RESUME", "--overwrite_output_dir", "FOREIGN"],
                                              None, "refuses to empty .*notes.txt"),
    "a user's folder named like a checkpoint": (["USER_CHECKPOINT"], None, "checkpoint-5, named like this trainer's outputs"),
    "empty output dir flag": (["--output_dir", ""], None, "--output_dir is empty"),
    "empty data dir flag": (["--data_dir", ""], None, "--data_dir \\(or GLUE_DIR\\) is empty"),
    "epochs past any machine": (["--max_steps", -1, "--num_train_epochs", "1e308"], None, "--num_train_epochs 1e\\+308 is more than a run can finish"),
    "timeout past a week": (["--ddp_timeout", 10**14], None, "--ddp_timeout must be at most 604800"),
    "misspelled flag": (["--num_epochs", 2], None, "unrecognized arguments: --num_epochs 2"),
    "overwrite and resume": (["--overwrite_output_dir"], None,
                             "--overwrite_output_dir would delete the checkpoint"),
}  # fmt: skip


def write_data(tmp_path, files):
    for folder, contents in files.items():
        os.makedirs(tmp_path / "glue" / folder, exist_ok=True)
        for name, content in contents.items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp_path / "glue" / folder / name, mode) as f:
                f.write(content)
    return str(tmp_path / "glue")


def placeholders(extra, out, tmp_path):
    """Replace the placeholders of a case by what they stand for, preparing it on disk."""
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "empty-dir").mkdir()
    flags = []
    for flag in extra:
        if flag == "A_FILE":
            flags.append(str(tmp_path / "a-file"))
        elif flag == "EMPTY_DIR":
            flags.append(str(tmp_path / "empty-dir"))
        elif flag in ("TRUNCATED", "ZERO_BYTES"):
            with open(f"{out}/checkpoint-2/state.pt", "r+b") as f:
                f.truncate(1000 if flag == "TRUNCATED" else 0)
            flags.append(f"{out}/checkpoint-2")
        elif flag == "INSIDE_CHECKPOINT":
            flags.append(f"{out}/checkpoint-2/nested-run")
        elif flag == "USER_CHECKPOINT":
            os.makedirs(tmp_path / "out" / "checkpoint-5")
            (tmp_path / "out" / "checkpoint-5" / "notes.txt").write_text("mine")
        elif flag == "FOREIGN":
            (tmp_path / "out" / "notes.txt").write_text("mine, not the trainer's")
        elif flag not in ("NO_RESUME", "USER_CHECKPOINT"):
            flags.append(str(flag))
    return flags


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_clear_line_and_touches_nothing(
    case, tiny_model, previous_run, tmp_path, capsys
):
    extra, files, message = CASES[case]
    out = str(tmp_path / "out")
    shutil.copytree(previous_run, out)
    data_dir = write_data(tmp_path, files) if files else GLUE
    # Resuming the previous run is legitimate, so each case fails for its own reason alone
    # (argparse keeps the last of a repeated flag, so the case's flags override these).
    resume = [] if "NO_RESUME" in extra else ["--resume_from_checkpoint", "auto"]
    extra = placeholders(extra, out, tmp_path)
    before = snapshot(str(tmp_path))
    argv = ["--task_name", "mrpc", "--data_dir", data_dir, "--model_name_or_path", tiny_model,
            "--output_dir", out, *PREVIOUS, *resume, *extra]  # fmt: skip
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        train_glue.main([str(a) for a in argv])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert re.search(message, errors[0]), errors[0]
    assert "Traceback" not in err
    assert snapshot(str(tmp_path)) == before


def test_a_real_process_exits_1_without_traceback_and_debug_shows_it(tiny_model, tmp_path):
    argv = ["--task_name", "mrpc", "--data_dir", GLUE, "--model_name_or_path", tiny_model,
            "--output_dir", tmp_path / "out", "--fp16", "--bf16"]  # fmt: skip
    result = run_cli(argv, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == "error: --fp16 and --bf16 are exclusive: pick one"
    assert not (tmp_path / "out").exists()
    debug = run_cli(argv + ["--debug"], check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_run_that_fails_to_start_leaves_no_empty_output_dir(tiny_model, tmp_path):
    out = tmp_path / "new" / "run"
    argv = ["--task_name", "rte", "--data_dir", GLUE, "--model_name_or_path", tiny_model,
            "--output_dir", out, "--max_seq_length", 4]  # fmt: skip
    result = run_cli(argv, check=False)
    assert result.returncode == 1 and "too short for rte" in result.stderr
    assert not (tmp_path / "new").exists()


def test_a_field_longer_than_csvs_default_limit_is_read(tmp_path):
    long_sentence = "word " * 40_000  # 200 KB, past csv's 128 KiB default
    os.makedirs(tmp_path / "RTE")
    (tmp_path / "RTE" / "train.tsv").write_text(RTE_HEADER + f"0\t{long_sentence}\tb\tentailment\n")
    rows = data.load_split("rte", "train", str(tmp_path))
    assert rows["text_a"] == [long_sentence]
