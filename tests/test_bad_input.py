"""Bad input: one clear `error:` line on stderr, no traceback, exit code 1, the output dir
untouched (and no output dir created where there was none)."""

import fcntl
import hashlib
import os
import re
import shutil

import pytest
import torch
import transformers

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
    "unknown task": (["--task_name", "glue"], None, "--task_name: invalid choice: 'glue'"),
    "fp16 and bf16": (["--fp16", "--bf16"], None, "--bf16: not allowed with argument --fp16"),
    "batch size 0": (["--per_device_train_batch_size", 0], None,
                     "--per_device_train_batch_size: must be an integer >= 1, not '0'"),
    "zero accumulation": (["--gradient_accumulation_steps", 0], None,
                          "--gradient_accumulation_steps: must be an integer >= 1"),
    "negative learning rate": (["--learning_rate=-1e-5"], None, r"--learning_rate: must be in \(0, 1\)"),
    "infinite learning rate": (["--learning_rate", "inf"], None, r"--learning_rate: must be in \(0, 1\)"),
    "nan weight decay": (["--weight_decay", "nan"], None, "--weight_decay: must be a number >= 0, not 'nan'"),
    "infinite epochs": (["--num_train_epochs", "inf"], None, r"--num_train_epochs: must be in \(0, 1e6\]"),
    "epochs past any machine": (["--num_train_epochs", "1e308"], None, "--num_train_epochs: must be in"),
    "zero max steps": (["--max_steps", 0], None, "--max_steps: must be an integer >= 1, not '0'"),
    "negative train samples": (["--max_train_samples=-5"], None,
                               "--max_train_samples: must be an integer >= 1, not '-5'"),
    "zero eval samples": (["--max_eval_samples", 0], None, "--max_eval_samples: must be an integer >= 1"),
    "negative seed": (["--seed=-1"], None, r"--seed: must be in \[0, 2\*\*32\)"),
    "warmup ratio 1": (["--warmup_ratio", 1], None, r"--warmup_ratio: must be in \[0, 1\)"),
    "warmup past the end": (["--warmup_ratio", 0.99], None, "a warmup of 2 fills all 2 steps"),
    "warmup as long as the run": (["--warmup_ratio", 0.5, "--max_steps", 1], None,
                                  "a warmup of 1 fills all 1 steps"),
    "sequence too long": (["--max_seq_length", 4096], None, r"--max_seq_length must be in \[5, 512\]"),
    "sequence too short for a pair": (["--max_seq_length", 2], None, r"--max_seq_length must be in \[5, 512\]"),
    "timeout past a week": (["--ddp_timeout", 10**14], None, r"--ddp_timeout: must be in \[1, 604800\]"),
    "misspelled flag": (["--num_epochs", 2], None, "unrecognized arguments: --num_epochs 2"),
    "resume from a path": (["--resume_from_checkpoint", "/some/checkpoint-9.pt"], None,
                           "--resume_from_checkpoint: invalid choice"),
    "empty output dir flag": (["--output_dir", ""], None, "--output_dir: must be a folder"),
    "class weights, one too many": (["--class_weights", "1,2,3"], None,
                                    r"--class_weights: give 2 weights, for \['not_equivalent', 'equivalent'\]"),
    "a negative class weight": (["--class_weights=-1,2"], None, "--class_weights: must be balanced or weights > 0"),
    "a nan class weight": (["--class_weights", "1,nan"], None, "--class_weights: must be balanced or weights > 0"),
    "an infinite class weight": (["--class_weights", "inf,1"], None, "--class_weights: must be balanced or weights"),
    "a word for class weights": (["--class_weights", "heavy"], None, "--class_weights: must be balanced or weights"),
    "class weights for a score": (["--task_name", "stsb", "--class_weights", "balanced"],
                                  {"STS-B": {"train.tsv": STSB_HEADER + "0\tg\tf\ty\t1\tn\tn\ta\tb\t1.5\n" * 2,
                                             "dev.tsv": STSB_HEADER + "0\tg\tf\ty\t1\tn\tn\ta\tb\t2.5\n" * 2}},
                                  "--class_weights: for single-label classes only: leave it out"),
    "two data sources": (["--dataset_name", "nyu-mll/glue"], None,
                         r"give one source: --dataset_name, --data_dir \(\$GLUE_DIR\) or --train_file"),
    "a best metric for nothing": (["--metric_for_best_model", "f1"], None,
                                  "--metric_for_best_model: for --load_best_model_at_end or early stopping"),
    "another LoRA rank": (["--lora_rank", 4], None, r"cannot resume .*another run \(lora_rank 0 -> 4"),
    "another class weighting": (["--class_weights", "1,2"], None,
                                r"cannot resume .*another run \(class_weights None -> \[1.0, 2.0\]"),
    # data
    "missing data dir": (["--data_dir", "/nonexistent/glue"], None,
                         "cannot read /nonexistent/glue/MRPC/train.tsv \\(No such file or directory\\)"),
    "data dir is a file": (["--data_dir", "A_FILE"], None, "cannot read .*a-file/MRPC/train.tsv \\(Not a directory\\)"),
    "missing split file": (["--task_name", "rte"], {"RTE": {"train.tsv": RTE_OK}}, "cannot read .*dev.tsv \\(No such file"),
    "a row with a field too many": (["--task_name", "rte"],
                                    {"RTE": {"train.tsv": RTE_OK + "2\ta\tb\tentailment\tc\n", "dev.tsv": RTE_OK}},
                                    "train.tsv: .*Expected 4 fields in line 4, saw 5"),
    "a row with a field too few": (["--task_name", "rte"],
                                   {"RTE": {"train.tsv": RTE_OK + "2\tonly two\n", "dev.tsv": RTE_OK}},
                                   "train.tsv, line 4: the label is empty: fix the row"),
    "label out of range": (["--task_name", "rte"],
                           {"RTE": {"train.tsv": RTE_HEADER + "0\ta\tb\tyes\n", "dev.tsv": RTE_OK}},
                           "train.tsv, line 2: the label 'yes' is not a class of the training set"),
    "a header-less file's line": (["--task_name", "cola"],
                                  {"CoLA": {"train.tsv": "gj04\t1\t\tA b.\ngj04\t0\t*\tB a.\ngj04\t7\t\tC.\n",
                                            "dev.tsv": "gj04\t1\t\tA b.\ngj04\t0\t*\tB a.\n"}},
                                  "CoLA/train.tsv, line 3: the label '7' is not a class of the training set"),
    "odd label character": (["--task_name", "wnli"],
                            {"WNLI": {"train.tsv": RTE_HEADER + "0\ta\tb\t\u00b2\n", "dev.tsv": RTE_OK}},
                            "train.tsv, line 2: the label '\u00b2' is not a class"),
    "empty split": (["--task_name", "rte"], {"RTE": {"train.tsv": RTE_OK, "dev.tsv": RTE_HEADER}},
                    "dev.tsv has no data rows"),
    "non-numeric score": (["--task_name", "stsb"],
                          {"STS-B": {"train.tsv": STSB_HEADER + "0\tg\tf\ty\t1\tn\tn\ta\tb\tfive\n"}},
                          "train.tsv, line 2: the label 'five' is not a number"),
    "UTF-16 file": (["--task_name", "rte"], {"RTE": {"train.tsv": RTE_OK.encode("utf-16"), "dev.tsv": RTE_OK}},
                    "train.tsv is not UTF-8 text"),
    "binary file": (["--task_name", "rte"], {"RTE": {"train.tsv": b"PK\x03\x04\x00\x00\x00" * 30, "dev.tsv": RTE_OK}},
                    "train.tsv has no data rows"),
    "other training data": (["--max_train_samples", 12], None, "cannot resume .*another run .*train_data"),
    # model and checkpoints
    "model path missing": (["--model_name_or_path", "/nonexistent/model"], None,
                           "cannot load model /nonexistent/model"),
    "corrupt checkpoint": (["TRUNCATED"], None, r"no checkpoint in .* loads, fix or remove them: checkpoint-\d+\.pt: .+"),
    "0-byte checkpoint": (["ZERO_BYTES"], None, r"no checkpoint in .* loads, fix or remove them: checkpoint-\d+\.pt: .+"),
    "checkpoint past the end": (["--max_steps", 1], None, "checkpoint at step 2 is past 1"),
    "another precision": (["--fp16"], None, "cannot resume .*another run .*fp16 False -> True"),
    # output dir
    "another run's output dir": (["NO_RESUME"], None, "holds a run .*--overwrite_output_dir"),
    "output dir is a file": (["--output_dir", "A_FILE"], None, "cannot write --output_dir .*a-file \\(File exists\\)"),
    "overwrite and resume": (["--overwrite_output_dir"], None,
                             "--overwrite_output_dir: not allowed with argument --resume_from_checkpoint"),
    "own files with a GLUE task": (["--validation_file", "dev.csv"], None,
                                   "--validation_file and --test_file go with --train_file, not --task_name"),
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
    flags = []
    for flag in extra:
        if flag == "A_FILE":
            flags.append(str(tmp_path / "a-file"))
        elif flag in ("TRUNCATED", "ZERO_BYTES"):
            with open(f"{out}/checkpoint-2.pt", "r+b") as f:
                f.truncate(1000 if flag == "TRUNCATED" else 0)
        elif flag != "NO_RESUME":
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


