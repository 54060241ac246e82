"""trainer.py on its own, as a project that copies it uses it: a plain torch model, its own batches
and loss. The README's example.py is run as printed: stopped, resumed, and under torchrun."""

import contextlib
import functools
import math
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import trainer
from conftest import ROOT, read_log


def readme_example(folder):
    """example.py as the README prints it, written into `folder`; its commands, as printed."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    (folder / "example.py").write_text(readme.split("```python\n")[1].split("```")[0])
    return [
        shlex.split(line)
        for line in readme.splitlines()
        if line.endswith(" example.py runs/example")
    ]


def run_example(folder, command):
    env = dict(os.environ, PYTHONPATH=ROOT)  # where trainer.py is
    if command[0] == "python":
        command = [sys.executable, *command[1:]]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=folder)  # fmt: skip


def losses(output_dir):
    return {r["step"]: r["loss"] for r in read_log(output_dir) if "loss" in r}


def test_the_readme_example_stops_on_sigterm_and_resumes_to_the_same_weights(tmp_path):
    python, _ = readme_example(tmp_path)
    (tmp_path / "resumed").mkdir()
    readme_example(tmp_path / "resumed")
    straight = run_example(tmp_path, python)
    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    folder = tmp_path / "resumed"
    out = folder / "runs/example"
    process = run_example(folder, python)
    while not (out / "log.jsonl").exists() or max(losses(out), default=0) < 300:
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    stopped_at = max(losses(out))  # a stop always saves, so the last logged step is saved
    assert stopped_at < 2000 and (out / f"checkpoint-{stopped_at}.pt").exists()
    assert not (out / "model.pt").exists()
    resumed = run_example(folder, python)
    output = resumed.communicate(timeout=300)[0]
    assert (
        resumed.returncode == 0
        and f"resuming from runs/example/checkpoint-{stopped_at}.pt" in output
    )
    assert output.startswith("resuming from") and not straight.stdout.read().startswith("\n")
    a, b = (torch.load(folder / "runs/example/model.pt", weights_only=True)
            for folder in (tmp_path, folder))  # fmt: skip
    assert all(torch.equal(a[k], b[k]) for k in a), "dropout on: the random streams must resume"
    window = {stopped_at, -(-stopped_at // 50) * 50}  # the stop's checkpoint closed its window
    kept = [
        {s: v for s, v in losses(run).items() if s not in window}
        for run in (out, tmp_path / "runs/example")
    ]
    assert kept[0] == kept[1] and len(kept[0]) >= 38
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-1950.pt",
        "checkpoint-2000.pt",
    ]


def test_the_readme_example_runs_under_torchrun_as_printed_and_refuses_another_world_size(tmp_path):
    python, torchrun = readme_example(tmp_path)
    assert torchrun[:2] == ["torchrun", "--nproc_per_node=2"]
    (tmp_path / "other").mkdir()
    readme_example(tmp_path / "other")
    assert run_example(tmp_path / "other", python).wait(timeout=300) == 0  # one process: batch 32
    refused = run_example(tmp_path / "other", torchrun)  # two: a global batch of 64
    output = refused.communicate(timeout=300)[0]
    assert refused.returncode != 0
    assert (
        output.count(
            "error: cannot resume runs/example/checkpoint-2000.pt: it is another run (global_batch_size 32 -> 64"
        )
        == 1
    ), output
    assert 'example.py", line' not in output and 'trainer.py", line' not in output  # no traceback
    assert "terminate called" not in output and "(SIGTERM)" not in output  # each rank exits 1
    process = run_example(tmp_path, torchrun)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-3000:]
    mse = [
        record["eval"]["mse"] for record in read_log(tmp_path / "runs/example") if "eval" in record
    ]
    assert len(mse) == 4 and mse[-1] < mse[0] and (tmp_path / "runs/example/model.pt").exists()


def mse_sum(model, batch):
    return F.mse_loss(model(batch["x"]), batch["y"], reduction="sum"), len(batch["y"])


def plain_step(model, micro_batches, examples_in_step, optimizer, clip=math.inf):
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return trainer.train_step(model, micro_batches, examples_in_step, 0.1, mse_sum, optimizer,
                              scaler, contextlib.nullcontext, clip)  # fmt: skip


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


def small_run(output_dir, *, flags=None, must_match=(), make_batch=None, loss_fn=None,
              autocast=contextlib.nullcontext, steps=3, model=None, scaler=None, stop=None):  # fmt: skip
    """trainer.train on a linear regression, with the pieces a copier may pass differently."""
    torch.manual_seed(0)
    inputs, targets = torch.randn(64, 4), torch.randn(64, 1)
    model = model or torch.nn.Linear(4, 1)
    optimizer = trainer.build_optimizer(model, 1e-2, 0.0)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    flags = {"seed": 0} if flags is None else flags
    progress, _ = trainer.start_or_resume(model, optimizer, scaler, output_dir, flags, must_match)
    summary = trainer.train(
        model, optimizer, scaler, progress,
        plan=lambda epoch: trainer.epoch_plan(64, epoch, batch_size=8, accumulation=1, seed=0, lengths=None),
        make_batch=make_batch or (lambda ids: {"x": inputs[ids], "y": targets[ids]}),
        loss_fn=loss_fn or mse_sum,
        learning_rate=lambda updates: 1e-2, autocast=autocast, clip=1.0,
        evaluate=lambda model, step: {"weight": model.weight.sum().item()},
        output_dir=output_dir, flags=flags, total_steps=steps, logging_steps=1, eval_steps=100,
        save_steps=100, stop_requested=stop or threading.Event(),
    )  # fmt: skip
    return model, scaler, summary


def test_batches_may_be_tuples_and_autocast_any_context_factory(tmp_path):
    """A DataLoader's collate gives tuples; a @contextmanager wrapper can be entered only once."""
    entered = []

    @contextlib.contextmanager
    def counting_autocast():
        entered.append(1)
        yield

    inputs, targets = torch.randn(64, 4), torch.randn(64, 1)
    small_run(str(tmp_path), make_batch=lambda ids: (inputs[ids], [targets[ids]]),
              loss_fn=lambda m, b: (F.mse_loss(m(b[0]), b[1][0], reduction="sum"), len(b[0])),
              autocast=counting_autocast)  # fmt: skip
    assert len(entered) == 3
    batch = trainer.to_device((inputs, [targets], {"y": targets}, "text"), torch.device("meta"))
    assert [batch[0].device, batch[1][0].device, batch[2]["y"].device] == [torch.device("meta")] * 3
    assert type(batch) is tuple and type(batch[1]) is list and batch[3] == "text"
    Batch = namedtuple("Batch", "x y")
    moved = trainer.to_device(Batch(inputs, targets), torch.device("meta"))
    assert type(moved) is Batch and moved.y.device == torch.device("meta")


