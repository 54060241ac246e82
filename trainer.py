"""Fine-tuning in plain PyTorch, in chapters to read top to bottom:

1. Set-up: processes, devices, seeds
2. Optimizer, learning-rate schedule, loss
3. One training step  <- the heart: forward, backward, clip, update
4. The loop           <- steps, logging, evaluation, checkpoints, stopping
5. Evaluation
6. Checkpoints and resume

train_glue.py is the command line around it: flags, data, model, output files, signals.
"""

import contextlib
import datetime
import json
import math
import os
import random
import re
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import TASKS, collate, epoch_plan, is_regression, metric_name
from metrics import compute_metrics

# =================================================================================================
# 1. Set-up: processes, devices, seeds
# =================================================================================================


def setup_distributed(timeout_seconds):
    """Join the process group torchrun prepared (it sets RANK, WORLD_SIZE and LOCAL_RANK); a plain
    `python` run is one process and needs no group. Returns (rank, world_size, device)."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        device = torch.device("cuda", local_rank)
        # One GPU per process, chosen before anything touches CUDA: otherwise every rank would
        # also open a context on GPU 0.
        torch.cuda.set_device(device)
        # NCCL reduces the GPU tensors (DDP's gradients). The few small CPU values (stop flag, log
        # counters, gathered predictions) go through gloo, so reading them never waits for the GPU.
        backend = "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    # The timeout bounds every collective, including the barrier where the other ranks wait while
    # rank 0 writes a checkpoint: a large checkpoint on a slow disk needs a long one.
    dist.init_process_group(
        backend,
        timeout=datetime.timedelta(seconds=timeout_seconds),
        device_id=device if cuda else None,
    )
    return rank, world_size, device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every GPU too


def get_rng_state(device):
    """Every generator that training draws from on this rank: dropout uses torch's (CPU or this
    rank's GPU); Python's and numpy's are kept for models that draw from them."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        # The keys as a list: a weights_only load accepts no numpy array.
        "numpy": (kind, keys.tolist(), position, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)  # this rank's GPU only, whatever its index
    return state


def set_rng_state(state, device):
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def all_gather(obj):
    """Every rank's `obj`, in rank order ([obj] when running without a process group)."""
    gathered = [obj] * get_world_size()
    if get_world_size() > 1:
        dist.all_gather_object(gathered, obj)
    return gathered