CSV_OK = "text,label\nfine,good\nawful,bad\n"
# Your own files: (flags, {file: text or bytes}, the error's pattern). OWN/ is their folder.
OWN_CASES = {
    "no validation file": (["--train_file", "OWN/train.csv"], {"train.csv": CSV_OK},
                           "--train_file needs a --validation_file"),
    "missing file": (["--train_file", "OWN/nope.csv", "--validation_file", "OWN/dev.csv"], {"dev.csv": CSV_OK},
                     "cannot read .*nope.csv \\(No such file or directory\\)"),
    "empty file": (["--train_file", "OWN/train.csv", "--validation_file", "OWN/dev.csv"],
                   {"train.csv": "", "dev.csv": CSV_OK}, "train.csv has no data rows"),
    "unsupported kind": (["--train_file", "OWN/train.xlsx", "--validation_file", "OWN/dev.csv"],
                         {"train.xlsx": CSV_OK, "dev.csv": CSV_OK}, "give a .tsv, .csv, .json or .jsonl file"),
    "no label column": (["--train_file", "OWN/train.csv", "--validation_file", "OWN/dev.csv"],
                        {"train.csv": "text,score\na,1\n", "dev.csv": CSV_OK},
                        r"needs a 'label' column and one of text \(it has \['text', 'score'\]\)"),
    "no text column": (["--train_file", "OWN/train.csv", "--validation_file", "OWN/dev.csv"],
                       {"train.csv": "id,label\n1,good\n", "dev.csv": CSV_OK}, "needs a 'label' column and one of text"),
    "mixed label types": (["--train_file", "OWN/train.csv", "--validation_file", "OWN/dev.csv"],
                          {"train.csv": "text,label\na,good\nb,2\n", "dev.csv": CSV_OK},
                          r"train.csv: make the labels one kind, of 2\+ values: \['good', '2'\]"),
    "one class only": (["--train_file", "OWN/train.csv", "--validation_file", "OWN/dev.csv"],
                       {"train.csv": "text,label\na,x\nb,x\n", "dev.csv": "text,label\nc,x\n"},
                       r"train.csv: make the labels one kind, of 2\+ values: \['x'\]"),
    "an infinite score": (["--train_file", "OWN/train.csv", "--validation_file", "OWN/dev.csv"],
                          {"train.csv": "text,label\na,0.5\nb,1e400\n", "dev.csv": "text,label\nc,0.5\n"},
                          "train.csv, line 3: the label '1e400' is not a number"),
    "JSON that is null": (["--train_file", "OWN/train.json", "--validation_file", "OWN/dev.csv"],
                          {"train.json": "null", "dev.csv": CSV_OK},
                          "train.json holds no JSON objects: give an array of them, or one per line"),
    "an empty JSON Lines file": (["--train_file", "OWN/train.csv", "--validation_file", "OWN/dev.jsonl"],
                                 {"train.csv": CSV_OK, "dev.jsonl": ""}, "dev.jsonl holds no JSON objects"),
    "a validation label never seen in training": (["--train_file", "OWN/train.csv", "--validation_file", "OWN/dev.csv"],
                                                  {"train.csv": CSV_OK, "dev.csv": "text,label\nso so,neutral\n"},
                                                  "dev.csv, line 2: the label 'neutral' is not a class of the training set"),
    "a score that is no number": (["--train_file", "OWN/train.csv", "--validation_file", "OWN/dev.csv"],
                                  {"train.csv": "text,label\na,0.5\nb,1.5\n", "dev.csv": "text,label\nc,high\n"},
                                  "dev.csv, line 2: the label 'high' is not a number"),
    "an empty label among words": (["--train_file", "OWN/train.csv", "--validation_file", "OWN/dev.csv"],
                                   {"train.csv": "text,label\na,good\nb,\nc,bad\n", "dev.csv": CSV_OK},
                                   "train.csv, line 3: the label is empty: fix the row"),
    "an empty label among numbers": (["--train_file", "OWN/train.jsonl", "--validation_file", "OWN/dev.csv"],
                                     {"train.jsonl": '{"text": "a", "label": 1}\n{"text": "b", "label": null}\n{"label": 2}\n',
                                      "dev.csv": "text,label\nc,1\n"},
                                     "train.jsonl, line 2: the label is empty: fix the row"),
    "a dev number that is no training class": (["--train_file", "OWN/train.csv", "--validation_file", "OWN/dev.csv"],
                                               {"train.csv": "text,label\na,1\nb,2\nc,3\n",
                                                "dev.csv": "text,label\nd,1\ne,0\n"},
                                               r"dev.csv, line 3: the label '0' is not a class of the training set \['1', '2', '3'\]"),
    "a test label that is no training class": (["--train_file", "OWN/train.csv", "--validation_file", "OWN/dev.csv",
                                                "--test_file", "OWN/test.json"],
                                               {"train.csv": CSV_OK, "dev.csv": CSV_OK,
                                                "test.json": '[{"text": "x", "label": "good"}, {"text": "y", "label": "meh"}]'},
                                               "test.json, item 2: the label 'meh' is not a class"),
    "malformed row": (["--train_file", "OWN/train.csv", "--validation_file", "OWN/dev.csv"],
                      {"train.csv": CSV_OK + "so,so,so\n", "dev.csv": CSV_OK}, "Expected 2 fields in line 4, saw 3"),
    "malformed JSON": (["--train_file", "OWN/train.jsonl", "--validation_file", "OWN/dev.csv"],
                       {"train.jsonl": '{"text": "a", "label": "good"}\n{"text": ', "dev.csv": CSV_OK}, "train.jsonl: "),
    "not UTF-8": (["--train_file", "OWN/train.csv", "--validation_file", "OWN/dev.csv"],
                  {"train.csv": "text,label\ncaf\xe9,good\n".encode("latin-1"), "dev.csv": CSV_OK},
                  "train.csv is not UTF-8 text"),
    "predictions without a test file": (["--train_file", "OWN/train.csv", "--validation_file", "OWN/dev.csv",
                                         "--do_predict"], {"train.csv": CSV_OK, "dev.csv": CSV_OK},
                                        "--do_predict with --train_file needs a --test_file"),
    "labels both lists and single values": (["--train_file", "OWN/train.jsonl", "--validation_file", "OWN/train.jsonl"],
                                            {"train.jsonl": '{"text": "a", "label": ["x"]}\n{"text": "b", "label": "y"}\n'},
                                            "train.jsonl, line 2: 'label' is a str here but a list in the first row"),
    "a dev set of labels with one never trained": (["--train_file", "OWN/train.jsonl", "--validation_file", "OWN/dev.json"],
                                                   {"train.jsonl": '{"text": "a", "label": ["x"]}\n{"text": "b", "label": ["y"]}\n',
                                                    "dev.json": '[{"text": "c", "label": []}, {"text": "d", "label": ["x", "z"]}]'},
                                                   r"dev.json, item 2: the label \['x', 'z'\] is not a list of classes of the training set \['x', 'y'\]"),
    "class weights for multi-label": (["--train_file", "OWN/train.jsonl", "--validation_file", "OWN/train.jsonl",
                                       "--class_weights", "1,2"],
                                      {"train.jsonl": '{"text": "a", "label": ["x"]}\n{"text": "b", "label": ["y"]}\n'},
                                      "--class_weights: for single-label classes only"),
    "task and files together": (["--task_name", "mrpc", "--train_file", "OWN/train.csv"], {},
                                "--train_file: not allowed with argument --task_name"),
}  # fmt: skip


