"""LoRA by hand (lora.py, --lora_rank) and multi-label own files: what each promises, end to end."""

import json
import threading

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import data
import lora
import metrics
import train_glue
import trainer
from conftest import (
    GLUE,
    checkpoint_state,
    model_weights,
    read_log,
    train_in_process,
    write_rows,
)

LORA = ["--max_train_samples", 48, "--per_device_train_batch_size", 8, "--learning_rate", 1e-2,
        "--lora_rank", 4, "--lora_dropout", 0.1, "--max_steps", 6, "--save_steps", 2]  # fmt: skip


def test_lora_starts_as_the_base_model_and_merges_into_what_it_computes(tiny_model):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model).eval()
    batch = AutoTokenizer.from_pretrained(tiny_model)(
        ["a cat", "two dogs and a bird"], padding=True, return_tensors="pt"
    )
    base = model(**batch).logits
    model.requires_grad_(False)
    assert (
        lora.add(model, {"query", "value"}, rank=4, alpha=16, dropout=0.0) == 4
    )  # 2 layers x q, v
    assert torch.equal(model(**batch).logits, base)  # B = 0: step 0 is the base model exactly
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}"
                         for i in range(2) for m in ("query", "value") for ab in "AB"}  # fmt: skip
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            p.data.normal_()  # as if trained
    adapted = model(**batch).logits
    assert not torch.allclose(adapted, base)
    lora.merge(model)
    assert not any("lora" in name for name in model.state_dict())
    torch.testing.assert_close(model(**batch).logits, adapted, rtol=1e-5, atol=1e-5)


def test_a_lora_run_trains_adapters_and_head_only_and_final_is_plain_and_predicts_the_same(
    tiny_model, tmp_path, capsys
):
    out = train_in_process(tiny_model, str(tmp_path / "run"), *LORA, "--do_predict")
    base = sum(
        p.numel()
        for p in AutoModelForSequenceClassification.from_pretrained(tiny_model).parameters()
    )
    adapters, head = 2 * 2 * 4 * (32 + 32), 32 * 2 + 2  # 2 layers x (query, value) x rank 4
    assert (
        f"{adapters + head:,} of {base + adapters:,} parameters trained" in capsys.readouterr().out
    )
    before, after = model_weights(tiny_model), checkpoint_state(f"{out}/checkpoint-6.pt")["model"]
    changed = {name for name, value in after.items()
               if name.replace(".base.", ".") not in before or not torch.equal(value, before[name.replace(".base.", ".")])}  # fmt: skip
    assert changed and all("lora_" in name or name.startswith("classifier.") for name in changed), (
        changed
    )
    assert {"classifier.weight", "classifier.bias"} <= changed
    # final/ is plain Hugging Face: from_pretrained needs no LoRA, and predicts what the adapted
    # model predicted: the scores of its last evaluation, on the same dev examples.
    final = AutoModelForSequenceClassification.from_pretrained(f"{out}/final").eval()
    assert not any("lora" in name for name in final.state_dict())
    unmerged = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2).eval()
    unmerged.base_model.requires_grad_(False)
    lora.add(unmerged.base_model, train_glue.LORA_TARGETS, 4, 16.0, 0.1)
    unmerged.load_state_dict(after)
    unmerged.eval()  # the adapters' dropout too
    task, tokenizer = data.glue_task("mrpc", GLUE), AutoTokenizer.from_pretrained(tiny_model)
    rows = data.read_split(task, "dev").select(range(40))
    batch = data.collate(data.tokenize(rows, task, "dev", tokenizer, 128)[:], tokenizer)
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(
            final(**batch).logits, unmerged(**batch).logits, rtol=1e-4, atol=1e-5
        )


def test_a_lora_run_killed_and_resumed_is_bitwise_the_straight_run(
    tiny_model_dropout, tmp_path, monkeypatch
):
    straight = train_in_process(tiny_model_dropout, str(tmp_path / "straight"), *LORA)
    out = str(tmp_path / "killed")
    real_save = trainer.save_checkpoint

    def killed_at_4(output_dir, model, optimizer, scaler, progress, flags):
        if progress["step"] == 4:  # its log records are written, its checkpoint never lands
            raise RuntimeError("killed")
        real_save(output_dir, model, optimizer, scaler, progress, flags)

    monkeypatch.setattr(trainer, "save_checkpoint", killed_at_4)
    with pytest.raises(RuntimeError, match="killed"):
        train_in_process(tiny_model_dropout, out, *LORA, "--resume_from_checkpoint", "auto")
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    train_in_process(tiny_model_dropout, out, *LORA, "--resume_from_checkpoint", "auto")  # from 2
    a, b = model_weights(f"{straight}/final"), model_weights(f"{out}/final")
    assert all(torch.equal(a[k], b[k]) for k in a), (
        "LoRA's dropout streams and adapters must resume"
    )
    losses = [
        [(r["step"], r["loss"]) for r in read_log(run) if "loss" in r] for run in (straight, out)
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 6


MULTI = [
    {"text": "goals and votes", "label": ["sports", "politics"]},
    {"text": "a quiet day", "label": []},
    {"text": "the match", "label": ["sports"]},
    {"text": "the election", "label": ["politics"]},
    {"text": "new chips", "label": ["tech"]},
    {"text": "chips at the match", "label": ["sports", "tech"]},
] * 6


def test_multi_label_files_train_with_a_sigmoid_each_and_predictions_read_back_to_the_scores(
    tiny_model, tmp_path
):
    train = write_rows(tmp_path / "train.jsonl", MULTI)
    dev = write_rows(tmp_path / "dev.json", MULTI[:18])
    out = str(tmp_path / "run")
    argv = ["--train_file", train, "--validation_file", dev, "--test_file", dev, "--model_name_or_path", tiny_model,
            "--output_dir", out, "--max_steps", 4, "--learning_rate", 1e-2, "--per_device_train_batch_size", 8]  # fmt: skip
    assert train_glue.run(train_glue.parse_args([str(a) for a in argv]), threading.Event()) is False
    config = json.load(open(f"{out}/final/config.json"))
    assert (
        config["problem_type"] == "multi_label_classification"
    )  # pipeline() applies a sigmoid each
    classes = list(config["id2label"].values())
    assert classes == ["politics", "sports", "tech"]
    scores = json.load(open(f"{out}/final/eval.json"))["eval"]
    assert list(scores) == ["f1_micro", "f1_macro", "exact_match"]
    lines = open(f"{out}/predictions.tsv").read().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 19
    predicted = [json.loads(line.split("\t")[1]) for line in lines[1:]]  # each a JSON list of names
    assert all(set(names) <= set(classes) for names in predicted)
    as_matrix = np.array([[name in names for name in classes] for names in predicted], dtype=int)
    truth = np.array(
        [[name in row["label"] for name in classes] for row in MULTI[:18]], dtype=float
    )
    for metric, value in scores.items():
        assert getattr(metrics, metric)(as_matrix, truth) == pytest.approx(value), metric
    final, tokenizer = (
        AutoModelForSequenceClassification.from_pretrained(f"{out}/final"),
        AutoTokenizer.from_pretrained(tiny_model),
    )
    with torch.no_grad():  # a class is predicted where its sigmoid passes 0.5
        probabilities = torch.sigmoid(
            final(
                **tokenizer([row["text"] for row in MULTI[:18]], padding=True, return_tensors="pt")
            ).logits
        )
    assert (
        np.array_equal(as_matrix, (probabilities > 0.5).int().numpy())
        and 0 < as_matrix.sum() < as_matrix.size
    )
