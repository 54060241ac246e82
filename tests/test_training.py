"""train_glue.py's runs, in this process: what one step does in each precision, accumulation,
exact resume with dropout on, the logged learning rate and evaluations, checkpoint rotation and
the dtypes of what is saved."""

import contextlib
import json
import math
import os
import shutil
import sys
import threading

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import data
import train_glue
from conftest import (
    GLUE,
    ROOT,
    SAMPLES,
    checkpoint_state,
    make_tiny_model,
    model_weights,
    read_log,
    train_in_process,
    write_rows,
)

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from checkpointing import saved_for_backward  # noqa: E402


def batch_loss(model_dir, rows=32):
    tokenizer, task = AutoTokenizer.from_pretrained(model_dir), data.glue_task("mrpc", GLUE)
    tokens = data.tokenize(
        data.read_split(task, "train").select(range(rows)), task, "train", tokenizer, 128
    )
    batch = data.collate(tokens[:], tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(**batch).loss.item()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_one_step_changes_weights_and_lowers_loss_on_a_fixed_batch(
    tiny_model, tmp_path, precision, bf16_anywhere
):
    flags = {"fp32": [], "bf16": ["--bf16"], "fp16": ["--fp16"]}[precision]
    out = train_in_process(tiny_model, str(tmp_path / "run"), "--max_train_samples", 32, "--max_steps", 1,
                           "--learning_rate", 1e-3, "--weight_decay", 0, *flags)  # fmt: skip
    before, after = model_weights(tiny_model), model_weights(f"{out}/final")
    changed = [k for k in after if k in before and not torch.equal(before[k], after[k])]
    assert len(changed) > 10, f"{precision}: only {changed} changed"
    assert batch_loss(f"{out}/final") < batch_loss(tiny_model)


def test_gradient_accumulation_matches_one_big_batch(tiny_model, tmp_path):
    """20 examples, global batch 8: steps of 8, 8 and a short 4, however the micro-batches are cut."""
    finals = []
    for batch, accumulation in ((8, 1), (4, 2), (2, 4)):
        out = train_in_process(tiny_model, str(tmp_path / f"b{batch}"), "--max_train_samples", 20,
                               "--num_train_epochs", 1, "--per_device_train_batch_size", batch,
                               "--gradient_accumulation_steps", accumulation, "--learning_rate", 1e-3)  # fmt: skip
        assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3]
        finals.append(model_weights(f"{out}/final"))
    moved = sum((finals[0][k] - model_weights(tiny_model)[k]).abs().max().item() for k in finals[0])
    assert moved > 1e-3
    for other in finals[1:]:
        for k in finals[0]:
            torch.testing.assert_close(other[k], finals[0][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("accumulation,stop", [(1, 5), (2, 4)])
def test_resume_mid_epoch_is_bitwise_exact(tiny_model_dropout, tmp_path, accumulation, stop):
    """N steps straight == N/2, stop, resume, N/2 more: the same weights, optimizer state and
    losses, bit for bit. 40 examples at global batch 8 (or 2 x 4) make 5 steps an epoch, so the
    stop falls mid-epoch; dropout is on."""
    common = ["--max_train_samples", 40, "--max_steps", 8, "--per_device_train_batch_size", 8 // accumulation,
              "--gradient_accumulation_steps", accumulation, "--learning_rate", 1e-3, "--save_steps", stop]  # fmt: skip
    straight = train_in_process(tiny_model_dropout, str(tmp_path / "straight"), *common)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(f"{straight}/checkpoint-{stop}.pt", resumed)
    train_in_process(tiny_model_dropout, str(resumed), *common, "--resume_from_checkpoint", "auto")
    a, b = (
        checkpoint_state(f"{straight}/checkpoint-8.pt"),
        checkpoint_state(f"{resumed}/checkpoint-8.pt"),
    )
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for i, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])

    def losses(out):
        return {r["step"]: r["loss"] for r in read_log(out) if "loss" in r and r["step"] > stop}

    assert losses(straight) == losses(resumed) and len(losses(straight)) == 8 - stop


def test_the_log_shows_the_learning_rate_of_each_step_as_scheduled(tiny_model, tmp_path):
    out = train_in_process(tiny_model, str(tmp_path / "run"), "--max_train_samples", 80,
                           "--per_device_train_batch_size", 8, "--max_steps", 10,
                           "--warmup_ratio", 0.25, "--learning_rate", 1e-3)  # fmt: skip
    logged = {r["step"]: r["lr"] for r in read_log(out) if "lr" in r}
    assert sorted(logged) == list(range(1, 11))
    for step, lr in logged.items():  # step s updates with the rate after s - 1 updates
        done = step - 1
        expected = 1e-3 * done / 3 if done < 3 else 1e-3 * (1 - (done - 3) / 7)
        assert lr == pytest.approx(expected, abs=1e-12), (step, lr, expected)