def any_rank(flag):
    """True on every rank if `flag` is true on any. A CPU tensor: under NCCL it goes through gloo
    (see setup_distributed), so this costs one small message and no wait for the GPU."""
    if get_world_size() == 1:
        return flag
    flags = torch.tensor([int(flag)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags.item())


def raise_if_any_rank_failed(error):
    """Collective: every rank passes its error from the same phase (or None), and every rank
    raises the first one. An error that one node alone met (its data, its disk) then reaches
    rank 0, which reports it, instead of leaving the others waiting in their next collective."""
    errors = all_gather(None if error is None else str(error))
    for rank, message in enumerate(errors):
        if message is not None and rank == 0:
            raise ValueError(message)
        if message is not None:
            raise ValueError(f"rank {rank}: {message}")


def to_device(batch, device):
    """Copy a batch of CPU tensors to the GPU. From pinned (page-locked) memory the copy runs
    asynchronously (non_blocking), so the host goes on queueing work meanwhile."""
    if device.type != "cuda":
        return batch
    return {key: value.pin_memory().to(device, non_blocking=True) for key, value in batch.items()}


# =================================================================================================
# 2. Optimizer, learning-rate schedule, loss
# =================================================================================================


def build_optimizer(model, learning_rate, weight_decay, device):
    """AdamW with weight decay on the weight matrices only. Decay pulls weights towards zero;
    biases and normalisation gains (the 1-D parameters, in any architecture) should not shrink."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    # fused: one kernel updates every parameter, instead of a loop of small ones.
    return torch.optim.AdamW(groups, lr=learning_rate, fused=device.type in ("cuda", "cpu"))


def lr_multiplier(step, schedule, warmup_steps, total_steps):
    """The learning rate at `step`, as a fraction of the peak: a linear warmup from 0, then linear
    or cosine decay to 0 at total_steps, or constant."""
    if step < warmup_steps:
        return step / warmup_steps
    decayed = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - decayed
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * decayed))
    return 1.0  # constant


def build_scheduler(optimizer, schedule, warmup_steps, total_steps):
    def multiplier(step):
        return lr_multiplier(step, schedule, warmup_steps, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def apply_hyperparameters(optimizer, scheduler, *, learning_rate, weight_decay):
    """A checkpoint's optimizer and scheduler carry the learning rate and weight decay they were
    built with; a resumed run continues with its own. (The schedule's shape is already this run's:
    LambdaLR saves its step count, not its function.)"""
    scheduler.base_lrs = [learning_rate for _ in optimizer.param_groups]
    multiplier = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate * multiplier
    optimizer.param_groups[0]["weight_decay"] = weight_decay  # group 1 never decays


def glue_loss_sum(model, batch, regression):
    """The loss of one micro-batch of a Hugging Face classifier, summed over its examples."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    # The labels are not passed in: the model would return its own mean loss, and we want a sum.
    logits = model(**inputs).logits.float()  # the loss in fp32, whatever the forward ran in
    if regression:
        return F.mse_loss(logits.squeeze(-1), batch["labels"].float(), reduction="sum")
    return F.cross_entropy(logits, batch["labels"], reduction="sum")


# =================================================================================================
# 3. One training step
# =================================================================================================


def forward_backward(model, batch, *, loss_fn, autocast, scaler, loss_weight):
    # autocast covers the forward and the loss: matmuls run in bf16/fp16, and ops that need the
    # range stay in fp32 (on CUDA softmax and layer norm too; the loss is fp32 here on any device).
    # The backward stays outside: each backward op already runs in the dtype its forward op used.
    with autocast:
        loss = loss_fn(model, batch)
    # fp16 gradients below ~6e-8 underflow to zero, so the scaler multiplies the loss by a large
    # factor first (a no-op without fp16). loss_weight turns the summed loss into this micro-batch's
    # share of the mean over the whole step (see train_step).
    scaler.scale(loss * loss_weight).backward()
    return loss.detach()


def train_step(
    model,
    micro_batches,
    *,
    loss_fn,
    examples_in_step,
    optimizer,
    scheduler,
    scaler,
    autocast,
    max_grad_norm,
    world_size=1,
):
    """One optimizer step over this rank's micro-batches (already on the device).

    loss_fn(model, batch) returns a micro-batch's loss *summed* over its examples, and
    examples_in_step counts the examples of the whole step on all ranks. Gradients must be zero
    (None) on entry; they are again on return. Returns (this rank's summed loss as a device
    tensor, the gradient norm before clipping, whether the update was applied).
    """
    # Each micro-batch's summed loss is divided by the examples of the whole step, so the gradients
    # add up to the mean over exactly this step's examples: however they were split into ranks and
    # micro-batches, and for a short last step too. DDP averages gradients over ranks, so each rank
    # multiplies by world_size to turn that average back into the sum.
    loss_weight = world_size / examples_in_step
    losses = []
    for index, batch in enumerate(micro_batches):
        is_last = index == len(micro_batches) - 1
        if world_size > 1 and not is_last:
            # Under DDP every backward all-reduces the gradients across ranks. Between micro-batches
            # only the local sum is needed: no_sync() skips that communication until the last one.
            gradient_sync = model.no_sync()
        else:
            gradient_sync = contextlib.nullcontext()
        with gradient_sync:
            loss = forward_backward(
                model,
                batch,
                loss_fn=loss_fn,
                autocast=autocast,
                scaler=scaler,
                loss_weight=loss_weight,
            )
        losses.append(loss)

    # The gradients are still multiplied by the fp16 loss scale: divide it out first, so clipping
    # compares the true norm with max_grad_norm.
    scaler.unscale_(optimizer)
    total_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    # The step's one host sync: whether to apply the update must be decided here, on the host.
    # A NaN/inf gradient (an fp16 overflow or a real divergence) skips the update.
    grad_norm = total_norm.item()
    update_applied = math.isfinite(grad_norm)
    if update_applied:
        scaler.step(optimizer)  # optimizer.step(), for fp16 through the scaler's bookkeeping
        scheduler.step()  # after the update it scheduled; never after a skipped one
    # fp16: halve the scale after an overflow, grow it after a run of good steps.
    scaler.update()
    # set_to_none: the next backward writes the gradients instead of adding them to zeros (and,
    # without DDP's gradient buckets, their memory is free until then).
    optimizer.zero_grad(set_to_none=True)
    return torch.stack(losses).sum(), grad_norm, update_applied


# =================================================================================================
# 4. The loop
# =================================================================================================


def is_due(step, every, epoch_done):
    """Whether an every-N-steps action (logging, evaluation, saving) runs after `step`;
    every=0 means at the end of each epoch."""
    if every == 0:
        return epoch_done
    return step % every == 0


def train(
    args,
    model,
    tokenizer,
    optimizer,
    scheduler,
    scaler,
    autocast,
    train_set,
    eval_sets,
    progress,
    stop_requested,
):
    """Train from `progress` (a fresh run's position, or a checkpoint's) to args.total_steps,
    writing the log, checkpoints and best/ into args.output_dir. Stops early, after writing a
    checkpoint, once stop_requested (a threading.Event) is set on any rank. Returns a summary."""
    device = next(model.parameters()).device
    world_size = get_world_size()
    ddp_model = wrap_for_ddp(model, args.ddp_find_unused_parameters) if world_size > 1 else model
    regression = is_regression(args.task_name)
    pad_id = tokenizer.pad_token_id or 0
    lengths = [len(example["input_ids"]) for example in train_set]
    plan = this_ranks_epoch_plan(args, lengths, progress)
    # --max_grad_norm 0 turns clipping off; the norm is still measured, to catch non-finite steps.
    max_grad_norm = args.max_grad_norm if args.max_grad_norm > 0 else math.inf
    window = new_log_window(device)
    totals = {"examples": 0, "tokens": 0, "seconds": 0.0}  # what this launch trained
    last_eval = None
    start_time = time.perf_counter()
    stopped = any_rank(stop_requested.is_set())  # a stop asked for during start-up
    model.train()

    while progress["step"] < args.total_steps and not stopped:
        step_start = time.perf_counter()
        examples_in_step, micro_batch_indices = plan[progress["step_in_epoch"]]
        micro_batches = []
        for indices in micro_batch_indices:
            batch = collate([train_set[i] for i in indices], pad_id)
            window["examples"] += len(indices)
            window["tokens"] += int(batch["attention_mask"].sum())
            micro_batches.append(to_device(batch, device))
        lr = optimizer.param_groups[0]["lr"]  # the rate of this step's update, for the log
        loss_sum, grad_norm, update_applied = train_step(
            ddp_model,
            micro_batches,
            loss_fn=lambda model, batch: glue_loss_sum(model, batch, regression),
            examples_in_step=examples_in_step,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            autocast=autocast,
            max_grad_norm=max_grad_norm,
            world_size=world_size,
        )
        window["loss"] += loss_sum
        window["seconds"] += time.perf_counter() - step_start
        epoch_done = advance(
            progress,
            update_applied=update_applied,
            steps_in_epoch=len(plan),
            max_nonfinite_steps=args.max_nonfinite_steps,
        )
        if epoch_done:
            plan = this_ranks_epoch_plan(args, lengths, progress)

        step = progress["step"]
        stopped = any_rank(stop_requested.is_set())  # so that every rank stops after this step
        last = step == args.total_steps
        save_due = stopped or last or is_due(step, args.save_steps, epoch_done)
        # A save also closes the log window, so that a resumed run starts a fresh one.
        if save_due or is_due(step, args.logging_steps, epoch_done=False):
            log_training(args, window, totals, progress, lr=lr, grad_norm=grad_norm)
            window = new_log_window(device)
        if last or is_due(step, args.eval_steps, epoch_done):
            # The plain model, not ddp_model: DDP's hooks are for training.
            last_eval = evaluate_and_keep_best(
                args, model, tokenizer, eval_sets=eval_sets, progress=progress, autocast=autocast
            )
        if save_due:
            save_training_state(
                args,
                model,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                progress=progress,
            )

    seconds = totals["seconds"]
    return {
        "stopped": stopped,
        "final": last_eval,
        "best": progress["best_eval"],
        "best_step": progress["best_step"],
        "global_step": progress["step"],
        "skipped_steps": progress["skipped_steps"],
        "train_runtime": time.perf_counter() - start_time,  # wall time of this launch's loop
        "train_seconds": seconds,  # the steps alone: evaluations and saves excluded
        "train_samples_per_second": totals["examples"] / seconds if seconds else 0.0,
        "train_tokens_per_second": totals["tokens"] / seconds if seconds else 0.0,
    }


def this_ranks_epoch_plan(args, lengths, progress):
    """This rank's steps of the epoch that `progress` is in (see data.epoch_plan)."""
    plan = epoch_plan(
        lengths,
        per_device_batch=args.per_device_train_batch_size,
        accumulation=args.gradient_accumulation_steps,
        world_size=get_world_size(),
        rank=get_rank(),
        seed=args.seed,
        epoch=progress["epoch"],
        group_by_length=args.group_by_length,
    )
    if progress["step_in_epoch"] >= len(plan):
        # Only a checkpoint resumed with --ignore_checkpoint_mismatch on other data or another
        # batch size gets here: its position lies past the end of this run's epoch.
        if get_rank() == 0:
            print(
                f"step {progress['step']} lies past the end of epoch {progress['epoch']} for "
                "this run's data and batch: continuing with the next epoch",
                flush=True,
            )
        progress["epoch"] += 1
        progress["step_in_epoch"] = 0
        return this_ranks_epoch_plan(args, lengths, progress)
    return plan


def new_progress():
    """The position of a fresh run; every checkpoint saves the current one."""
    return {
        "step": 0,
        "epoch": 0,
        "step_in_epoch": 0,
        "best_eval": None,
        "best_step": None,
        "nonfinite_streak": 0,
        "skipped_steps": 0,
    }


def advance(progress, *, update_applied, steps_in_epoch, max_nonfinite_steps):
    """Count a finished step in `progress` (the run's position, saved in every checkpoint).
    Returns whether it ended an epoch."""
    progress["step"] += 1
    progress["step_in_epoch"] += 1
    if update_applied:
        progress["nonfinite_streak"] = 0
    else:
        progress["nonfinite_streak"] += 1
        progress["skipped_steps"] += 1
    if progress["nonfinite_streak"] >= max_nonfinite_steps:
        # Every rank sees the same all-reduced gradients, so every rank stops here together.
        raise ValueError(
            f"{progress['nonfinite_streak']} steps in a row had non-finite gradients (at step "
            f"{progress['step']}): lower --learning_rate, use --bf16 instead of --fp16, or check "
            "the data; the checkpoints are intact"
        )
    epoch_done = progress["step_in_epoch"] == steps_in_epoch
    if epoch_done:
        progress["epoch"] += 1
        progress["step_in_epoch"] = 0
    return epoch_done


def wrap_for_ddp(model, find_unused_parameters):
    """DDP all-reduces (averages) the gradients across ranks during backward, overlapped with it."""
    device = next(model.parameters()).device
    # forward_sync_buffers would resend every buffer from rank 0 before each forward; only buffers
    # that training changes need it (BatchNorm's running statistics). A transformer's are constants.
    has_running_stats = any(getattr(m, "running_mean", None) is not None for m in model.modules())
    return torch.nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no copies
        forward_sync_buffers=has_running_stats,
        # A model whose forward skips some parameters must say so, or DDP waits for their
        # gradients (and raises at the next step); finding them costs a graph walk per step.
        find_unused_parameters=find_unused_parameters,
    )


