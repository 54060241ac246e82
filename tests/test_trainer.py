"""trainer.py on its own, as a project that copies it uses it: a plain torch model, its own batches
and loss. The README's example is `main` below, run as a script by the first test."""

import contextlib
import inspect
import math
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import trainer
from conftest import ROOT, read_log


def main(output_dir):
    """A small regression network trained with trainer.py alone: a checkpoint every 50 steps,
    a stop on SIGTERM (after a checkpoint), a resume from the newest checkpoint at the next start."""
    torch.manual_seed(0)  # the data and the initial weights
    inputs = torch.randn(4096, 32)
    targets = inputs @ torch.randn(32, 1) + 0.1 * torch.randn(4096, 1)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(256, 1)
    )
    optimizer = trainer.build_optimizer(model, learning_rate=1e-3, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # fp32: the scaler does nothing
    # Saved in each checkpoint; a resume must match them (the global batch: the same data order).
    flags = {"seed": 0, "global_batch_size": 32 * trainer.WORLD_SIZE}
    # Resume from the newest checkpoint in output_dir, if there is one.
    progress, notes = trainer.start_or_resume(
        model, optimizer, scaler, output_dir, flags, must_match=["seed", "global_batch_size"]
    )
    print(*notes, sep="\n")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())  # stop after this step

    def evaluate(model, step):
        model.eval()
        with torch.no_grad():
            mse = F.mse_loss(model(inputs[:512]), targets[:512]).item()
        model.train()
        return {"mse": mse}

    summary = trainer.train(
        model,
        optimizer,
        scaler,
        progress,
        plan=lambda epoch: trainer.epoch_plan(
            len(inputs), epoch, batch_size=32, accumulation=1, seed=0, lengths=None
        ),
        make_batch=lambda indices: {"x": inputs[indices], "y": targets[indices]},
        loss_fn=lambda model, batch: F.mse_loss(model(batch["x"]), batch["y"], reduction="sum"),
        learning_rate=lambda updates: trainer.learning_rate_at(updates, 1e-3, 100, 2000),
        autocast=contextlib.nullcontext(),
        clip=1.0,
        evaluate=evaluate,
        output_dir=output_dir,
        flags=flags,
        total_steps=2000,
        logging_steps=50,
        eval_steps=500,
        save_steps=50,
        stop_requested=stop,
    )
    if not summary["stopped"]:
        path = os.path.join(output_dir, "model.pt")
        trainer.write_atomically(path, lambda f: torch.save(model.state_dict(), f))


if __name__ == "__main__":
    main(sys.argv[1])


