"""A training loop in plain PyTorch for any nn.Module, in chapters to read top to bottom:

1. Processes and devices
2. One training step  <- the heart: forward, backward, clip, update
3. The epoch plan     <- which examples each rank trains on, step by step
4. The loop           <- steps, logging, evaluation, checkpoints, stopping
5. Checkpoints and resume
It imports only the standard library, numpy and torch: copy it into your project (README.md has
a whole program). train() calls, on every rank: plan(epoch) for this rank's steps (epoch_plan);
make_batch(indices) for their batches (tensors in dicts, lists, tuples); loss_fn(model, batch),
with DDP's wrapper as the model, for (a loss summed over items, how many: see train_step);
evaluate(model, step), with the plain model, for a dict of floats (a collective inside it runs on
every rank; it may set progress["early_stopped"]); stop_requested.is_set() (once true on any rank,
all save and stop after the step); on rank 0, report(record) with each record (default: print).
logging_steps, eval_steps, save_steps: None or 0 for never; the last step logs, evaluates, saves.
"""

import contextlib
import datetime
import functools
import json
import math
import os
import re
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  now, before any process group exists: see below

# === 1. Processes and devices ====================================================================

# torchrun starts a process per GPU (or CPU slot) and tells each who it is; `python` is 0 of 1.
RANK = int(os.environ.get("RANK", 0))
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))  # on this machine
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", 1))


def setup_distributed(timeout_seconds=1800):
    """Join the process group torchrun prepared. Returns the device this process trains on."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", LOCAL_RANK) if cuda else torch.device("cpu")
    if cuda:  # before anything touches CUDA, or every rank would also open a context on GPU 0
        torch.cuda.set_device(device)
    if WORLD_SIZE > 1:
        # NCCL reduces the GPU tensors (DDP's gradients), gloo the CPU ones. The timeout bounds
        # every collective, the wait while rank 0 writes a checkpoint included.
        # torch.distributed.nn is imported above, before the group: imported after it (the first
        # optimizer does) it keeps the group alive, and gloo's threads can then abort the exit.
        timeout = datetime.timedelta(seconds=timeout_seconds)
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timeout)
    return device


def all_gather(obj):
    """Every rank's `obj`, in rank order; through gloo, so it never waits for the GPU."""
    gathered = [obj] * WORLD_SIZE
    if WORLD_SIZE > 1:
        dist.all_gather_object(gathered, obj)
    return gathered


class AllRanksError(ValueError):
    """An error every rank raises together: report it once per machine, not once per rank."""


def check_all_ranks(error):
    """Every rank raises the first error any rank met in this phase, so none waits for the rest."""
    errors = [message for message in all_gather(error and (str(error) or repr(error))) if message]
    if errors:  # --debug shows the traceback of the rank that met it
        raise AllRanksError(errors[0]) from (error if isinstance(error, Exception) else None)


def to_device(batch, device):
    """A batch's tensors, nested in dicts, lists and tuples, on the device; the rest as it is."""
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, list | tuple):
        values = [to_device(value, device) for value in batch]
        return type(batch)(*values) if hasattr(batch, "_fields") else type(batch)(values)
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


# === 2. One training step ========================================================================


