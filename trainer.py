"""A training loop in plain PyTorch for any nn.Module, in chapters to read top to bottom:

1. Processes and devices
2. One training step  <- the heart: forward, backward, clip, update
3. The epoch plan     <- which examples each rank trains on, step by step
4. The loop           <- steps, logging, evaluation, checkpoints, stopping
5. Checkpoints and resume
It imports only the standard library, numpy and torch: copy it into your project.
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
        return type(batch)(to_device(value, device) for value in batch)
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
    them the last step's rate is k/(total_steps - warmup_steps) of the peak, not 0."""
    if updates < warmup_steps:
        return peak * updates / warmup_steps
    return peak * max(0.0, 1 - (updates - warmup_steps) / max(1, total_steps - warmup_steps))


def train_step(
    model, micro_batches, *, loss_fn, examples_in_step, optimizer, lr, scaler, autocast, clip
):
    """One optimizer step at learning rate `lr` over this rank's micro-batches (on the device).

    loss_fn(model, batch) returns a micro-batch's loss *summed* over its examples, and
    examples_in_step counts the examples of the whole step on all ranks. autocast() makes a fresh
    context for each forward: functools.partial(torch.autocast, "cuda", torch.bfloat16), or
    contextlib.nullcontext for fp32. Returns (this rank's summed loss as a device tensor, the
    gradient norm before clipping, whether it was applied).
    """
    # Each summed loss is divided by the examples of the whole step, so the gradients add up to
    # the mean over exactly this step's examples, however they are split into ranks and
    # micro-batches, and for a short last step too. DDP averages gradients over ranks: the
    # WORLD_SIZE factor turns that average back into the sum.
    loss_weight = WORLD_SIZE / examples_in_step
    losses = []
    for index, batch in enumerate(micro_batches):
        # Under DDP each backward all-reduces the gradients across ranks. Between micro-batches
        # only the local sum is needed: no_sync() skips that communication until the last one.
        last = index == len(micro_batches) - 1
        with contextlib.nullcontext() if WORLD_SIZE == 1 or last else model.no_sync():
            # autocast covers the forward and the loss: matmuls in bf16/fp16, range-sensitive ops
            # in fp32. The backward stays outside: each op's backward runs in its forward's dtype.
            with autocast():
                loss = loss_fn(model, batch)
            # fp16 gradients below ~6e-8 underflow to zero, so the scaler multiplies the loss by
            # a large factor first (without fp16 it is disabled and does nothing).
            scaler.scale(loss * loss_weight).backward()
        losses.append(loss.detach())
    # Divide the fp16 loss scale out of the gradients first: clipping compares the true norm.
    scaler.unscale_(optimizer)
    total_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    # The step's one wait for the device: the host decides whether to apply the update. A NaN/inf
    # gradient (an fp16 overflow, or a real divergence) skips it.
    grad_norm = total_norm.item()
    update_applied = math.isfinite(grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if update_applied:
        scaler.step(optimizer)  # optimizer.step(), through the fp16 scaler's bookkeeping
    scaler.update()  # fp16: halve the scale after an overflow, grow it after many good steps
    # set_to_none: the next backward writes the gradients instead of adding them to zeros.
    optimizer.zero_grad(set_to_none=True)
    return torch.stack(losses).sum(), grad_norm, update_applied


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
    short = [steps.pop()] if len(steps[-1]) < step_size else []  # a short step stays last...
    short = [s for s in short if len(s) >= world_size]  # ...unless some rank would get nothing
    if lengths is not None and steps:
        steps = [steps[i] for i in generator.permutation(len(steps))]
        longest = max(range(len(steps)), key=lambda s: lengths[steps[s]].max())
        steps.insert(0, steps.pop(longest))
    plan = []
    for step in steps + short:
        # As many micro-batches as batch_size needs (a short step needs fewer), the same number on
        # every rank (DDP requires it), their sizes evened by array_split: a short step of 20
        # examples at batch 8 on one rank gives 7, 7 and 6.
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
):
    """Train from `progress` to total_steps. plan(epoch) gives this rank's steps (epoch_plan),
    make_batch(indices) a batch, learning_rate(updates) the rate, evaluate(model, step) a dict of
    floats to log (it may set progress["early_stopped"]). A set stop_requested saves, then stops."""
    device = next(model.parameters()).device
    # DDP all-reduces the gradients across ranks during backward, overlapped with it.
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if WORLD_SIZE > 1 else model
    plan = functools.lru_cache(maxsize=1)(plan)  # each epoch's plan is made once
    steps_per_epoch, stopped = len(plan(0)), False
    window = torch.zeros((), device=device)  # the loss summed since the last log record
    last_eval = all_gather(truncate_log(output_dir, progress["step"]))[0]  # the first write
    while progress["step"] < total_steps and not (stopped or progress.get("early_stopped")):
        model.train()  # dropout on: a model may come in eval mode, and evaluate() may leave it so
        started = time.perf_counter()
        epoch, step_in_epoch = divmod(progress["step"], steps_per_epoch)
        examples_in_step, micro_batch_ids = plan(epoch)[step_in_epoch]
        loss_sum, grad_norm, update_applied = train_step(
            ddp_model,
            [to_device(make_batch(ids), device) for ids in micro_batch_ids],
            loss_fn=loss_fn,
            examples_in_step=examples_in_step,
            optimizer=optimizer,
            lr=learning_rate(progress["step"] - progress["skipped_steps"]),  # counts updates
            scaler=scaler,
            autocast=autocast,
            clip=clip,
        )
        window += loss_sum
        step = count_step(progress, update_applied, examples_in_step, time.perf_counter() - started)
        stopped = any(all_gather(stop_requested.is_set()))  # all stop after the same step
        save = stopped or step == total_steps or step % save_steps == 0
        if save or step % logging_steps == 0:  # a save closes the log window
            window = log(output_dir, window, progress, optimizer, grad_norm)
        if step == total_steps or step % eval_steps == 0:
            last_eval = log_evaluation(output_dir, step, evaluate(model, step))  # the plain model
        if save:
            save_checkpoint(output_dir, model, optimizer, scaler, progress, flags)
    if last_eval is None and not stopped:  # resumed at the end, no evaluation logged there
        last_eval = log_evaluation(output_dir, progress["step"], evaluate(model, progress["step"]))
    return dict(progress, stopped=stopped, final=last_eval)


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