@pytest.mark.parametrize("case", OWN_CASES)
def test_bad_own_files_give_one_clear_line_and_write_nothing(case, tiny_model, tmp_path, capsys):
    extra, files, message = OWN_CASES[case]
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    before = snapshot(str(tmp_path))
    argv = ["--model_name_or_path", tiny_model, "--output_dir", tmp_path / "out",
            *[str(flag).replace("OWN", str(tmp_path)) for flag in extra]]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        train_glue.main([str(a) for a in argv])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_.value.code == 1 and len(errors) == 1 and re.search(message, errors[0]), errors
    assert snapshot(str(tmp_path)) == before


def run_glue(model, out, *extra):
    argv = ["--task_name", "mrpc", "--data_dir", GLUE, "--model_name_or_path", model, "--output_dir", out,
            "--max_train_samples", 16, "--max_steps", 1, *extra]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        train_glue.main([str(a) for a in argv])
    return exit_.value.code


def test_bf16_on_a_cpu_that_only_emulates_it_is_refused(tiny_model, tmp_path, monkeypatch, capsys):
    """An AVX2-only CPU runs bf16 matmuls about 400 times slower than fp32."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert run_glue(tiny_model, tmp_path / "out", "--bf16") == 1
    assert "error: --bf16: this CPU only emulates bf16: leave --bf16 out" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_model_folder_without_its_tokenizer_is_refused(tiny_model, tmp_path, capsys):
    """transformers builds a tokenizer of a few tokens there: most words would become [UNK]."""
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_model, name), folder)
    assert run_glue(str(folder), tmp_path / "out") == 1
    assert re.search(
        r"error: .*weights-only has another tokenizer than its model's: save the model's there",
        capsys.readouterr().err,
    )


def test_max_seq_length_leaves_room_for_padding_to_a_multiple_of_8(tiny_model, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

    config = BertConfig.from_pretrained(tiny_model, max_position_embeddings=100)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "m")
    args = train_glue.parse_args(["--task_name", "mrpc", "--model_name_or_path", str(tmp_path / "m"),
                                  "--output_dir", "o", "--max_seq_length", "100"])  # fmt: skip
    # 100 would pad to 104, past the model's 100 positions: 96 is the longest that fits
    with pytest.raises(ValueError, match=r"--max_seq_length must be in \[5, 96\]"):
        train_glue.load_model(args, train_glue.data.glue_task("mrpc", GLUE))


def test_max_seq_length_is_checked_against_what_the_model_can_embed(tiny_model, tmp_path, capsys):
    """RoBERTa's position table has 514 rows, the first two before position 0: 512 usable."""
    folder = str(tmp_path / "roberta")
    config = transformers.RobertaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=514, pad_token_id=1)  # fmt: skip
    transformers.RobertaForSequenceClassification(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    assert run_glue(folder, tmp_path / "out", "--max_seq_length", 514) == 1
    assert "error: --max_seq_length must be in [5, 512] for this model" in capsys.readouterr().err


def test_a_second_run_in_the_same_output_dir_is_refused(tiny_model, previous_run, tmp_path, capsys):
    """A scheduler that requeues a job still running must not get two writers of one folder."""
    out = tmp_path / "out"
    shutil.copytree(previous_run, out)
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        before = snapshot(str(out))
        assert (
            run_glue(
                tiny_model,
                out,
                *PREVIOUS[:-2],
                "--max_steps",
                3,
                "--resume_from_checkpoint",
                "auto",
            )
            == 1
        )
    assert (
        f"error: --output_dir {out} is in use by another run (process 4242)"
        in capsys.readouterr().err
    )
    assert snapshot(str(out)) == before


def test_a_real_process_exits_1_without_traceback_and_debug_shows_it(tiny_model, tmp_path):
    argv = ["--task_name", "mrpc", "--data_dir", GLUE, "--model_name_or_path", tmp_path / "no-model",
            "--output_dir", tmp_path / "out"]  # fmt: skip
    result = run_cli(argv, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: cannot load model {tmp_path}/no-model")
    )
    assert not (tmp_path / "out").exists()
    debug = run_cli(argv + ["--debug"], check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_run_that_fails_to_start_leaves_no_empty_output_dir(tiny_model, tmp_path):
    out = tmp_path / "new" / "run"
    argv = ["--task_name", "rte", "--data_dir", GLUE, "--model_name_or_path", tiny_model,
            "--output_dir", out, "--max_seq_length", 4]  # fmt: skip
    result = run_cli(argv, check=False)
    assert result.returncode == 1 and "--max_seq_length must be in [5, 512]" in result.stderr
    assert not (tmp_path / "new").exists()