@pytest.mark.parametrize("value", [pathlib.Path("runs/x"), np.int64(3), np.float64(0.5)])
def test_a_flag_that_is_not_a_plain_value_is_refused_before_anything_is_written(tmp_path, value):
    with pytest.raises(ValueError, match="flags\\['path'\\] is a .*: give a plain value"):
        small_run(str(tmp_path / "run"), flags={"seed": 0, "path": value})
    assert not (tmp_path / "run").exists()


def test_a_value_that_a_checkpoint_could_not_load_back_is_refused_by_its_key(tmp_path):
    def evaluate(model, step):
        progress["best"] = np.float64(
            0.5
        )  # a numpy scalar: torch.load(weights_only=True) refuses it
        return {}

    model = torch.nn.Linear(4, 1)
    optimizer, scaler = (
        trainer.build_optimizer(model, 1e-2, 0.0),
        torch.amp.GradScaler("cpu", enabled=False),
    )
    progress, _ = trainer.start_or_resume(model, optimizer, scaler, str(tmp_path), {"seed": 0}, [])
    with pytest.raises(ValueError, match="progress\\['best'\\] is a float64: give a plain value"):
        trainer.train(model, optimizer, scaler, progress, plan=lambda epoch: [(8, [list(range(8))])],
                      make_batch=lambda ids: {"x": torch.randn(8, 4), "y": torch.randn(8, 1)}, loss_fn=mse_sum,
                      learning_rate=lambda updates: 1e-2, autocast=contextlib.nullcontext, clip=1.0,
                      evaluate=evaluate, output_dir=str(tmp_path), flags={"seed": 0}, total_steps=1,
                      logging_steps=1, eval_steps=1, save_steps=1, stop_requested=threading.Event())  # fmt: skip
    assert not list(tmp_path.glob("checkpoint-*"))