def test_each_evaluation_is_logged_and_rotation_keeps_the_newest_two_checkpoints(
    tiny_model, tmp_path, monkeypatch
):
    accuracies = iter([0.5, 0.9, 0.7, 0.8, 0.6, 0.85])  # the n-th evaluation's score
    monkeypatch.setattr(train_glue.metrics, "accuracy", lambda *_: next(accuracies))
    out = train_in_process(tiny_model, str(tmp_path / "run"), "--max_train_samples", 48,
                           "--per_device_train_batch_size", 8, "--eval_steps", 1, "--save_steps", 1,
                           "--learning_rate", 1e-2, "--num_train_epochs", 1)  # fmt: skip
    logged = [(r["step"], r["eval"]["accuracy"]) for r in read_log(out) if "eval" in r]
    assert logged == [(1, 0.5), (2, 0.9), (3, 0.7), (4, 0.8), (5, 0.6), (6, 0.85)]
    assert json.load(open(f"{out}/final/eval.json"))["eval"]["accuracy"] == 0.85
    assert sorted(p.name for p in tmp_path.glob("run/*")) == [".lock", "checkpoint-5.pt", "checkpoint-6.pt",
                                                              "final", "log.jsonl"]  # fmt: skip


def test_a_nan_score_is_reported_not_fatal_and_written_as_null(
    tiny_model, tmp_path, monkeypatch, capsys
):
    """STS-B's correlations are NaN while the predictions are constant (or on one example)."""
    monkeypatch.setattr(train_glue.metrics, "accuracy", lambda *_: math.nan)
    out = train_in_process(
        tiny_model, str(tmp_path / "run"), "--max_train_samples", 16, "--max_steps", 1
    )

    def strict(text):  # JSON as jq and JavaScript read it: no NaN
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))

    assert strict(open(f"{out}/final/eval.json").read())["eval"]["accuracy"] is None
    assert [strict(line) for line in open(f"{out}/log.jsonl")][-1]["eval"]["accuracy"] is None
    assert "step 1/1:  accuracy nan" in capsys.readouterr().out


def test_a_checkpoint_stored_in_bf16_trains_with_fp32_weights_and_optimizer_state(
    tmp_path, bf16_anywhere
):
    """transformers loads weights in the dtype they were saved in; AdamW's small updates would
    vanish in bf16 master weights, so the trainer loads fp32 whatever it finds."""
    bf16_model = make_tiny_model(str(tmp_path / "bf16-model"), dropout=0.0, dtype=torch.bfloat16)
    assert {v.dtype for v in model_weights(bf16_model).values()} == {torch.bfloat16}
    out = train_in_process(bf16_model, str(tmp_path / "run"), "--max_train_samples", 16,
                           "--per_device_train_batch_size", 8, "--max_steps", 2, "--bf16")  # fmt: skip
    state = checkpoint_state(f"{out}/checkpoint-2.pt")
    assert {v.dtype for v in state["model"].values() if v.is_floating_point()} == {torch.float32}
    moments = [s["exp_avg"].dtype for s in state["optimizer"]["state"].values()]
    assert moments and set(moments) == {torch.float32}
    assert {v.dtype for v in model_weights(f"{out}/final").values()} == {torch.float32}


def test_under_fp16_the_logged_and_clipped_norm_is_the_true_gradient_norm(tiny_model, tmp_path):
    """GradScaler multiplies the loss by 65536: clipping before unscale_ would see a norm that
    much larger (and clip the true gradient to nothing)."""
    norms = {}
    for precision in ("fp32", "fp16"):
        flags = ["--fp16"] if precision == "fp16" else []
        out = train_in_process(tiny_model, str(tmp_path / precision), "--max_train_samples", 32,
                               "--max_steps", 1, "--learning_rate", 1e-3, *flags)  # fmt: skip
        norms[precision] = read_log(out)[0]["grad_norm"]
    assert norms["fp16"] == pytest.approx(norms["fp32"], rel=0.05)