def build_optimizer(model, learning_rate, weight_decay):
    """AdamW with weight decay on the weight matrices only. Decay pulls weights towards zero;
    biases and normalisation gains (the 1-D parameters, in any architecture) should not shrink."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate, fused=True)  # one kernel for all updates


def learning_rate_at(updates, peak, warmup_steps, total_steps):
    """The rate after `updates` applied updates: a linear warmup from 0 to the peak, then a linear
    decay to 0 at total_steps. A function of the count alone: a resume has nothing to restore.
    Skipped steps (non-finite gradients) are no updates, as in Hugging Face's Trainer: after k of
    them the run ends at k/(total_steps - warmup_steps) of the peak, not at 0."""
    if updates < warmup_steps:
        return peak * updates / warmup_steps
    return peak * max(0.0, 1 - (updates - warmup_steps) / max(1, total_steps - warmup_steps))


def train_step(
    model, micro_batches, examples_in_step, lr, loss_fn, optimizer, scaler, autocast, clip
):
    """One optimizer step at learning rate `lr` over this rank's micro-batches (on the device).
    loss_fn(model, batch) returns (the batch's loss *summed* over its items, their number): items
    are what the loss averages over (examples, tokens, labelled positions); the gradients become
    those of the mean over all the step's items on all ranks. examples_in_step: the step's
    examples on all ranks. autocast(): a fresh context for each forward, e.g.
    functools.partial(torch.autocast, "cuda", torch.bfloat16), or contextlib.nullcontext (fp32).
    Returns (this rank's loss sum and items, the gradient norm before clipping, whether applied).

    For example, 2 ranks, each with micro-batches of 8 and 7 examples (30 in the step), holding
    100 and 90 tokens on rank 0, 120 and 50 on rank 1 (360). Each summed loss is multiplied by
    2/30 before its backward, and DDP averages the 2 ranks' gradients: they hold the step's sum /
    30. The items, all-reduced to 360, then scale them by 30/360: the mean over the step's tokens,
    as one batch of 360 tokens gives (for examples, 30/30 changes nothing). Dividing by the
    examples first keeps fp16 gradients in range; with tokens, lower GradScaler's init_scale."""
    loss_weight = WORLD_SIZE / examples_in_step  # x WORLD_SIZE: DDP's average back to the sum
    losses, items = [], 0
    for index, batch in enumerate(micro_batches):
        # Under DDP each backward all-reduces the gradients across ranks. Between micro-batches
        # only the local sum is needed: no_sync() skips that communication until the last one.
        last = index == len(micro_batches) - 1
        with contextlib.nullcontext() if WORLD_SIZE == 1 or last else model.no_sync():
            # autocast covers the forward and the loss: matmuls in bf16/fp16, range-sensitive ops
            # in fp32. The backward stays outside: each op's backward runs in its forward's dtype.
            with autocast():
                loss, count = loss_fn(model, batch)
            # fp16 gradients below ~6e-8 underflow to zero, so the scaler multiplies the loss by
            # a large factor first (without fp16 it is disabled and does nothing).
            scaler.scale(loss * loss_weight).backward()
        losses.append(loss.detach())
        items += count
    items = torch.zeros((), dtype=torch.float64, device=loss.device) + items  # no host sync
    loss_and_items = torch.stack([sum(losses).double(), items])
    step_items = loss_and_items[1].clone()  # all ranks' next; the log window keeps this rank's
    if WORLD_SIZE > 1:
        dist.all_reduce(step_items)
    # Divide the fp16 loss scale out of the gradients first: clipping compares the true norm.
    scaler.unscale_(optimizer)
    for parameter in model.parameters():  # from the mean over examples to the mean over items
        if parameter.grad is not None:
            parameter.grad *= examples_in_step / step_items
    # .item() is the step's one wait for the device: the host decides whether to apply the update.
    # A NaN/inf gradient (an fp16 overflow, or a real divergence) skips it.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
    update_applied = math.isfinite(grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if update_applied:
        scaler.step(optimizer)  # optimizer.step(), through the fp16 scaler's bookkeeping
    scaler.update()  # fp16: halve the scale after an overflow, grow it after many good steps
    optimizer.zero_grad(set_to_none=True)  # the next backward writes them, not adds to zeros
    return loss_and_items, grad_norm, update_applied


# === 3. The epoch plan ===========================================================================


def epoch_plan(num_examples, epoch, *, batch_size, accumulation, seed, lengths):
    """This rank's work for one epoch: a list of steps, each (the number of examples in the step
    on all ranks, [this rank's micro-batches as lists of example indices]). The order depends only
    on (seed, epoch) and the global batch, never on how that is split into ranks and micro-batches:
    every rank derives it alone, and a resumed run rebuilds it. Given `lengths`, steps hold
    examples of similar length, the longest first: running out of memory shows at once.

    For example, 100 examples, batch_size 8, accumulation 2, two ranks, no lengths; `order` is the
    epoch's shuffle. A step takes 8 x 2 x 2 = 32 examples: three full steps, then a short one of
    the last 4. The first step, order[0:32], is cut into four micro-batches of 8: rank 0 trains on
    order[0:8] then order[16:24], rank 1 on order[8:16] then order[24:32]. The short step is one
    micro-batch on each rank: order[96:98] on rank 0, order[98:100] on rank 1."""
    generator, world_size = np.random.default_rng([seed, epoch]), WORLD_SIZE
    if num_examples < world_size:
        raise AllRanksError(f"{num_examples} examples cannot feed {world_size} ranks: start fewer")
    order = generator.permutation(num_examples)
    step_size = batch_size * accumulation * world_size
    if lengths is not None:  # sorted within windows of 50 steps: the steps are shuffled below
        windows = [order[i : i + 50 * step_size] for i in range(0, num_examples, 50 * step_size)]
        order = np.concatenate([w[np.argsort(-lengths[w], kind="stable")] for w in windows])
    steps = [order[i : i + step_size] for i in range(0, num_examples, step_size)]
    short = [steps.pop()] if len(steps[-1]) < step_size else []  # a short step stays last, but
    short = [s for s in short if len(s) >= world_size]  # fewer examples than ranks are dropped
    if lengths is not None and steps:
        steps = [steps[i] for i in generator.permutation(len(steps))]
        longest = max(range(len(steps)), key=lambda s: lengths[steps[s]].max())
        steps.insert(0, steps.pop(longest))
    plan = []
    for step in steps + short:
        # As many micro-batches as batch_size needs (fewer in a short step), as many on every rank
        # (DDP needs it), sizes evened by array_split: 20 examples at batch 8 on one rank: 7, 7, 6.
        micro_steps = min(math.ceil(len(step) / (batch_size * world_size)), len(step) // world_size)
        pieces = np.array_split(step, micro_steps * world_size)  # rank r: pieces r, r + W, ...
        plan.append((len(step), [p.tolist() for p in pieces[RANK::world_size]]))
    return plan


# === 4. The loop =================================================================================


def train(
    model,
    optimizer,
    scaler,
    progress,
    *,
    plan,
    make_batch,
    loss_fn,
    learning_rate,
    autocast,
    clip,
    evaluate,
    output_dir,
    flags,
    total_steps,
    logging_steps,
    eval_steps,
    save_steps,
    stop_requested,
    report=print,
):
    """Train from `progress` to total_steps on every rank, calling what this module's docstring
    lists. Returns progress: `eval`, the last evaluation's scores, and `stopped` among its keys."""
    device = next(model.parameters()).device
    # DDP all-reduces the gradients across ranks during backward, overlapped with it.
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if WORLD_SIZE > 1 else model
    plan = functools.lru_cache(maxsize=1)(plan)  # each epoch's plan is made once
    steps_per_epoch, launch_step, stopped = len(plan(0)), progress["step"], False
    window = torch.zeros(2, dtype=torch.float64, device=device)  # loss and items since the log
    truncate_log(output_dir, launch_step)  # the first write
    while progress["step"] < total_steps and not (stopped or progress.get("early_stopped")):
        model.train()  # dropout on: a model may come in eval mode, and evaluate() may leave it so
        started = time.perf_counter()
        epoch, step_in_epoch = divmod(progress["step"], steps_per_epoch)
        examples_in_step, micro_batch_ids = plan(epoch)[step_in_epoch]
        batches = [to_device(make_batch(ids), device) for ids in micro_batch_ids]
        lr = learning_rate(progress["step"] - progress["skipped_steps"])  # counts updates
        loss_and_items, grad_norm, update_applied = train_step(
            ddp_model, batches, examples_in_step, lr, loss_fn, optimizer, scaler, autocast, clip
        )
        window += loss_and_items
        step = count_step(progress, update_applied, examples_in_step, time.perf_counter() - started)
        if step <= launch_step + 2:  # a launch's first steps compile and fill caches: no pace yet
            clock = (step, time.perf_counter())
        stopped = any(all_gather(stop_requested.is_set()))  # all stop after the same step
        scores = evaluate(model, step) if due(step, eval_steps, total_steps) else None
        # A stop of any kind saves, so that a relaunch continues it instead of redoing steps.
        save = stopped or progress.get("early_stopped") or due(step, save_steps, total_steps)
        if save or due(step, logging_steps, total_steps):  # a save closes the log window
            eta = seconds_left(clock, step, total_steps)
            window = log(output_dir, report, window, progress, lr, grad_norm, eta)
        if scores is not None:  # evaluate() got the plain model: the DDP wrapper is for training
            log_evaluation(output_dir, report, progress, scores)
        if save:
            save_checkpoint(output_dir, model, optimizer, scaler, progress, flags)
    if progress.get("evaluated") != progress["step"] and not stopped:  # resumed at the end
        log_evaluation(output_dir, report, progress, evaluate(model, progress["step"]))
        save_checkpoint(output_dir, model, optimizer, scaler, progress, flags)  # with the scores
    return dict(progress, stopped=stopped)


def due(step, every, total_steps):
    """Whether it is time: every `every` steps (None or 0: never) and at the last step."""
    return step == total_steps or bool(every) and step % every == 0


def count_step(progress, update_applied, examples, seconds):
    """Count a step, and return it. Ten in a row with non-finite gradients stop the run."""
    progress["step"] += 1
    progress["examples"] += examples
    progress["seconds"] += seconds
    progress["skipped_steps"] += not update_applied
    progress["nonfinite_streak"] = 0 if update_applied else progress["nonfinite_streak"] + 1
    if progress["nonfinite_streak"] == 10:
        raise AllRanksError(
            f"10 steps in a row up to step {progress['step']} had non-finite gradients: lower "
            "the learning rate, use bf16 rather than fp16, or check the data"
        )
    return progress["step"]


def seconds_left(clock, step, total_steps):
    """Wall time to the end at the pace since `clock` (a step, when it ended); None at that step."""
    if step > clock[0]:
        return (time.perf_counter() - clock[1]) / (step - clock[0]) * (total_steps - step)


def log(output_dir, report, window, progress, lr, grad_norm, eta):
    """Rank 0 logs the steps since the last record; returns the next window: zeros."""
    if WORLD_SIZE > 1:
        dist.all_reduce(window)
    loss_sum, items = window.tolist()  # waits for the device: once a record, not every step
    logged_examples, logged_seconds = progress["logged"]
    examples, seconds = progress["examples"] - logged_examples, progress["seconds"] - logged_seconds
    progress["logged"] = [progress["examples"], progress["seconds"]]
    record = {
        "step": progress["step"],
        "loss": loss_sum / items,
        "lr": lr,
        "grad_norm": grad_norm,
        "skipped_steps": progress["skipped_steps"],
        "samples_per_second": examples / seconds,
        "eta_seconds": eta,
    }
    append_log(output_dir, report, record)
    return torch.zeros_like(window)


def log_evaluation(output_dir, report, progress, scores):
    """Logs the scores, and keeps them in progress: a resume at the end has them."""
    progress |= {"evaluated": progress["step"], "eval": scores}
    append_log(output_dir, report, {"step": progress["step"], "eval": scores})


def append_log(output_dir, report, record):
    """Rank 0 appends in place (truncate_log drops a line a kill cut short), then reports."""
    if RANK == 0:
        with open(os.path.join(output_dir, "log.jsonl"), "a") as f:
            f.write(to_json(record) + "\n")
        report(record)


def to_json(record, indent=None):
    """JSON with null for a NaN or infinite number, which JSON has no word for (jq, JavaScript)."""
    return json.dumps(json.loads(json.dumps(record), parse_constant=lambda _: None), indent=indent)


# === 5. Checkpoints and resume ===================================================================
# A resumed run continues exactly where the interrupted one stopped: the step is its position in
# the data and the schedule, and each rank's torch random streams go on (draw dropout from them).


def start_or_resume(model, optimizer, scaler, output_dir, flags, must_match):
    """Load the newest checkpoint in output_dir (none there, or None: start afresh) into the
    freshly built objects; writes nothing, but sets torch's random state: make your data first.
    flags: the run's settings, "seed" among them; must_match: the names of those that make it
    another run. Returns (progress, notes to print)."""
    check_plain("flags", flags)
    if missing := ({"seed"} | set(must_match)) - set(flags):
        raise ValueError(f"flags has no {sorted(missing)}: seed and each must_match name need one")
    torch.manual_seed(flags["seed"] + RANK * 2**32)  # every rank its own dropout stream, every GPU
    path, checkpoint, notes = choose_checkpoint(output_dir)
    if checkpoint is None:
        counts = "step skipped_steps nonfinite_streak examples seconds".split()
        return dict.fromkeys(counts, 0) | {"logged": [0, 0]}, notes
    saved = checkpoint["flags"]
    changed = {k: f"{k} {saved.get(k)!r} -> {v!r}" for k, v in flags.items() if saved.get(k) != v}
    refused = [change for name, change in changed.items() if name in must_match]
    if refused:  # the flags that changed say why
        raise AllRanksError(
            f"cannot resume {path}: it is another run ({'; '.join(refused)}; changed: "
            f"{', '.join(changed)}): start in another output dir"
        )
    try:
        model.load_state_dict(checkpoint["model"])
        # The moments come from the checkpoint, the hyperparameters from this run.
        state = dict(checkpoint["optimizer"], param_groups=optimizer.state_dict()["param_groups"])
        optimizer.load_state_dict(state)
        scaler.load_state_dict(checkpoint["scaler"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise AllRanksError(f"{path} does not fit this model ({first_line(error)})") from None
    progress = checkpoint["progress"]
    # Each rank continues its own random stream. Under another world size (the same global batch,
    # which must_match should hold: the same data order) the streams start afresh, seeded above.
    if len(checkpoint["rng"]) == WORLD_SIZE:
        cpu_rng, cuda_rng = checkpoint["rng"][RANK]
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda_rng)
    return progress, [*notes, f"resuming from {path} (step {progress['step']})", *changed.values()]


def check_plain(name, value):
    """torch.load(weights_only=True) reads back str, int, float, bool, None and lists, tuples and
    dicts of them, not numpy's scalars or paths: refuse anything else, by name, before saving."""
    if type(value) in (list, tuple, dict):
        for key, item in value.items() if type(value) is dict else enumerate(value):
            check_plain(f"{name}[{key!r}]", item)
    elif type(value) not in (str, int, float, bool, type(None)):
        raise AllRanksError(f"{name} is a {type(value).__name__}: give a plain value")


def first_line(error):
    return f"{error}".strip().partition("\n")[0][:300]


def list_checkpoints(output_dir):
    """(step, path) of each checkpoint-N.pt, newest first."""
    names = os.listdir(output_dir) if output_dir and os.path.isdir(output_dir) else []
    steps = sorted(int(name[11:-3]) for name in names if re.fullmatch(r"checkpoint-\d+\.pt", name))
    return [(step, os.path.join(output_dir, f"checkpoint-{step}.pt")) for step in steps[::-1]]


def choose_checkpoint(output_dir):
    """(path, state, warnings) of the newest checkpoint in output_dir that loads, skipping broken
    ones, or (None, None, []) when there is none: the same on every rank, or one error on all."""
    path, state, reasons, checkpoints = None, None, [], list_checkpoints(output_dir)
    for _, path in checkpoints:
        try:
            # weights_only: a checkpoint is data, and unpickling arbitrary objects runs their code.
            # mmap: tensors are read from the file as they are used, not all into RAM on every rank.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if {"model", "optimizer", "scaler", "progress", "flags", "rng"} <= set(state):
                break
            raise KeyError("keys are missing")
        except Exception as error:
            state = None
            reasons.append(f"{os.path.basename(path)}: {first_line(error)}")
    broken = checkpoints and state is None  # never restart a run whose checkpoints all broke
    reason = f"no checkpoint in {output_dir} loads, fix or remove them: {'; '.join(reasons)}"
    check_all_ranks(reason if broken else None)
    paths = all_gather(path if state is not None else None)
    if len(set(paths)) > 1:  # a node that sees other files than rank 0
        raise AllRanksError(f"ranks see different checkpoints {paths}: give every node the same")
    return paths[0], state, [f"warning: skipping {output_dir}/{why}" for why in reasons]


def save_checkpoint(output_dir, model, optimizer, scaler, progress, flags):
    """checkpoint-{step}.pt with all a resume needs; the one before stays too, should this one
    break. Call it on every rank: it gathers their random streams; rank 0 writes."""
    check_plain("progress", progress)
    cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else None  # this GPU's
    rng = all_gather((torch.get_rng_state(), cuda_rng))
    if RANK == 0:  # DDP keeps the replicas identical: one copy of model and optimizer will do
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "progress": progress,
            "flags": flags,
            "rng": rng,
        }
        path = os.path.join(output_dir, f"checkpoint-{progress['step']}.pt")
        write_atomically(path, lambda f: torch.save(state, f))
        # Older ones go, but the best evaluation's (progress["best_step"], if the caller tracks
        # it); a newer one (broken, skipped by a resume) stays until this run passes it.
        kept = [step for step, _ in list_checkpoints(output_dir) if step <= progress["step"]]
        for step in [s for s in kept[2:] if s != progress.get("best_step")]:
            os.remove(os.path.join(output_dir, f"checkpoint-{step}.pt"))
    if WORLD_SIZE > 1:
        dist.barrier()  # no rank exits (tearing the group down) before the checkpoint is on disk


def write_atomically(path, write):
    """write(f) fills path.tmp, which is flushed to disk, then renamed to path: a crash at any
    moment leaves the previous version or the new one, whole."""
    try:
        with open(path + ".tmp", "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename can make it visible
        os.replace(path + ".tmp", path)
    except Exception as error:  # OSError, or a library's own type for a failed write
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise OSError(f"could not write {path} ({first_line(error)})") from error


def truncate_log(output_dir, step):
    """Before a run writes its first record: drop those past `step` (a resumed run redoes those
    steps, and each step appears once) and any line that a kill cut short. Rank 0 writes."""
    if RANK != 0:
        return
    os.makedirs(output_dir, exist_ok=True)
    path, kept = os.path.join(output_dir, "log.jsonl"), []
    with open(path, "a+") as f:
        f.seek(0)
        for line in f:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                if line.endswith("\n") and json.loads(line)["step"] <= step:
                    kept.append(line)
    write_atomically(path, lambda f: f.write("".join(kept).encode()))