def test_a_must_match_name_that_is_no_flag_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="flags has no \\['sede'\\]: seed and each must_match"):
        small_run(str(tmp_path), must_match=["sede"])
    with pytest.raises(ValueError, match="flags has no \\['seed'\\]"):
        small_run(str(tmp_path), flags={"lr": 0.1})


def test_no_checkpoint_loads_says_why_for_each(tmp_path):
    small_run(str(tmp_path), flags={"seed": 0, "note": "x"})  # checkpoint-3.pt
    (tmp_path / "checkpoint-5.pt").write_bytes(b"not a checkpoint")
    state = torch.load(tmp_path / "checkpoint-3.pt", weights_only=True)
    del state["rng"]
    torch.save(state, tmp_path / "checkpoint-3.pt")
    with pytest.raises(ValueError) as error:
        small_run(str(tmp_path), steps=6)
    message = str(error.value)
    assert "fix or remove them: checkpoint-5.pt: " in message
    assert "; checkpoint-3.pt: 'keys are missing'" in message


def test_a_run_relaunched_at_its_end_logs_each_evaluation_once(tmp_path):
    small_run(str(tmp_path))  # 3 steps, evaluated at the last
    small_run(str(tmp_path))  # relaunched: nothing left to do
    steps = [(r["step"], "eval" in r) for r in read_log(tmp_path)]
    assert steps == [(1, False), (2, False), (3, False), (3, True)]
    stop, out = threading.Event(), str(tmp_path / "shortened")
    stop.set()
    small_run(out, steps=4, stop=stop)  # stops after step 1, with a checkpoint, unevaluated
    for _ in range(2):  # relaunched as a 1-step run: evaluated at its end, once
        _, _, summary = small_run(out, steps=1)
    assert [(r["step"], "eval" in r) for r in read_log(out)] == [(1, False), (1, True)]
    assert summary["eval"] == read_log(out)[1]["eval"]


def test_an_fp16_resume_restores_the_loss_scale_after_an_overflow(tmp_path):
    """One example is huge: its step overflows fp16 and halves the scale. A resume from a
    checkpoint after that must go on with the halved scale, as the straight run does."""
    inputs, targets = torch.randn(64, 4), torch.randn(64, 1)
    inputs[np.random.default_rng([0, 0]).permutation(64)[0]] = 3e4  # in the first step

    def run(output_dir, stop_after=None):
        torch.manual_seed(1)
        model, scaler, stop = torch.nn.Linear(4, 1), torch.amp.GradScaler("cpu"), threading.Event()

        def make_batch(ids):
            if stop_after and len(seen) == stop_after:
                stop.set()
            seen.append(ids)
            return {"x": inputs[ids], "y": targets[ids]}

        seen = []
        half = functools.partial(torch.autocast, "cpu", torch.float16)
        return small_run(str(output_dir), make_batch=make_batch, autocast=half, steps=8,
                         model=model, scaler=scaler, stop=stop)  # fmt: skip

    straight_model, straight_scaler, _ = run(tmp_path / "straight")
    _, _, summary = run(tmp_path / "resumed", stop_after=5)
    saved = torch.load(tmp_path / "resumed" / f"checkpoint-{summary['step']}.pt", weights_only=True)
    assert summary["stopped"] and saved["scaler"]["scale"] < 65536.0  # the overflow came before
    model, scaler, _ = run(tmp_path / "resumed")
    assert scaler.get_scale() == straight_scaler.get_scale()
    assert torch.equal(model.weight, straight_model.weight)
    assert torch.equal(model.bias, straight_model.bias)


def test_steps_within_a_window_of_50_are_shuffled(monkeypatch):
    """Sorted by length within each window of 50 steps, then shuffled: unshuffled, the steps
    would run from the longest examples to the shortest, window after window."""
    lengths = np.random.default_rng(4).integers(5, 200, 1600)
    steps = plan(monkeypatch, 1600, 16, 1, 1, 0, 0, 0, lengths)
    longest = [lengths[ids].max() for _, micro in steps[1:] for ids in micro]
    falls = np.mean(np.diff(longest) < 0)
    assert 0.3 < falls < 0.7  # about half, as in a random order; 1.0 unshuffled


