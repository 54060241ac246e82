"""The training loop, evaluation, and checkpoints: everything a fine-tuning run does, in plain torch."""
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data import collate, epoch_plan
from metrics import compute_metrics

PREEMPTED_EXIT_CODE = 143  # what a shell reports for "ended by SIGTERM"; schedulers requeue on it


def setup_distributed():
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain `python` run is one process, no group."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # one GPU per process; NCCL needs to know which before the first call
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return rank, world_size, device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def get_rng_state():
    kind, keys, position, has_gauss, gauss = np.random.get_state()  # keys as a list: weights_only loads no ndarray
    return {"python": random.getstate(), "numpy": (kind, keys.tolist(), position, has_gauss, gauss),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}  # [] without CUDA


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_gather(obj, world_size):
    """Every rank's `obj`, in rank order (just [obj] when running without a process group)."""
    gathered = [obj] * world_size
    if world_size > 1:
        dist.all_gather_object(gathered, obj)
    return gathered


def run_config(args, world_size):
    """What a checkpoint must agree with to be resumed: the same model, task, data and global batch."""
    return {"model": args.model_name_or_path, "task": args.task_name, "max_seq_length": args.max_seq_length,
            "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size}


def build_optimizer(model, learning_rate, weight_decay, device):
    # Decay pulls weights towards zero; biases and norm gains (the 1-D parameters in any architecture) get none.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    # fused=True updates every parameter in one kernel instead of a loop of small ones.
    return torch.optim.AdamW(groups, lr=learning_rate, fused=device.type in ("cuda", "cpu"))


def build_scheduler(optimizer, kind, warmup_steps, total_steps):
    """Linear warmup from 0, then linear or cosine decay to 0 (or constant) at total_steps."""
    def lr_factor(step):
        if step < warmup_steps:
            return step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return {"linear": max(0.0, 1 - progress), "cosine": 0.5 * (1 + math.cos(math.pi * min(1.0, progress))),
                "constant": 1.0}[kind]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def loss_sum(logits, labels, regression):
    """Summed (not averaged) loss in fp32: the caller divides by the examples in the whole step."""
    if regression:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction="sum")
    return F.cross_entropy(logits.float(), labels, reduction="sum")


@torch.no_grad()
def predict(model, examples, batch_size, regression, ctx):
    """Predictions for every example, in order, on every rank. Rank r predicts every world_size-th example of a
    length-sorted order (little padding); gathered by index, each counts once (DistributedSampler pads twice)."""
    model.eval()
    rank, world_size = ctx["rank"], ctx["world_size"]
    by_length = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    mine, outputs = by_length[rank::world_size], []
    for start in range(0, len(mine), batch_size):
        batch = collate([examples[i] for i in mine[start:start + batch_size]], ctx["pad_id"])
        batch = {k: v.to(ctx["device"]) for k, v in batch.items() if k != "labels"}
        with ctx["autocast"]:
            logits = model(**batch).logits.float()
        outputs.append(logits.squeeze(-1) if regression else logits.argmax(-1))
    mine_out = torch.cat(outputs).cpu().numpy() if outputs else np.zeros(0)
    predictions = np.zeros(len(examples), dtype=np.float64 if regression else np.int64)
    for indices, values in all_gather((mine, mine_out), world_size):
        predictions[indices] = values
    model.train()
    return predictions


def evaluate(model, eval_sets, task, args, ctx):
    """Metrics of each dev split, prefixed by split name when a task has several (MNLI)."""
    results = {}
    for split, examples in eval_sets.items():
        preds = predict(model, examples, args.per_device_eval_batch_size, task["labels"] is None, ctx)
        metrics = compute_metrics(task["metrics"], preds, np.array([e["label"] for e in examples]))
        prefix = "" if len(eval_sets) == 1 else split.replace("validation_", "") + "_"
        results.update({prefix + name: value for name, value in metrics.items()})
    return results


