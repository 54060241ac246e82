import json
import math
import os
import shutil

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import data
import trainer
from conftest import (
    GLUE,
    checkpoint_state,
    make_tiny_model,
    model_weights,
    read_log,
    train_in_process,
)


def batch_loss(model_dir, examples, tokenizer):
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    batch = data.collate(data.tokenize(examples, tokenizer, 128), tokenizer.pad_token_id)
    labels = batch.pop("labels")
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(**batch).logits, labels).item()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_one_step_changes_weights_and_lowers_loss_on_a_fixed_batch(tiny_model, tmp_path, precision):
    flags = {"fp32": [], "bf16": ["--bf16"], "fp16": ["--fp16"]}[precision]
    out = train_in_process(
        tiny_model,
        str(tmp_path / "run"),
        "--max_train_samples",
        32,
        "--max_steps",
        1,
        "--learning_rate",
        1e-3,
        "--weight_decay",
        0,
        *flags,
    )
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
        out = train_in_process(
            tiny_model,
            str(tmp_path / f"b{batch}"),
            "--max_train_samples",
            20,
            "--num_train_epochs",
            1,
            "--per_device_train_batch_size",
            batch,
            "--gradient_accumulation_steps",
            accumulation,
            "--learning_rate",
            1e-3,
        )
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
    common = [
        "--max_train_samples",
        40,
        "--max_steps",
        8,
        "--per_device_train_batch_size",
        8 // accumulation,
        "--gradient_accumulation_steps",
        accumulation,
        "--learning_rate",
        1e-3,
        "--save_steps",
        stop,
        "--save_total_limit",
        5,
    ]
    straight = train_in_process(tiny_model_dropout, str(tmp_path / "straight"), *common)
    resumed = str(tmp_path / "resumed")
    shutil.copytree(f"{straight}/checkpoint-{stop}", f"{resumed}/checkpoint-{stop}")
    train_in_process(tiny_model_dropout, resumed, *common, "--resume_from_checkpoint", "latest")
    a, b = checkpoint_state(f"{straight}/checkpoint-8"), checkpoint_state(f"{resumed}/checkpoint-8")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])

    def losses(out):
        return {r["step"]: r["loss"] for r in read_log(out) if "loss" in r and r["step"] > stop}

    assert losses(straight) == losses(resumed) and len(losses(straight)) == 8 - stop


def plain_step(model, micro_batches, examples_in_step, optimizer, max_grad_norm=math.inf):
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return trainer.train_step(
        model,
        micro_batches,
        loss_fn=lambda model, batch: torch.nn.functional.mse_loss(
            model(batch["x"]), batch["y"], reduction="sum"
        ),
        examples_in_step=examples_in_step,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        autocast=torch.autocast("cpu", enabled=False),
        max_grad_norm=max_grad_norm,
    )


def test_train_step_works_on_a_plain_torch_model_without_our_cli_or_hugging_face():
    """The README's example: train_step with any nn.Module, any batches and a summed loss."""
    torch.manual_seed(0)
    x, true_weights = torch.randn(64, 4), torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    y = x @ true_weights
    batches = [{"x": x[i : i + 16], "y": y[i : i + 16]} for i in range(0, 64, 16)]

    # Four micro-batches of 16 give the update of one batch of 64: the summed loss over the step's
    # examples makes accumulation exact.
    models = [torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    loss_accumulated, _, applied = plain_step(models[0], batches, 64, optimizers[0])
    loss_whole, _, _ = plain_step(models[1], [{"x": x, "y": y}], 64, optimizers[1])
    assert applied and torch.allclose(loss_accumulated, loss_whole)
    torch.testing.assert_close(models[0].weight, models[1].weight)
    assert all(p.grad is None for p in models[0].parameters())  # zero_grad(set_to_none) after

    model = models[0]
    optimizer = optimizers[0]
    first_loss = loss_accumulated.item()
    for _ in range(50):
        loss, grad_norm, applied = plain_step(model, batches, 64, optimizer, max_grad_norm=1.0)
    assert loss.item() < 0.01 * first_loss and applied and math.isfinite(grad_norm)

    # A non-finite loss skips the update: the weights stay as they were.
    weights = model.weight.detach().clone()
    poisoned = [{"x": x[:16], "y": torch.full((16, 1), float("nan"))}]
    _, grad_norm, applied = plain_step(model, poisoned, 16, optimizer)
    assert not applied and math.isnan(grad_norm) and torch.equal(model.weight, weights)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_the_log_shows_the_learning_rate_of_each_step_as_scheduled(tiny_model, tmp_path, schedule):
    out = train_in_process(tiny_model, str(tmp_path / "run"), "--max_train_samples", 80,
                           "--per_device_train_batch_size", 8, "--max_steps", 10,
                           "--warmup_steps", 3, "--lr_scheduler_type", schedule,
                           "--learning_rate", 1e-3)  # fmt: skip
    logged = {r["step"]: r["lr"] for r in read_log(out) if "lr" in r}
    assert sorted(logged) == list(range(1, 11))
    for step, lr in logged.items():  # step s updates with the rate at s - 1 completed updates
        done = step - 1
        if done < 3:
            expected = 1e-3 * done / 3
        elif schedule == "linear":
            expected = 1e-3 * (1 - (done - 3) / 7)
        elif schedule == "cosine":
            expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * (done - 3) / 7))
        else:
            expected = 1e-3
        assert lr == pytest.approx(expected, abs=1e-12), (step, lr, expected)


