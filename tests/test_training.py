import shutil

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import data
from conftest import GLUE, checkpoint_state, model_weights, read_log, train_in_process


def batch_loss(model_dir, examples, tokenizer):
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    batch = data.collate(data.tokenize(examples, tokenizer, 128), tokenizer.pad_token_id)
    labels = batch.pop("labels")
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(**batch).logits, labels).item()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_one_step_changes_weights_and_lowers_loss_on_a_fixed_batch(tiny_model, tmp_path, precision):
    flags = {"fp32": [], "bf16": ["--bf16"], "fp16": ["--fp16"]}[precision]
    out = train_in_process(tiny_model, str(tmp_path / "run"), "--max_train_samples", 32, "--max_steps", 1,
                           "--learning_rate", 1e-3, "--weight_decay", 0, *flags)
    before, after = model_weights(tiny_model), model_weights(f"{out}/final")
    changed = [k for k in after if k in before and not torch.equal(before[k], after[k])]
    assert len(changed) > 10, f"{precision}: only {changed} changed"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    split = data.load_split("mrpc", "train", GLUE)
    batch = {k: v[:32] for k, v in split.items()}
    assert batch_loss(f"{out}/final", batch, tokenizer) < batch_loss(tiny_model, batch, tokenizer)


def test_gradient_accumulation_matches_one_big_batch(tiny_model, tmp_path):
    """20 examples, global batch 8: steps of 8, 8 and a short 4, however the micro-batches are cut."""
    finals = []
    for batch, accumulation in ((8, 1), (4, 2), (2, 4)):
        out = train_in_process(tiny_model, str(tmp_path / f"b{batch}"), "--max_train_samples", 20,
                               "--num_train_epochs", 1, "--per_device_train_batch_size", batch,
                               "--gradient_accumulation_steps", accumulation, "--learning_rate", 1e-3)
        assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3]
        finals.append(model_weights(f"{out}/final"))
    moved = sum((finals[0][k] - model_weights(tiny_model)[k]).abs().max().item() for k in finals[0])
    assert moved > 1e-3
    for other in finals[1:]:
        for k in finals[0]:
            torch.testing.assert_close(other[k], finals[0][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("accumulation,stop", [(1, 5), (2, 3)])
def test_resume_mid_epoch_is_bitwise_exact(tiny_model_dropout, tmp_path, accumulation, stop):
    """N steps straight == N/2, stop, resume, N/2 more: same weights, optimizer state and losses, bit for bit.
    40 examples at global batch 8 (or 2x4) make 5 steps an epoch: the stop falls mid-epoch; dropout is on."""
    common = ["--max_train_samples", 40, "--max_steps", 8, "--per_device_train_batch_size", 8 // accumulation,
              "--gradient_accumulation_steps", accumulation, "--learning_rate", 1e-3, "--save_steps", stop, "--save_total_limit", 5]
    straight = train_in_process(tiny_model_dropout, str(tmp_path / "straight"), *common)
    resumed = str(tmp_path / "resumed")
    shutil.copytree(f"{straight}/checkpoint-{stop}", f"{resumed}/checkpoint-{stop}")
    train_in_process(tiny_model_dropout, resumed, *common, "--resume_from_checkpoint", "latest")
    a, b = checkpoint_state(f"{straight}/checkpoint-8"), checkpoint_state(f"{resumed}/checkpoint-8")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
    losses = lambda out: {r["step"]: r["loss"] for r in read_log(out) if "loss" in r and r["step"] > stop}
    assert losses(straight) == losses(resumed) and len(losses(straight)) == 8 - stop