def new_log_window(device):
    """What is summed between two log lines; the loss stays on the device until a log step."""
    return {"loss": torch.zeros((), device=device), "examples": 0, "tokens": 0, "seconds": 0.0}


def log_training(args, window, totals, progress, lr, grad_norm):
    """Average the window over all ranks into one log record (written by rank 0), and add it to
    the launch's totals."""
    # .item() waits for the device: the one sync of a log step, not of every step.
    sums = torch.tensor(
        [window["loss"].item(), window["examples"], window["tokens"]], dtype=torch.float64
    )
    if get_world_size() > 1:
        dist.all_reduce(sums)  # a CPU tensor: gloo (see setup_distributed)
    loss_sum, examples, tokens = sums.tolist()
    totals["examples"] += int(examples)
    totals["tokens"] += int(tokens)
    totals["seconds"] += window["seconds"]
    step = progress["step"]
    record = {
        "step": step,
        "epoch": round(step / args.steps_per_epoch, 3),
        "loss": loss_sum / examples,
        "lr": lr,
        "grad_norm": grad_norm,
        "skipped_steps": progress["skipped_steps"],
        "samples_per_second": examples / window["seconds"],
        "tokens_per_second": tokens / window["seconds"],
    }
    if get_rank() == 0:
        append_log(args.output_dir, record)
        print(
            f"step {step}/{args.total_steps} (epoch {record['epoch']:.2f}): loss "
            f"{record['loss']:.4f}  lr {lr:.2e}  grad norm {grad_norm:.2f}  "
            f"{record['samples_per_second']:.1f} samples/s",
            flush=True,
        )