def test_the_head_says_what_it_is_whatever_the_model_was_trained_for(tiny_model, tmp_path):
    """pipeline() applies a sigmoid to a score unless problem_type says regression, and returns raw
    logits for classes if a model trained on STS-B still says regression."""
    stsb = tmp_path / "stsb-model"
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=1, problem_type="regression", ignore_mismatched_sizes=True
    )
    model.save_pretrained(stsb)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(stsb)
    for task, expected in (("mrpc", "single_label_classification"), ("stsb", "regression")):
        args = train_glue.parse_args(
            ["--task_name", task, "--model_name_or_path", str(stsb), "--output_dir", "x"]
        )
        _, loaded = train_glue.load_model(args, data.glue_task(task, GLUE))
        assert loaded.config.problem_type == expected, task
    out = train_in_process(tiny_model, str(tmp_path / "run"), "--max_train_samples", 16, "--max_steps", 1,
                           task="stsb")  # fmt: skip
    config = json.load(open(f"{out}/final/config.json"))
    assert config["problem_type"] == "regression" and len(config["id2label"]) == 1


@pytest.mark.parametrize(
    "kind,regression", [("csv", False), ("tsv", True), ("json", False), ("jsonl", True)]
)
def test_own_files_train_evaluate_and_predict(tiny_model, tmp_path, kind, regression):
    labels = [0.5, 1.25, 3.0] if regression else ["neg", "pos", "mixed"]
    rows = [
        {"id": i, "sentence1": f"a {i}", "sentence2": f"b {i % 5}", "label": labels[i % 3]}
        for i in range(24)
    ]
    files = [write_rows(tmp_path / f"{split}.{kind}", rows) for split in ("train", "dev")]
    empty = None if kind.startswith("json") else ""  # a missing label, as each format writes it
    test = write_rows(
        tmp_path / f"test.{kind}",
        [
            {
                "sentence1": r["sentence1"],
                "sentence2": r["sentence2"],
                "label": r["label"] if i else empty,
            }
            for i, r in enumerate(rows[:7])
        ],  # a test file's labels are optional, and unused
    )
    out = str(tmp_path / "run")
    args = train_glue.parse_args(["--train_file", files[0], "--validation_file", files[1], "--test_file", test,
                                  "--model_name_or_path", tiny_model, "--output_dir", out, "--max_steps", "2"])  # fmt: skip
    assert train_glue.run(args, threading.Event()) is False
    scores = json.load(open(f"{out}/final/eval.json"))["eval"]
    assert list(scores) == (["pearson", "spearmanr"] if regression else ["accuracy", "f1_macro"])
    config = json.load(open(f"{out}/final/config.json"))
    assert config["problem_type"] == ("regression" if regression else "single_label_classification")
    if not regression:
        assert list(config["id2label"].values()) == ["mixed", "neg", "pos"]
    lines = open(f"{out}/predictions.tsv").read().splitlines()
    assert lines[0] == "index\tprediction" and [line.split("\t")[0] for line in lines[1:]] == [
        str(i) for i in range(7)
    ]
    for line in lines[1:]:
        value = line.split("\t")[1]
        assert math.isfinite(float(value)) if regression else value in labels


# Label schemes of everyday files: (format, the labels as the file writes them, in proportion).
LABEL_SCHEMES = {
    "words": ("csv", ["neg", "pos", "mixed"]),
    "0/1": ("tsv", ["0", "1"]),
    "1..5, unequal": ("csv", ["1", "5", "5", "2", "5", "3", "4", "5", "4"]),
    "+1/-1": ("csv", ["+1", "-1", "-1"]),
    "10/20/30": ("tsv", ["10", "20", "30"]),
    "JSON ints": ("jsonl", [1, 2, 3, 3]),
    "JSON booleans": ("json", [True, False, False]),
}


@pytest.mark.parametrize("scheme", LABEL_SCHEMES)
def test_predictions_agree_with_the_reported_accuracy_on_every_label_scheme(
    tiny_model, tmp_path, scheme
):
    """A class is its name as written: the dev set given again as the test file gets the
    accuracy that final/eval.json reports, in the training labels as the file writes them."""
    kind, labels = LABEL_SCHEMES[scheme]
    rows = [
        {"sentence1": f"w{i % 7} " * (1 + i % 5), "label": labels[i % len(labels)]}
        for i in range(60)
    ]
    train, dev = (write_rows(tmp_path / f"{split}.{kind}", rows) for split in ("train", "dev"))
    out = str(tmp_path / "run")
    args = train_glue.parse_args(["--train_file", train, "--validation_file", dev, "--test_file", dev,
                                  "--model_name_or_path", tiny_model, "--output_dir", out, "--max_steps", "4",
                                  "--learning_rate", "1e-2", "--per_device_train_batch_size", "16"])  # fmt: skip
    assert train_glue.run(args, threading.Event()) is False
    written = [json.dumps(r["label"]) if kind.startswith("json") else r["label"] for r in rows]
    predicted = [
        line.split("\t")[1] for line in open(f"{out}/predictions.tsv").read().splitlines()[1:]
    ]
    assert set(predicted) <= set(written) and len(predicted) == len(written)
    agreement = np.mean([p == w for p, w in zip(predicted, written, strict=True)])
    assert json.load(open(f"{out}/final/eval.json"))["eval"]["accuracy"] == pytest.approx(agreement)