def log(output_dir, window, progress, optimizer, grad_norm):
    """Rank 0 logs the steps since the last record; returns the next window's loss sum: zero."""
    if WORLD_SIZE > 1:
        dist.all_reduce(window)
    logged_examples, logged_seconds = progress["logged"]
    examples, seconds = progress["examples"] - logged_examples, progress["seconds"] - logged_seconds
    progress["logged"] = [progress["examples"], progress["seconds"]]
    record = {
        "step": progress["step"],
        "loss": window.item() / examples,  # waits for the device: once a log, not every step
        "lr": optimizer.param_groups[0]["lr"],
        "grad_norm": grad_norm,
        "skipped_steps": progress["skipped_steps"],
        "samples_per_second": examples / seconds,
    }
    if RANK == 0:
        append_log(output_dir, record)
        print("  ".join(f"{key} {value:.4g}" for key, value in record.items()), flush=True)
    return torch.zeros_like(window)


def log_evaluation(output_dir, step, scores):
    if RANK == 0:
        append_log(output_dir, {"step": step, "eval": scores})
        print(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
    return scores


def append_log(output_dir, record):
    """Appended in place: truncate_log drops a line that a kill cut short at the next start."""
    with open(os.path.join(output_dir, "log.jsonl"), "a") as f:
        f.write(to_json(record) + "\n")


def to_json(record, indent=None):
    """JSON with null for a NaN or infinite number, which JSON has no word for (jq, JavaScript)."""
    return json.dumps(json.loads(json.dumps(record), parse_constant=lambda _: None), indent=indent)


# === 5. Checkpoints and resume ===================================================================
# A resumed run continues exactly where the interrupted one stopped. A checkpoint holds the
# weights, the optimizer's moments, the fp16 loss scale, each rank's torch random streams (draw
# your randomness, like dropout, from them) and the step: the whole position in the data (the
# plan depends only on (seed, epoch)) and in the learning-rate schedule. It holds the run's flags
# too; those that make it another run must match.


def start_or_resume(model, optimizer, scaler, output_dir, flags, must_match):
    """Load the newest checkpoint in output_dir (none there, or None: start afresh) into the
    freshly built objects; writes nothing, but sets torch's random state: make your data first.
    flags: the run's settings as plain values (str, int, float, bool, None), "seed" among them;
    must_match: the names of those that make it another run. Returns (progress, notes to print)."""
    for name, value in flags.items():  # torch.load(weights_only=True) reads nothing else back
        if type(value) not in (str, int, float, bool, type(None)):
            raise ValueError(f"flags[{name!r}] is a {type(value).__name__}: give a plain value")
    if unknown := set(must_match) - set(flags):
        raise ValueError(f"must_match names {sorted(unknown)}, which flags does not have")
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
    steps, and each step appears once) and any line that a kill cut short. Rank 0 writes, and
    gets the scores of an evaluation logged at `step`, if there is one."""
    if RANK != 0:
        return None
    os.makedirs(output_dir, exist_ok=True)
    path, kept, scores = os.path.join(output_dir, "log.jsonl"), [], None
    with open(path, "a+") as f:
        f.seek(0)
        for line in f:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                record = json.loads(line)
                if line.endswith("\n") and record["step"] <= step:
                    kept.append(line)
                    if record["step"] == step and "eval" in record:
                        scores = record["eval"]
    write_atomically(path, lambda f: f.write("".join(kept).encode()))
    return scores and {k: math.nan if v is None else v for k, v in scores.items()}  # null: NaN