def is_better(value, best):
    """A higher metric is better (true of every GLUE metric); NaN (an undefined correlation)
    never is."""
    if math.isnan(value):
        return False
    return best is None or value > best


def evaluate_and_keep_best(args, model, tokenizer, *, eval_sets, progress, autocast):
    step = progress["step"]
    pad_id = tokenizer.pad_token_id or 0
    results = evaluate(args, model, eval_sets=eval_sets, pad_id=pad_id, autocast=autocast)
    if get_rank() == 0:
        append_log(args.output_dir, {"step": step, "eval": results})
        scores = "  ".join(f"{name} {value:.4f}" for name, value in results.items())
        print(f"step {step} (epoch {step / args.steps_per_epoch:.2f}): {scores}", flush=True)
    best = progress["best_eval"]
    best_value = None if best is None else best[args.metric_for_best_model]
    if is_better(results[args.metric_for_best_model], best_value):
        progress["best_eval"], progress["best_step"] = results, step
        if get_rank() == 0:
            path = os.path.join(args.output_dir, "best")
            save_pretrained_atomically(model, tokenizer, path, {"step": step, "eval": results})
    return results


# =================================================================================================
# 5. Evaluation
# =================================================================================================


@torch.no_grad()
def predict(model, examples, *, batch_size, regression, pad_id, autocast):
    """Predictions for every example, in order, on every rank. Each rank predicts every
    world_size-th example of a length-sorted order (batches with little padding), longest first
    (an out-of-memory error shows at once, not at the end). Gathered by index, every example
    counts once (a DistributedSampler would pad the last batch with repeats). Leaves the model
    in training mode."""
    device = next(model.parameters()).device
    model.eval()
    by_length = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    mine = by_length[get_rank() :: get_world_size()]
    outputs = []
    for start in range(0, len(mine), batch_size):
        batch = collate([examples[i] for i in mine[start : start + batch_size]], pad_id)
        batch.pop("labels", None)
        with autocast:
            logits = model(**to_device(batch, device)).logits.float()
        if regression:
            outputs.append(logits.squeeze(-1))
        else:
            outputs.append(logits.argmax(-1))
    if outputs:
        my_predictions = torch.cat(outputs).cpu().numpy()
    else:
        my_predictions = np.zeros(0)
    predictions = np.zeros(len(examples), dtype=np.float64 if regression else np.int64)
    for indices, values in all_gather((mine, my_predictions)):
        predictions[indices] = values
    model.train()
    return predictions


