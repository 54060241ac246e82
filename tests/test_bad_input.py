"""Bad input: one clear `error:` line on stderr, no traceback, exit code 1, the output dir untouched."""
import hashlib
import os
import re
import shutil

import pytest

import train_glue
from conftest import GLUE, SAMPLES, run_cli, train_in_process


@pytest.fixture(scope="module")
def previous_run(tiny_model, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("previous") / "run")
    return train_in_process(tiny_model, out, "--max_train_samples", 16, "--per_device_train_batch_size", 4,
                            "--max_steps", 2)


def snapshot(folder):
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = (os.stat(path).st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return files


def make_data(tmp_path, task_folder, files):
    for name, text in files.items():
        os.makedirs(tmp_path / "glue" / task_folder, exist_ok=True)
        (tmp_path / "glue" / task_folder / name).write_text(text)
    return str(tmp_path / "glue")


RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"
RTE_OK = RTE_HEADER + "0\ta\tb\tentailment\n1\tc\td\tnot_entailment\n"
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
CASES = {
    "unknown task": (["--task_name", "glue"], None, "unknown task 'glue'"),
    "missing data dir": (["--data_dir", "/nonexistent/glue"], None, "--data_dir /nonexistent/glue does not exist"),
    "missing split file": (["--task_name", "rte"], {"RTE": {"train.tsv": RTE_OK}}, "missing data file .*dev.tsv"),
    "malformed row": (["--task_name", "rte"], {"RTE": {"train.tsv": RTE_OK + "2\tonly two\n", "dev.tsv": RTE_OK}},
                      "train.tsv line 4: 2 columns"),
    "label out of range": (["--task_name", "rte"], {"RTE": {"train.tsv": RTE_HEADER + "0\ta\tb\tyes\n", "dev.tsv": RTE_OK}},
                           "label 'yes' is not one of"),
    "empty split": (["--task_name", "rte"], {"RTE": {"train.tsv": RTE_OK, "dev.tsv": RTE_HEADER}}, "dev.tsv has no data rows"),
    "non-numeric score": (["--task_name", "stsb"], {"STS-B": {"train.tsv": STSB_HEADER + "0\tg\tf\ty\t1\tn\tn\ta\tb\tfive\n"}},
                          "score 'five' is not a number"),
    "sequence too long": (["--max_seq_length", 4096], None, "--max_seq_length 4096 exceeds the model's limit of 512"),
    "fp16 and bf16": (["--fp16", "--bf16"], None, "--fp16 and --bf16 are exclusive"),
    "batch size 0": (["--per_device_train_batch_size", 0], None, r"--per_device_train_batch_size must be >= 1 \(got 0\)"),
    "negative learning rate": (["--learning_rate=-1e-5"], None, "--learning_rate must be > 0"),
    "zero accumulation": (["--gradient_accumulation_steps", 0], None, "--gradient_accumulation_steps must be >= 1"),
    "resume from nowhere": (["--resume_from_checkpoint", "/nonexistent/checkpoint-9"], None, "does not exist"),
    "model path missing": (["--model_name_or_path", "/nonexistent/model"], None, "cannot load model '/nonexistent/model'"),
    "unknown best metric": (["--metric_for_best_model", "bleu"], None, "--metric_for_best_model bleu is not one of"),
    "another run's output dir": ([], None, "already holds a run .*--overwrite_output_dir"),
    "corrupt checkpoint": (["--resume_from_checkpoint", "CORRUPT"], None, "checkpoint .* is corrupt or unsafe"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_clear_line_and_touches_nothing(case, tiny_model, previous_run, tmp_path, capsys):
    extra, files, message = CASES[case]
    out = str(tmp_path / "out")
    shutil.copytree(previous_run, out)
    if "CORRUPT" in extra:
        with open(f"{out}/checkpoint-2/state.pt", "r+b") as f:
            f.truncate(1000)
        extra = ["--resume_from_checkpoint", f"{out}/checkpoint-2"]
    before = snapshot(out)
    data_dir = make_data(tmp_path, *next(iter(files.items()))) if files else GLUE
    # Resuming the previous run is legitimate, so each case fails for its own reason alone (argparse
    # keeps the last of a repeated flag, so `extra` overrides these).
    resume = [] if case == "another run's output dir" else ["--resume_from_checkpoint", "auto"]
    argv = [str(a) for a in ["--task_name", "mrpc", "--data_dir", data_dir, "--model_name_or_path", tiny_model,
                             "--output_dir", out, "--max_train_samples", 16] + resume + extra]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        train_glue.main(argv)
    assert exit_.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert re.search(message, errors[0]), errors[0]
    assert snapshot(out) == before


def test_a_real_process_exits_1_without_traceback_and_debug_shows_it(tiny_model, tmp_path):
    argv = ["--task_name", "mrpc", "--data_dir", GLUE, "--model_name_or_path", tiny_model,
            "--output_dir", tmp_path / "out", "--fp16", "--bf16"]
    result = run_cli(argv, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: --fp16 and --bf16 are exclusive: pick one"
    assert not (tmp_path / "out").exists()
    debug = run_cli(argv + ["--debug"], check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