def fsync(path):  # to disk, not just the page cache: a rename must never land before the data it names
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def save_checkpoint(output_dir, step, state):
    """Write checkpoint-{step}/ so that a crash at any moment leaves the complete checkpoint or nothing under that
    name: all goes to a .tmp folder, COMPLETE marker last, flushed to disk, then one atomic rename (POSIX)."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        torch.save(state, os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "COMPLETE"), "w") as f:
            f.write(f"{step}\n")
        for name in ("state.pt", "COMPLETE"):
            fsync(os.path.join(tmp, name))
    except (OSError, RuntimeError) as e:  # disk full, quota, I/O error: the older checkpoints are untouched
        raise OSError(f"could not write checkpoint {final} ({e}); the previous checkpoints are intact") from None
    shutil.rmtree(final, ignore_errors=True)  # an older save of this step (resumed from before it), or a leftover
    os.replace(tmp, final)
    fsync(output_dir)


def save_pretrained_atomically(model, tokenizer, path):
    """Hugging Face format (loadable by from_pretrained and pipeline), swapped in by rename."""
    tmp, old = path + ".tmp", path + ".old"
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(output_dir):
    """checkpoint-N folders, newest first (unfinished .tmp folders never match)."""
    found = [(int(m.group(1)), os.path.join(output_dir, name)) for name in os.listdir(output_dir)
             if (m := re.fullmatch(r"checkpoint-(\d+)", name))] if os.path.isdir(output_dir) else []
    return [path for _, path in sorted(found, reverse=True)]


CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "scaler", "progress", "config", "rng"}


def load_checkpoint(path):
    if not os.path.isfile(os.path.join(path, "COMPLETE")):
        raise ValueError(f"checkpoint {path} is incomplete (no COMPLETE marker): it was being written when the run stopped")
    try:
        # weights_only: a checkpoint is data; unpickling arbitrary objects would run code from the file.
        state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is corrupt or unsafe ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys():
        raise ValueError(f"checkpoint {path} is not a checkpoint of this trainer (missing keys)")
    return state


def find_resume_checkpoint(output_dir, resume_from, rank):
    """The state to resume from: an explicit path, or with 'latest'/'auto' the newest checkpoint that
    loads, skipping (with a warning) any that a crash or a disk fault left incomplete or corrupt."""
    if resume_from not in ("latest", "auto"):
        if not os.path.isdir(resume_from):
            raise FileNotFoundError(f"--resume_from_checkpoint {resume_from} does not exist: give a checkpoint-N folder, 'latest' or 'auto'")
        return resume_from, load_checkpoint(resume_from)
    candidates = list_checkpoints(output_dir)
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except ValueError as e:
            if rank == 0:
                warnings.warn(f"skipping {e}")
    if candidates or resume_from == "latest":  # never silently restart a run whose checkpoints all broke
        what = "none of them loads" if candidates else "there is none"
        raise FileNotFoundError(f"no usable checkpoint in {output_dir} ({what}): fix or remove them, or use --overwrite_output_dir")
    return None, None  # 'auto' on a fresh output dir: start from scratch


def check_resumable(saved, current, allow_change):
    """Resuming with another model, task or global batch would silently train something else."""
    changed = [f"{k}: checkpoint has {saved.get(k)!r}, this run has {current[k]!r}"
               for k in current if saved.get(k) != current[k]]
    if changed and not allow_change:
        raise ValueError(f"cannot resume, settings differ ({'; '.join(changed)}); "
                         "restore them, or pass --ignore_checkpoint_mismatch to continue anyway")


def rotate_checkpoints(output_dir, limit, keep_step):
    """Delete the oldest checkpoints beyond `limit`, never the one holding the best model. Renaming to
    .tmp first makes each vanish at once; a kill mid-delete leaves no half checkpoint behind."""
    for path in set(list_checkpoints(output_dir)[limit:]) - {os.path.join(output_dir, f"checkpoint-{keep_step}")}:
        os.replace(path, path + ".tmp")
    for name in os.listdir(output_dir):  # also what earlier crashes left mid-write
        if name.startswith("checkpoint-") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def log_json(output_dir, record):
    with open(os.path.join(output_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(output_dir, step):
    """On resume, drop records past the checkpoint (this run redoes those steps) and a line a kill cut short."""
    path = os.path.join(output_dir, "log.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            kept = [line for line in f if line.endswith("}\n") and json.loads(line)["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def train(args, model, tokenizer, train_set, eval_sets, task, ctx, resume_state=None):
    """Fine-tune `model` (already on ctx["device"]); returns the run's final summary (rank 0 writes files)."""
    rank, world_size, device = ctx["rank"], ctx["world_size"], ctx["device"]
    regression, main_process = task["labels"] is None, rank == 0
    if args.gradient_checkpointing:  # recompute activations in backward: less memory, ~30% more compute
        model.gradient_checkpointing_enable()
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, device)
    lengths = [len(e["input_ids"]) for e in train_set]
    def plan_of(epoch):  # this rank's steps in one epoch: see data.epoch_plan
        return epoch_plan(lengths, args.per_device_train_batch_size, args.gradient_accumulation_steps,
                          world_size, rank, args.seed, epoch, args.group_by_length)
    steps_per_epoch = len(plan_of(0))
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(steps_per_epoch * args.num_train_epochs)
    warmup_steps = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
    scheduler = build_scheduler(optimizer, args.lr_scheduler_type, warmup_steps, total_steps)
    # fp16 has a narrow range: small gradients underflow to 0. The scaler multiplies the loss by a large
    # factor before backward and divides it out before the update; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(device.type, enabled=args.fp16)
    stateful = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    progress = {"step": 0, "epoch": 0, "step_in_epoch": 0, "best_eval": None, "best_step": None,
                "nonfinite_streak": 0, "skipped_steps": 0}
    if resume_state is not None:
        for key, obj in stateful.items():
            obj.load_state_dict(resume_state[key])
        progress.update(resume_state["progress"])
        if len(resume_state["rng"]) == world_size:  # each rank continues its own dropout stream
            set_rng_state(resume_state["rng"][rank])
        else:  # another world size: the data order is unchanged, dropout streams restart
            seed_everything(args.seed + 1000 * rank + progress["step"])
    if args.torch_compile:
        model.compile()  # compiles in place, so state_dict keys stay those of the plain model
    # DDP all-reduces (averages) gradients across ranks during backward, overlapped with computation.
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    preempted = []
    signal.signal(signal.SIGTERM, lambda signum, frame: preempted.append(signum))
    window = torch.zeros(3, dtype=torch.float64)  # loss sum, examples, real tokens since the last log
    totals, window_seconds, train_seconds = torch.zeros(3, dtype=torch.float64), 0.0, 0.0
    start_time = time.perf_counter()
    step, last_eval = progress["step"], None
    bar = tqdm(total=total_steps, initial=step, disable=not main_process, desc="train")
    model.train()
    while step < total_steps:
        plan = plan_of(progress["epoch"])
        # Skipping the steps already done (after a resume) continues exactly where the run stopped.
        for examples_in_step, micro_batches in plan[progress["step_in_epoch"]:]:
            step_start, step_loss = time.perf_counter(), torch.zeros((), device=device)
            for i, indices in enumerate(micro_batches):
                batch = collate([train_set[j] for j in indices], ctx["pad_id"])
                window[1:] += torch.tensor([len(indices), int(batch["attention_mask"].sum())])
                labels = batch.pop("labels").to(device)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                # Under DDP every backward all-reduces gradients; between micro-batches of one step only
                # the local sum is needed, so no_sync skips that communication until the last one.
                last_micro = i == len(micro_batches) - 1
                with ddp_model.no_sync() if world_size > 1 and not last_micro else contextlib.nullcontext():
                    with ctx["autocast"]:  # matmuls in bf16/fp16, reductions kept in fp32 by autocast
                        logits = ddp_model(**batch).logits
                    loss = loss_sum(logits, labels, regression)
                    # Sum over the micro-batch / examples in the whole step (x world_size, since DDP
                    # averages over ranks): the step's gradient is the mean over all its examples,
                    # however they were split into ranks and micro-batches, short last step included.
                    scaler.scale(loss * world_size / examples_in_step).backward()
                step_loss += loss.detach()
            # Clip the true gradients: unscale first, or the threshold would apply to scaled ones.
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf))
            if math.isfinite(grad_norm):  # the step's one host sync: skipping must be decided on the host
                scaler.step(optimizer)  # plain optimizer.step() unless fp16
                scheduler.step()  # not after a skipped step, or the schedule would run ahead of the updates
                progress["nonfinite_streak"] = 0
            else:  # a NaN/inf loss or gradient (fp16 overflow, or a real divergence): skip this update
                progress["nonfinite_streak"] += 1
                progress["skipped_steps"] += 1
            scaler.update()  # fp16: halve the scale after an overflow, grow it after a run of good steps
            optimizer.zero_grad(set_to_none=True)  # frees the gradient memory instead of filling zeros
            window[0] += step_loss.cpu().double()
            window_seconds += time.perf_counter() - step_start  # training only: eval and saves excluded
            step = progress["step"] = step + 1
            progress["step_in_epoch"] += 1
            if progress["nonfinite_streak"] >= args.max_nonfinite_steps:
                raise RuntimeError(f"{args.max_nonfinite_steps} steps in a row had non-finite gradients (at step {step}): "
                                   "lower --learning_rate, use --bf16, or check the data; the checkpoints are intact")
            epoch_done = progress["step_in_epoch"] == len(plan)
            if epoch_done:
                progress["epoch"], progress["step_in_epoch"] = progress["epoch"] + 1, 0
            stop = torch.tensor([float(bool(preempted))], device=device)
            if world_size > 1:  # every rank must agree to stop after the same step
                dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            last, stop = step == total_steps, bool(stop.item())
            save = stop or last or (step % args.save_steps == 0 if args.save_steps else epoch_done)
            if save or step % args.logging_steps == 0:  # also log at saves, so a resume starts a fresh window
                if world_size > 1:
                    dist.all_reduce(window)
                totals += window
                loss_total, examples, tokens = window.tolist()
                record = {"step": step, "epoch": round(step / steps_per_epoch, 3), "loss": loss_total / examples,
                          "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "skipped_steps": progress["skipped_steps"],
                          "samples_per_second": examples / window_seconds, "tokens_per_second": tokens / window_seconds}
                if main_process:
                    log_json(args.output_dir, record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                window.zero_()
                train_seconds, window_seconds = train_seconds + window_seconds, 0.0
            bar.update(1)
            if last or (step % args.eval_steps == 0 if args.eval_steps else epoch_done):
                last_eval = evaluate(model, eval_sets, task, args, ctx)  # the unwrapped model: no DDP hooks
                if main_process:
                    log_json(args.output_dir, {"step": step, "eval": last_eval})
                    tqdm.write(f"step {step}: {last_eval}")
                best, metric = progress["best_eval"], args.metric_for_best_model
                if best is None or last_eval[metric] > best[metric] or math.isnan(best[metric]):
                    progress["best_eval"], progress["best_step"] = last_eval, step
                    if main_process:
                        save_pretrained_atomically(model, tokenizer, os.path.join(args.output_dir, "best"))
            if save:
                rng = all_gather(get_rng_state(), world_size)  # each rank has its own dropout stream
                if main_process:  # DDP keeps replicas identical: one copy of model and optimizer
                    save_checkpoint(args.output_dir, step, {key: obj.state_dict() for key, obj in stateful.items()}
                                    | {"progress": progress, "config": run_config(args, world_size), "rng": rng})
                    rotate_checkpoints(args.output_dir, args.save_total_limit, progress["best_step"])
                if world_size > 1:  # nobody exits (and gets the group torn down) before the save is on disk
                    dist.barrier()
            if stop:
                bar.close()
                if main_process:
                    print(f"preempted: checkpoint-{step} saved; rerun with --resume_from_checkpoint auto", file=sys.stderr)
                raise SystemExit(PREEMPTED_EXIT_CODE)
            if last:
                break
    bar.close()
    if last_eval is None:  # resumed from the final checkpoint: nothing left to train
        last_eval = evaluate(model, eval_sets, task, args, ctx)
    return {"final": last_eval, "best": progress["best_eval"], "best_step": progress["best_step"], "global_step": step,
            "train_runtime": time.perf_counter() - start_time, "train_seconds": train_seconds,  # runtime less evaluations and saves
            "train_samples_per_second": float(totals[1]) / (train_seconds or math.inf),  # 0 if nothing was left to train
            "train_tokens_per_second": float(totals[2]) / (train_seconds or math.inf)}