def evaluate(args, model, *, eval_sets, pad_id, autocast):
    """The task's metrics on each of its dev splits (MNLI has two)."""
    task_name = args.task_name
    results = {}
    for split, examples in eval_sets.items():
        predictions = predict(
            model,
            examples,
            batch_size=args.per_device_eval_batch_size,
            regression=is_regression(task_name),
            pad_id=pad_id,
            autocast=autocast,
        )
        labels = np.array([example["label"] for example in examples])
        for metric, value in compute_metrics(
            TASKS[task_name]["metrics"], predictions, labels
        ).items():
            results[metric_name(task_name, split, metric)] = value
    return results


# =================================================================================================
# 6. Checkpoints and resume
# =================================================================================================

CHECKPOINT_KEYS = {
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "progress",
    "config",
    "settings",
    "rng",
}


def fsync(path):
    """Flush to disk, not just the page cache: a rename must never land before the data it names."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_failed(path, error):
    """One error for every failed write: which path, why, and that the previous version stands."""
    if str(error).startswith("could not write"):  # already one of ours, from a helper
        return error
    reason = getattr(error, "strerror", None) or str(error).splitlines()[0][:200]
    return OSError(f"could not write {path} ({reason}); the previous version is intact")


def write_file_atomically(path, text):
    """Write a temporary file, flush it to disk, then rename: a crash leaves old or new, whole."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise write_failed(path, error) from None