def run_example(output_dir):
    env = dict(os.environ, PYTHONPATH=ROOT)  # where trainer.py is
    return subprocess.Popen([sys.executable, __file__, str(output_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip


def losses(output_dir):
    return {r["step"]: r["loss"] for r in read_log(output_dir) if "loss" in r}


def test_the_readme_example_stops_on_sigterm_and_resumes_to_the_same_weights(tmp_path):
    straight = run_example(tmp_path / "straight")
    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    out = tmp_path / "interrupted"
    process = run_example(out)
    while not (out / "log.jsonl").exists() or max(losses(out), default=0) < 300:
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    stopped_at = max(losses(out))  # a stop always saves, so the last logged step is saved
    assert stopped_at < 2000 and (out / f"checkpoint-{stopped_at}.pt").exists()
    assert not (out / "model.pt").exists()
    resumed = run_example(out)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and f"resuming from {out}/checkpoint-{stopped_at}.pt" in output
    a, b = (
        torch.load(folder / "model.pt", weights_only=True)
        for folder in (tmp_path / "straight", out)
    )
    assert all(torch.equal(a[k], b[k]) for k in a), "dropout on: the random streams must resume"
    window = {stopped_at, -(-stopped_at // 50) * 50}  # the stop's checkpoint closed its window
    kept = [
        {s: v for s, v in losses(run).items() if s not in window}
        for run in (out, tmp_path / "straight")
    ]
    assert kept[0] == kept[1] and len(kept[0]) >= 38
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-1950.pt",
        "checkpoint-2000.pt",
    ]


def test_the_readme_shows_this_example_as_it_is():
    with open(os.path.join(ROOT, "README.md")) as f:
        assert inspect.getsource(main) in f.read()


def plain_step(model, micro_batches, examples_in_step, optimizer, clip=math.inf):
    return trainer.train_step(
        model,
        micro_batches,
        loss_fn=lambda model, batch: F.mse_loss(model(batch["x"]), batch["y"], reduction="sum"),
        examples_in_step=examples_in_step,
        optimizer=optimizer,
        lr=0.1,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        autocast=contextlib.nullcontext(),
        clip=clip,
    )


def test_micro_batches_of_a_step_give_the_update_of_one_big_batch_and_nan_skips_it():
    torch.manual_seed(0)
    x, true_weights = torch.randn(64, 4), torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    y = x @ true_weights
    # 16 + 16 + 16 + 10 + 6: uneven micro-batches still weigh every example alike.
    cuts = [0, 16, 32, 48, 58, 64]
    batches = [{"x": x[a:b], "y": y[a:b]} for a, b in zip(cuts, cuts[1:], strict=False)]
    models = [torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)]
    models[1].load_state_dict(models[0].state_dict())
    initial = models[0].weight.detach().clone()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    loss_accumulated, _, applied = plain_step(models[0], batches, 64, optimizers[0])
    loss_whole, _, _ = plain_step(models[1], [{"x": x, "y": y}], 64, optimizers[1])
    assert applied and torch.allclose(loss_accumulated, loss_whole)
    torch.testing.assert_close(models[0].weight, models[1].weight)
    assert not torch.equal(models[0].weight, initial)
    assert all(p.grad is None for p in models[0].parameters())  # zero_grad(set_to_none) after
    weights = models[0].weight.detach().clone()
    poisoned = [{"x": x[:16], "y": torch.full((16, 1), float("nan"))}]
    _, grad_norm, applied = plain_step(models[0], poisoned, 16, optimizers[0])
    assert not applied and math.isnan(grad_norm) and torch.equal(models[0].weight, weights)


def test_the_learning_rate_warms_up_then_decays_linearly_to_zero():
    rates = [trainer.learning_rate_at(updates, 1e-3, 3, 10) for updates in range(12)]
    expected = [1e-3 * u / 3 for u in range(3)] + [1e-3 * (1 - k / 7) for k in range(8)] + [0.0]
    assert rates == pytest.approx(expected)


def test_weight_decay_spares_biases_and_norm_gains():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = trainer.build_optimizer(model, 1e-3, 0.1).param_groups
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def plan(monkeypatch, num_examples, batch, accumulation, world_size, rank, seed, epoch, lengths):
    monkeypatch.setattr(trainer, "WORLD_SIZE", world_size)
    monkeypatch.setattr(trainer, "RANK", rank)
    return trainer.epoch_plan(num_examples, epoch, batch_size=batch, accumulation=accumulation,
                              seed=seed, lengths=lengths)  # fmt: skip


def flatten(plan):
    return [i for _, micro in plan for ids in micro for i in ids]


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("n,batch,accumulation", [(103, 4, 1), (103, 4, 3), (64, 8, 2), (7, 1, 2)])
def test_epoch_plan_covers_every_example_once_whatever_the_world_size(
    monkeypatch, n, batch, accumulation, grouped
):
    lengths = np.random.default_rng(1).integers(5, 100, n) if grouped else None
    plans = {}
    for world in (1, 2):
        ranks = [plan(monkeypatch, n, batch * (2 // world), accumulation, world, r, 0, 3, lengths)
                 for r in range(world)]  # fmt: skip
        assert len({len(p) for p in ranks}) == 1  # every rank runs the same number of steps...
        for step in range(len(ranks[0])):
            assert len({len(p[step][1]) for p in ranks}) == 1  # ...and micro-steps in each
            assert all(len(ids) >= 1 for p in ranks for ids in p[step][1])
            assert sum(len(ids) for p in ranks for ids in p[step][1]) == ranks[0][step][0]
        seen = sorted(i for p in ranks for i in flatten(p))
        assert len(seen) == len(set(seen)) and n - len(seen) < world  # a tail < world dropped
        plans[world] = [sorted(i for p in ranks for ids in p[s][1] for i in ids)
                        for s in range(len(ranks[0]))]  # fmt: skip
    assert plans[1][:-1] == plans[2][:-1]  # the same examples in each step at world size 1 and 2


def test_epoch_plan_reshuffles_each_epoch_and_groups_lengths(monkeypatch):
    lengths = np.random.default_rng(2).integers(5, 200, 2000)
    first, again, second = (
        flatten(plan(monkeypatch, 2000, 16, 1, 1, 0, 7, e, None)) for e in (0, 0, 1)
    )
    assert first == again and first != second

    def padding(steps):
        return sum(
            len(ids) * lengths[ids].max() - lengths[ids].sum() for _, m in steps for ids in m
        )

    grouped = plan(monkeypatch, 2000, 16, 1, 1, 0, 7, 0, lengths)
    assert padding(grouped) < 0.2 * padding(plan(monkeypatch, 2000, 16, 1, 1, 0, 7, 0, None))


def test_the_step_with_the_longest_example_comes_first(monkeypatch):
    """So that running out of memory shows at the first step, not deep into an epoch."""
    lengths = np.random.default_rng(3).integers(5, 100, 500)
    lengths[417] = 128
    for epoch in range(3):
        assert 417 in plan(monkeypatch, 500, 8, 1, 1, 0, 0, epoch, lengths)[0][1][0]