def scripted_evaluation(monkeypatch, accuracies):
    """Make the n-th evaluation report accuracies[n - 1], so that which one is best is known."""
    calls = []

    def evaluate(args, model, *, eval_sets, pad_id, autocast):
        calls.append(1)
        return {"accuracy": accuracies[len(calls) - 1], "f1": 0.5}

    monkeypatch.setattr(trainer, "evaluate", evaluate)


def test_best_holds_the_best_evaluation_and_rotation_never_deletes_its_checkpoint(
    tiny_model, tmp_path, monkeypatch
):
    scripted_evaluation(monkeypatch, [0.5, 0.9, 0.7, 0.8, 0.6, 0.85])
    out = train_in_process(tiny_model, str(tmp_path / "run"), "--max_train_samples", 48,
                           "--per_device_train_batch_size", 8, "--eval_steps", 1, "--save_steps", 1,
                           "--save_total_limit", 1, "--learning_rate", 1e-2, "--num_train_epochs", 1)  # fmt: skip
    results = json.load(open(f"{out}/results.json"))
    assert results["best_step"] == 2 and results["best"]["accuracy"] == 0.9
    assert json.load(open(f"{out}/best/eval.json"))["step"] == 2
    # Rotation kept the newest checkpoint and the best one, nothing else.
    assert sorted(os.listdir(out)) == ["best", "checkpoint-2", "checkpoint-6", "final", "log.jsonl",
                                       "results.json"]  # fmt: skip
    best, at_step_2 = model_weights(f"{out}/best"), checkpoint_state(f"{out}/checkpoint-2")["model"]
    assert all(torch.equal(best[k], at_step_2[k]) for k in best)
    final = model_weights(f"{out}/final")
    assert any(not torch.equal(best[k], final[k]) for k in best)


def test_each_step_is_logged_once_after_resuming_from_an_earlier_checkpoint(tiny_model, tmp_path):
    common = ["--max_train_samples", 64, "--per_device_train_batch_size", 8, "--max_steps", 8,
              "--save_steps", 2, "--save_total_limit", 10]  # fmt: skip
    out = train_in_process(tiny_model, str(tmp_path / "run"), *common)
    straight = [r for r in read_log(out) if "loss" in r]
    train_in_process(tiny_model, out, *common, "--resume_from_checkpoint", f"{out}/checkpoint-4")
    resumed = [r for r in read_log(out) if "loss" in r]
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]


def test_a_checkpoint_stored_in_bf16_trains_with_fp32_weights_and_optimizer_state(tmp_path):
    """transformers loads weights in the dtype the checkpoint was saved in; AdamW's small updates
    would vanish in bf16 master weights, so the trainer loads fp32 whatever it finds."""
    bf16_model = make_tiny_model(str(tmp_path / "bf16-model"), dropout=0.0, dtype=torch.bfloat16)
    assert {v.dtype for v in model_weights(bf16_model).values()} == {torch.bfloat16}
    out = train_in_process(bf16_model, str(tmp_path / "run"), "--max_train_samples", 16,
                           "--per_device_train_batch_size", 8, "--max_steps", 2, "--bf16")  # fmt: skip
    state = checkpoint_state(f"{out}/checkpoint-2")
    assert {v.dtype for v in state["model"].values() if v.is_floating_point()} == {torch.float32}
    moments = [s["exp_avg"].dtype for s in state["optimizer"]["state"].values()]
    assert moments and set(moments) == {torch.float32}
    assert {v.dtype for v in model_weights(f"{out}/final").values()} == {torch.float32}


def test_a_nan_metric_is_never_the_best():
    """STS-B's correlations are NaN while the predictions are constant."""
    assert trainer.is_better(0.5, None) and trainer.is_better(0.6, 0.5)
    assert not trainer.is_better(0.4, 0.5) and not trainer.is_better(0.5, 0.5)
    assert not trainer.is_better(float("nan"), None) and not trainer.is_better(float("nan"), 0.1)


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