def append_log(output_dir, record):
    path = os.path.join(output_dir, "log.jsonl")
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as error:
        raise write_failed(path, error) from None


def save_checkpoint(output_dir, step, state):
    """Write checkpoint-{step}/ so that a crash at any moment leaves either the complete checkpoint
    or nothing under that name: everything goes into a .tmp folder, the COMPLETE marker last, all
    flushed to disk, then one atomic rename."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        torch.save(state, os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "COMPLETE"), "w") as f:
            f.write(f"{step}\n")
        fsync(os.path.join(tmp, "state.pt"))
        fsync(os.path.join(tmp, "COMPLETE"))
        fsync(tmp)
    except (OSError, RuntimeError) as error:  # disk full, quota, I/O error: older ones untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(final, error) from None
    # An older save of this same step (a run resumed from before it) is replaced.
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync(output_dir)


def save_pretrained_atomically(model, tokenizer, path, record):
    """Hugging Face format (from_pretrained, pipeline) plus eval.json (which step, what scores),
    written beside, flushed to disk and swapped in by renames."""
    tmp, old = path + ".tmp", path + ".old"
    recover_swapped_folder(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # What this folder holds: --overwrite_output_dir deletes a best/ or final/ only if
        # nothing else has been put in it.
        record = dict(record, files=sorted(os.listdir(tmp)) + ["eval.json"])
        with open(os.path.join(tmp, "eval.json"), "w") as f:
            json.dump(record, f, indent=2)
        for name in os.listdir(tmp):
            fsync(os.path.join(tmp, name))
        fsync(tmp)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)  # a crash just before this leaves path.old: recover_swapped_folder
    except Exception as error:  # OSError, or safetensors' own error type for a failed write
        shutil.rmtree(tmp, ignore_errors=True)
        recover_swapped_folder(path)
        raise write_failed(path, error) from None
    fsync(os.path.dirname(path))
    shutil.rmtree(old, ignore_errors=True)


def recover_swapped_folder(path):
    """Put back the previous best/ or final/ if a crash fell between save_pretrained_atomically's
    two renames; otherwise drop what an earlier crash left behind."""
    old = path + ".old"
    if os.path.isdir(old) and not os.path.exists(path):
        os.replace(old, path)
    shutil.rmtree(old, ignore_errors=True)


def save_training_state(args, model, *, optimizer, scheduler, scaler, progress):
    """A checkpoint of the run. Call it on every rank (it gathers their RNG states); rank 0
    writes it."""
    device = next(model.parameters()).device
    rng = all_gather(get_rng_state(device))  # each rank has its own dropout stream
    if get_rank() == 0:  # DDP keeps the replicas identical: one copy of model and optimizer will do
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "progress": progress,
            "config": run_config(args),
            "settings": changeable_settings(args),
            "rng": rng,
        }
        save_checkpoint(args.output_dir, progress["step"], state)
        # The best step's checkpoint is kept: it can be resumed from (best/ holds the weights only).
        rotate_checkpoints(args.output_dir, args.save_total_limit, keep_step=progress["best_step"])
    if get_world_size() > 1:
        dist.barrier()  # no rank exits (tearing the group down) before the checkpoint is on disk


def list_checkpoints(output_dir):
    """(step, path) of each checkpoint-N folder, newest first (unfinished .tmp ones never match).
    Only folders that hold nothing but what save_checkpoint writes: never somebody else's."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isdir(path) and set(os.listdir(path)) <= {"state.pt", "COMPLETE"}:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def rotate_checkpoints(output_dir, limit, keep_step):
    """Delete the oldest checkpoints beyond `limit`, never the one of the best model. Renaming to
    .tmp first makes each vanish at once: a kill mid-delete leaves no half checkpoint behind."""
    try:
        for step, path in list_checkpoints(output_dir)[limit:]:
            if step != keep_step:
                os.replace(path, path + ".tmp")
    except (
        OSError
    ) as error:  # the new checkpoint is safe: an old one left over is no reason to stop
        print(
            f"warning: could not delete an old checkpoint ({error}): delete it yourself",
            file=sys.stderr,
        )
    for name in os.listdir(output_dir):  # also what earlier crashes left mid-write
        if re.fullmatch(r"checkpoint-\d+\.tmp", name):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def load_checkpoint(path):
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist: give a checkpoint-N folder, 'latest' or 'auto'")
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a folder: give a checkpoint-N folder, 'latest' or 'auto'")
    state_path = os.path.join(path, "state.pt")
    if not os.path.isfile(state_path):
        raise ValueError(f"{path} is not a checkpoint of this trainer (it has no state.pt)")
    # The rename makes our own writes all-or-nothing; the marker also catches a checkpoint copied
    # (or synced to another machine) only in part.
    if not os.path.isfile(os.path.join(path, "COMPLETE")):
        raise ValueError(
            f"checkpoint {path} is incomplete (no COMPLETE marker): it was being "
            "written when its run stopped"
        )
    try:
        # weights_only: a checkpoint is data, and unpickling arbitrary objects runs their code.
        # mmap: tensors are read from the file as they are used, not all into RAM on every rank.
        state = torch.load(state_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        first_line = (str(error).splitlines() or [""])[0][:200]
        raise ValueError(
            f"checkpoint {path} is corrupt or unsafe ({type(error).__name__}: {first_line})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("progress"), dict):
        # 'auto' trusts the number in the name; a renamed checkpoint would mislead it.
        match = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(path)))
        if match and int(match.group(1)) != state["progress"].get("step"):
            raise ValueError(
                f"{path} holds step {state['progress']['step']}: a renamed checkpoint; name it "
                f"checkpoint-{state['progress']['step']}"
            )
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys():
        raise ValueError(
            f"checkpoint {path} was not written by this version of the trainer (keys missing)"
        )
    return state