def test_evaluation_runs_with_dropout_off(tiny_model_dropout):
    """Two evaluations of the same weights, from a model left in training mode, agree."""
    task = data.glue_task("stsb", SAMPLES)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dropout)
    splits = {"dev": data.tokenize(data.read_split(task, "dev"), task, "dev", tokenizer, 128)}
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dropout, num_labels=1, ignore_mismatched_sizes=True
    )
    args = train_glue.parse_args(
        ["--task_name", "stsb", "--model_name_or_path", "m", "--output_dir", "x"]
    )
    scores = []
    for _ in range(2):
        model.train()
        scores.append(
            train_glue.evaluate(args, task, tokenizer, splits, contextlib.nullcontext, model, 0)
        )
    assert scores[0] == scores[1]


def test_a_gpt2_style_model_without_a_pad_token_pads_with_end_of_text(tmp_path):
    """GPT-2's tokenizer has no pad token: pad with <|endoftext|>, as Hugging Face's examples do,
    and tell the model, which classifies each text by its last token that is not padding."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2Tokenizer, pipeline
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())} | {"<|endoftext|>": 256}
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=[])  # bytes only: no merges to learn
    assert tokenizer.pad_token is None
    config = GPT2Config(vocab_size=257, n_positions=256, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    out = train_in_process(str(tmp_path / "gpt2"), str(tmp_path / "run"), "--max_train_samples", 16,
                           "--per_device_train_batch_size", 8, "--max_steps", 2, "--max_seq_length", 256)  # fmt: skip
    classify = pipeline("text-classification", model=f"{out}/final")
    assert (
        classify.model.config.pad_token_id == 256
        and classify.tokenizer.pad_token == "<|endoftext|>"
    )
    assert (
        len(classify(["a short one", "and a longer text, padded in its batch"], batch_size=2)) == 2
    )
    with pytest.raises(ValueError, match=r"LoRA: no nn.Linear named \[.*'query'.*\] in GPT2Model"):
        train_in_process(str(tmp_path / "gpt2"), str(tmp_path / "lora"), "--lora_rank", 4)  # Conv1D
    assert not (tmp_path / "lora").exists()


def test_gradient_checkpointing_gives_the_same_steps_and_keeps_less_for_backward(
    tiny_model_dropout, tmp_path
):
    """Dropout on: the recomputed forward must draw the same masks as the first one."""
    runs = [train_in_process(tiny_model_dropout, str(tmp_path / f"run{i}"), "--max_train_samples", 32,
                             "--per_device_train_batch_size", 8, "--max_steps", 3, "--learning_rate", 1e-3,
                             *flags) for i, flags in enumerate([[], ["--gradient_checkpointing"]])]  # fmt: skip
    logs = [[(r["loss"], r["grad_norm"]) for r in read_log(run) if "loss" in r] for run in runs]
    assert np.allclose(logs[0], logs[1], rtol=1e-5) and len(logs[0]) == 3
    weights = [model_weights(f"{run}/final") for run in runs]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])
    args = train_glue.parse_args(["--task_name", "mrpc", "--data_dir", GLUE, "--model_name_or_path",
                                  tiny_model_dropout, "--output_dir", "x"])  # fmt: skip
    tokenizer, model = train_glue.load_model(args, data.glue_task("mrpc", GLUE))
    task = data.glue_task("mrpc", GLUE)
    rows = data.tokenize(
        data.read_split(task, "train").select(range(16)), task, "train", tokenizer, 128
    )
    batch = data.collate(rows[:], tokenizer)
    plain = saved_for_backward(model.train(), batch)
    args.gradient_checkpointing = True
    _, model = train_glue.load_model(args, task)
    assert saved_for_backward(model.train(), batch) < 0.8 * plain