def test_the_docstring_example_of_the_epoch_plan(monkeypatch):
    order = np.random.default_rng([0, 0]).permutation(100)
    ranks = [plan(monkeypatch, 100, 8, 2, 2, rank, 0, 0, None) for rank in (0, 1)]
    assert [examples for examples, _ in ranks[0]] == [32, 32, 32, 4]
    assert ranks[0][0][1] == [order[0:8].tolist(), order[16:24].tolist()]
    assert ranks[1][0][1] == [order[8:16].tolist(), order[24:32].tolist()]
    assert ranks[0][-1][1] == [order[96:98].tolist()] and ranks[1][-1][1] == [
        order[98:100].tolist()
    ]
    short = plan(monkeypatch, 20, 8, 4, 1, 0, 0, 0, None)  # the comment's short step
    assert [len(ids) for ids in short[0][1]] == [7, 7, 6]


@pytest.mark.parametrize("examples", [0, 1])
def test_fewer_examples_than_ranks_is_one_error_not_an_empty_plan(monkeypatch, examples):
    monkeypatch.setattr(trainer, "WORLD_SIZE", 2)
    with pytest.raises(trainer.AllRanksError, match=f"{examples} examples cannot feed 2 ranks"):
        trainer.epoch_plan(examples, 0, batch_size=8, accumulation=1, seed=0, lengths=None)


def test_an_error_without_a_message_still_stops_every_rank_and_keeps_its_traceback():
    with pytest.raises(trainer.AllRanksError, match=r"NotImplementedError\(\)") as raised:
        trainer.check_all_ranks(NotImplementedError())
    assert isinstance(raised.value.__cause__, NotImplementedError)  # what --debug shows


TOKENS_SCRIPT = """
import contextlib, sys
import torch, torch.nn.functional as F
import trainer

trainer.setup_distributed()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50))
reference = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50))
reference.load_state_dict(model.state_dict())
# 4 micro-batches: rank 0 gets examples 0-7 then 8-14, rank 1 gets 15-22 then 23-29 (30 in the
# step); each example has 3 to 12 labelled tokens, -100 past its end: 4 different token counts.
tokens = torch.randint(0, 50, (30, 12))
labels = torch.randint(0, 50, (30, 12))
labels[torch.arange(12) >= torch.randint(3, 13, (30, 1))] = -100
pieces = [(0, 8), (8, 15)] if trainer.RANK == 0 else [(15, 23), (23, 30)]

def loss_fn(model, batch):  # summed over the labelled tokens, and how many
    x, y = batch
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    return loss, (y != -100).sum()

ddp = torch.nn.parallel.DistributedDataParallel(model)
optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
before = [p.detach().clone() for p in model.parameters()]
scaler = torch.amp.GradScaler("cpu", enabled=False)
loss_and_items, _, _ = trainer.train_step(ddp, [(tokens[a:b], labels[a:b]) for a, b in pieces], 30,
                                          1.0, loss_fn, optimizer, scaler, contextlib.nullcontext, 1e9)
mean = F.cross_entropy(reference(tokens).flatten(0, 1), labels.flatten(), ignore_index=-100)
mean.backward()  # one big batch: the mean over all its labelled tokens
for old, new, ref in zip(before, model.parameters(), reference.parameters()):
    torch.testing.assert_close(old - new.detach(), ref.grad, rtol=1e-4, atol=1e-6)
assert loss_and_items[1] == (labels[[i for a, b in pieces for i in range(a, b)]] != -100).sum()
print("gradients of the mean over", int((labels != -100).sum()), "tokens", flush=True)
del ddp  # it holds the group: alive at exit, gloo's threads may abort it (test_distributed.py)
torch.distributed.destroy_process_group()
"""


def test_a_loss_over_tokens_normalises_by_the_steps_tokens_across_micro_batches_and_ranks(tmp_path):
    """loss_fn says how many items its sum covers: the step divides by all ranks' items, so the
    gradients are the mean over every labelled token of the step, as one big batch gives."""
    (tmp_path / "tokens.py").write_text(TOKENS_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    result = subprocess.run([*command, str(tmp_path / "tokens.py")], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("gradients of the mean over") == 2