def find_checkpoint(output_dir, resume_from):
    """The checkpoint to resume from: an explicit folder, or with 'latest'/'auto' the newest
    that loads, skipping (with a warning) any that a crash or a disk fault left broken.
    Returns (path, state), or (None, None) for 'auto' on a run with no checkpoint yet."""
    if resume_from not in ("latest", "auto"):
        return resume_from, load_checkpoint(resume_from)
    candidates = list_checkpoints(output_dir)
    for _, path in candidates:
        try:
            return path, load_checkpoint(path)
        except ValueError as error:
            print(f"warning: skipping {error}", file=sys.stderr)
    # Never silently restart a run whose checkpoints all broke.
    if candidates or resume_from == "latest":
        if candidates:
            raise ValueError(
                f"no checkpoint in {output_dir} loads: fix or remove them, or pass "
                "--overwrite_output_dir to start again"
            )
        raise ValueError(
            f"no checkpoint in {output_dir} to resume from: use 'auto' to start "
            "afresh when there is none"
        )
    return None, None


def load_checkpoint_on_every_rank(output_dir, resume_from):
    """Rank 0 chooses the checkpoint and every rank loads exactly that one, or all ranks stop
    with one error. Ranks on other machines read it from their own disk: the output dir must be
    on a filesystem that every node sees (see README)."""
    choice = [None, None]  # the path, or rank 0's error
    state = None
    if get_rank() == 0:
        try:
            choice[0], state = find_checkpoint(output_dir, resume_from)
        except (ValueError, OSError) as error:  # the other ranks wait for the choice: tell them
            choice[1] = str(error)
    if get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    path, rank_0_error = choice
    if rank_0_error:
        raise ValueError(rank_0_error)
    error = None
    if path is not None and get_rank() != 0:
        try:
            state = load_checkpoint(path)
        except ValueError as load_error:
            error = f"rank {get_rank()} cannot load the checkpoint rank 0 chose: {load_error}"
    errors = [e for e in all_gather(error) if e]
    if errors:
        raise ValueError(f"{errors[0]}; checkpoints must be on a filesystem every node sees")
    return path, state


def restore(checkpoint, args, model, optimizer, scheduler, scaler):
    """Load a checkpoint into the freshly built objects; returns its progress (the position)."""
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint["scaler"]:  # empty when the checkpoint's run had no fp16
            scaler.load_state_dict(checkpoint["scaler"])
    except (RuntimeError, ValueError, KeyError) as error:  # only with --ignore_checkpoint_mismatch
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"the checkpoint does not fit this model ({first_line}): resume with "
            "the model it was trained from"
        ) from None
    # On the CPU, load_state_dict keeps the optimizer's tensors as loaded: memory-mapped from
    # state.pt, which rotation will delete. Give them memory of their own.
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.device.type == "cpu":
                state[key] = value.clone()
    apply_hyperparameters(
        optimizer, scheduler, learning_rate=args.learning_rate, weight_decay=args.weight_decay
    )
    progress = dict(checkpoint["progress"])
    if len(checkpoint["rng"]) == get_world_size():  # each rank continues its own dropout stream
        set_rng_state(checkpoint["rng"][get_rank()], next(model.parameters()).device)
    else:  # another world size: the data order is unchanged, the dropout streams restart
        seed_everything(args.seed + 1000 * get_rank() + progress["step"])
    return progress


def run_config(args):
    """What a checkpoint must agree with to be resumed: the same model, task, data and data
    order, global batch and precision. Anything else would silently train something else."""
    if args.bf16:
        precision = "bf16"
    elif args.fp16:
        precision = "fp16"
    else:
        precision = "fp32"
    return {
        "model": args.model_name_or_path,
        "task": args.task_name,
        "max_seq_length": args.max_seq_length,
        "train_data": args.train_data_fingerprint,
        "seed": args.seed,
        "group_by_length": args.group_by_length,
        "global_batch_size": (
            args.per_device_train_batch_size * args.gradient_accumulation_steps * get_world_size()
        ),
        "precision": precision,
    }


def changeable_settings(args):
    """Settings that a resumed run may change: it applies its own values (see README)."""
    names = [
        "learning_rate",
        "lr_scheduler_type",
        "warmup_steps",
        "warmup_ratio",
        "weight_decay",
        "num_train_epochs",
        "max_steps",
        "max_grad_norm",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "save_total_limit",
        "max_nonfinite_steps",
        "metric_for_best_model",
        "max_eval_samples",
    ]
    return {name: getattr(args, name) for name in names}


def check_resumable(checkpoint, args):
    """Refuse a checkpoint of another run (unless --ignore_checkpoint_mismatch); list the
    changed settings that this run applies. Returns those lines for the console."""
    saved, current = checkpoint["config"], run_config(args)
    differences = [
        f"{key}: checkpoint has {saved.get(key)!r}, this run has {value!r}"
        for key, value in current.items()
        if saved.get(key) != value
    ]
    if differences and not args.ignore_checkpoint_mismatch:
        raise ValueError(
            f"cannot resume, the run differs ({'; '.join(differences)}): restore "
            "the settings, or pass --ignore_checkpoint_mismatch to continue anyway"
        )
    notes = [f"resuming despite {difference}" for difference in differences]
    for name, value in changeable_settings(args).items():
        if checkpoint["settings"].get(name) != value:
            notes.append(
                f"--{name} changed from {checkpoint['settings'].get(name)} to {value}: "
                f"applied from step {checkpoint['progress']['step'] + 1} on"
            )
    return notes


def truncate_log(output_dir, step):
    """On resume, drop the records past the checkpoint (this run redoes those steps, and a step
    must appear once) and a line that a kill cut short."""
    path = os.path.join(output_dir, "log.jsonl")
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # cut short by a kill (and maybe glued to the next record)
                continue
            if line.endswith("\n") and isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
    write_file_atomically(path, "".join(kept))
