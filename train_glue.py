"""Fine-tune a Hugging Face model on GLUE or your own files: the command line around trainer.py.
README.md has examples; `torchrun --nproc_per_node=N train_glue.py` takes the same flags.

Exit status: 0 done; 1 an error (one `error:` line says what to fix); 130 after Ctrl-C and 143
after SIGTERM, once a checkpoint is written (rerun with --resume_from_checkpoint auto).
"""

import argparse
import contextlib
import datetime
import fcntl
import functools
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import data
import lora
import metrics
import trainer

# What makes a checkpoint another run, which a resume must keep: the model, what it trains on
# (task, files, --max_seq_length: the tokenized examples' fingerprint), seed, batch, precision.
MUST_MATCH = "model_name_or_path train_data seed global_batch_size bf16 fp16".split()
MUST_MATCH += "load_best_model_at_end metric_for_best_model early_stopping_patience".split()
MUST_MATCH += "class_weights lora_rank lora_alpha lora_dropout".split()
# LoRA's targets, the attention's query and value: BERT's, DistilBERT's, BART's or LLaMA's names.
LORA_TARGETS = {"query", "value", "q_lin", "v_lin", "q_proj", "v_proj"}
# Every name this trainer writes into an output dir: all that --overwrite_output_dir deletes.
PREDICTIONS = r"(CoLA|SST-2|MRPC|STS-B|QQP|MNLI-mm?|QNLI|RTE|WNLI|predictions)\.tsv"
OURS = rf"(\.lock|log\.jsonl|checkpoint-\d+\.pt|final|runs|{PREDICTIONS})(\.tmp|\.old)?"
TRAINING = threading.Event()  # set once the first step may run: a stop then saves a checkpoint


def checked(kind, condition, meaning):  # an argparse type: one `error:` line for a bad value
    def parse(text):
        with contextlib.suppress(ValueError):
            if condition(value := kind(text)):  # nan and inf fail each condition below
                return value
        raise argparse.ArgumentTypeError(f"must be {meaning}, not {text!r}")

    return parse


POSITIVE = checked(int, lambda n: n >= 1, "an integer >= 1")
COUNT = checked(int, lambda n: n >= 0, "an integer >= 0")
NON_NEGATIVE = checked(float, lambda x: 0 <= x < math.inf, "a number >= 0")
WEIGHTS = checked(  # "balanced", or one weight per class: "1,4"
    lambda text: text if text == "balanced" else [float(w) for w in text.split(",")],
    lambda w: w == "balanced" or all(0 < x < math.inf for x in w),
    "balanced or weights > 0 like 1,4",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.error = lambda message: parser.exit(1, f"error: {message} (see --help)\n")
    add = parser.add_argument
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--task_name", type=str.lower, choices=data.GLUE)
    task.add_argument("--train_file", help="your own .csv, .tsv, .json or .jsonl (see README)")
    add("--validation_file", help="with --train_file: the dev set")
    add("--test_file", help="with --train_file: predict it into predictions.tsv")
    add("--data_dir", default=os.environ.get("GLUE_DIR"), help="GLUE's classic layout ($GLUE_DIR)")
    add("--dataset_name", help="GLUE from the hub (default: nyu-mll/glue) or a folder like it")
    add("--model_name_or_path", required=True, help="a hub id or a local folder")
    add("--output_dir", required=True, type=checked(str, bool, "a folder"))
    add("--max_seq_length", type=POSITIVE, default=128)
    add("--max_train_samples", type=POSITIVE)
    add("--max_eval_samples", type=POSITIVE)
    add("--do_predict", action="store_true", help="predict GLUE's test split (or --test_file)")
    add("--per_device_train_batch_size", type=POSITIVE, default=32)
    add("--per_device_eval_batch_size", type=POSITIVE, default=64)
    add("--gradient_accumulation_steps", type=POSITIVE, default=1)
    add("--learning_rate", type=checked(float, lambda x: 0 < x < 1, "in (0, 1)"), default=5e-5)
    add("--weight_decay", type=NON_NEGATIVE, default=0.01)
    add("--num_train_epochs", type=checked(float, lambda x: 0 < x <= 1e6, "in (0, 1e6]"), default=3)
    add("--max_steps", type=POSITIVE, help="the run's length, instead of --num_train_epochs")
    add("--warmup_ratio", type=checked(float, lambda x: 0 <= x < 1, "in [0, 1)"), default=0.0)
    add("--max_grad_norm", type=NON_NEGATIVE, default=1.0, help="0: no clipping")
    add("--gradient_checkpointing", action="store_true", help="less memory, a third more time")
    add("--torch_compile", action="store_true", help="compile the model: see docs/performance.md")
    add("--load_best_model_at_end", action="store_true", help="final/: the best evaluation's")
    add("--metric_for_best_model", help="the score that decides (default: the task's main)")
    add("--early_stopping_patience", type=POSITIVE, help="evaluations without improvement")
    add("--class_weights", type=WEIGHTS, help="balanced, or a weight per class: 1,4 (see README)")
    add("--lora_rank", type=COUNT, default=0, help="LoRA's rank (0: train every weight)")
    add("--lora_alpha", type=checked(float, lambda x: 0 < x < math.inf, "> 0"), default=16.0)
    add("--lora_dropout", type=checked(float, lambda x: 0 <= x < 1, "in [0, 1)"), default=0.0)
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bf16 autocast, where native")
    precision.add_argument("--fp16", action="store_true", help="fp16 autocast, loss scaling")
    add("--seed", type=checked(int, lambda n: 0 <= n < 2**32, "in [0, 2**32)"), default=42)
    add("--logging_steps", type=POSITIVE, default=50)
    add("--report_to", choices=["none", "tensorboard"], default="none")
    add("--logging_dir", default=os.environ.get("TENSORBOARD_LOGGING_DIR"), help="OUTPUT_DIR/runs")
    add("--eval_steps", type=COUNT, default=0, help="0: at each epoch's end")
    add("--save_steps", type=COUNT, default=0, help="0: at each epoch's end")
    run = parser.add_mutually_exclusive_group()  # an output dir holding a run needs one of these
    run.add_argument("--resume_from_checkpoint", choices=["auto"], help="from the newest, if any")
    run.add_argument("--overwrite_output_dir", action="store_true", help="delete its outputs")
    add("--ddp_timeout", type=checked(int, lambda n: 1 <= n <= 604800, "in [1, 604800]"))
    add("--debug", action="store_true", help="tracebacks instead of one-line errors")
    return parser.parse_args(argv)


def ours(output_dir):
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return sorted(name for name in names if re.fullmatch(OURS, name))


def load_model(args, task):
    names, path = task["classes"] or ["score"], args.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(names),  # a new classifier head, initialised from the seed
            id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)},
            # What the head is: pipeline() then applies a softmax to classes, a sigmoid to each of
            # a multi-label task's, nothing to a score.
            problem_type=task["problem_type"],
            ignore_mismatched_sizes=True,  # a head trained for another task is replaced
            dtype=torch.float32,  # fp32 master weights: AdamW's small updates vanish in bf16
        )
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load model {path} ({trainer.first_line(error)})") from None
    if tokenizer.pad_token is None:  # GPT-2 style: pad with end-of-text, as HF's examples do
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise ValueError(f"{path}'s tokenizer has no pad token nor end-of-text token: add one")
    model.config.pad_token_id = tokenizer.pad_token_id  # a GPT-2 head reads the last non-pad
    if len(tokenizer) < model.config.vocab_size / 2:  # most embeddings never used: not its own
        raise ValueError(f"{path} has another tokenizer than its model's: save the model's there")
    # What the model can embed: its config's positions, less the rows before the first position
    # (RoBERTa's table has 514 and starts at 2); room for [CLS], [SEP] and a token of each text.
    table = getattr(getattr(model.base_model, "embeddings", None), "position_embeddings", None)
    start = 0 if getattr(table, "padding_idx", None) is None else table.padding_idx + 1
    rows = getattr(model.config, "max_position_embeddings", None)  # GPT-2's n_positions too
    longest = (rows - start if rows else tokenizer.model_max_length) // 8 * 8  # collate pads to 8s
    shortest = tokenizer.num_special_tokens_to_add(len(task["texts"]) == 2) + len(task["texts"])
    if not shortest <= args.max_seq_length <= longest:
        raise ValueError(f"--max_seq_length must be in [{shortest}, {longest}] for this model")
    if args.lora_rank:  # the base model frozen but its adapters; the head trains in full
        model.base_model.requires_grad_(False)
        lora.add(model.base_model, LORA_TARGETS, args.lora_rank, args.lora_alpha, args.lora_dropout)
    if args.gradient_checkpointing:  # keep each layer's input only; backward recomputes the rest
        model.activation_checkpointing_enable()  # transformers 4: gradient_checkpointing_enable()
    if args.torch_compile:  # compiles lazily, per new input shape; state_dict() keeps plain names
        model.compile()
    return tokenizer, model


def run(args, stop_requested):
    """Returns True if it stopped early, as stop_requested asked."""
    device, task, tokenizer, model, splits = load(args)
    train_set = splits["train"]
    plan = functools.partial(
        trainer.epoch_plan,
        len(train_set),
        batch_size=args.per_device_train_batch_size,
        accumulation=args.gradient_accumulation_steps,
        seed=args.seed,
        lengths=data.lengths(train_set),  # steps of examples of similar length: less padding
    )
    steps_per_epoch = len(plan(0))
    total_steps = args.max_steps or math.ceil(args.num_train_epochs * steps_per_epoch)
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)
    if warmup_steps >= total_steps:
        raise trainer.AllRanksError(f"a warmup of {warmup_steps} fills all {total_steps} steps")
    eval_steps, save_steps = args.eval_steps or steps_per_epoch, args.save_steps or steps_per_epoch
    if args.load_best_model_at_end and eval_steps % save_steps:  # the best needs a checkpoint
        raise trainer.AllRanksError("--load_best_model_at_end: save at every --eval_steps")
    optimizer = trainer.build_optimizer(model, args.learning_rate, args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.fp16)  # fp16's range needs it
    progress, flags, lock = resume_or_start(args, model, optimizer, scaler, train_set, total_steps)
    dtype = torch.bfloat16 if args.bf16 else torch.float16
    autocast = functools.partial(torch.autocast, device.type, dtype)  # a fresh context each use
    autocast = autocast if args.bf16 or args.fp16 else contextlib.nullcontext
    evaluate_now = functools.partial(evaluate, args, task, tokenizer, splits, autocast)
    weights = torch.tensor(args.class_weights, device=device) if args.class_weights else None
    TRAINING.set()
    summary = trainer.train(
        model,
        optimizer,
        scaler,
        progress,
        plan=plan,
        make_batch=lambda indices: data.collate(train_set[indices], tokenizer),
        loss_fn=functools.partial(loss_sum, weights),
        learning_rate=lambda updates: trainer.learning_rate_at(
            updates, args.learning_rate, warmup_steps, total_steps
        ),
        autocast=autocast,
        clip=args.max_grad_norm or math.inf,  # 0: no clipping, but the norm is still checked
        evaluate=lambda model, step: keep_best(args, progress, step, evaluate_now(model, step)),
        output_dir=args.output_dir,
        flags=flags,
        total_steps=total_steps,
        logging_steps=args.logging_steps,
        eval_steps=eval_steps,
        save_steps=save_steps,
        stop_requested=stop_requested,
        report=reporter(args, total_steps, progress["step"]),
    )
    if summary["stopped"] and trainer.RANK == 0:
        print(f"stopped: {summary['step']} steps done; continue with --resume_from_checkpoint auto")
    elif not summary["stopped"]:
        write_final_outputs(args, task, model, tokenizer, splits, summary, autocast)
    return summary["stopped"]


def loss_sum(class_weights, model, batch):
    """A micro-batch's loss summed over its examples, and their number (trainer.train_step's
    contract): the mean the model's own head computes (cross-entropy; binary cross-entropy for
    multi-label; squared error for a score), times the examples. With class weights, each
    example's loss times its class's weight, still divided by the step's examples, not by their
    weights' sum as torch's weighted mean is: that sum changes with each micro-batch's classes,
    so micro-batches and ranks would no longer add up to one batch. Balanced: 1 per example."""
    if class_weights is None:
        return model(**batch).loss * len(batch["labels"]), len(batch["labels"])
    logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
    loss = F.cross_entropy(logits.float(), batch["labels"], class_weights, reduction="sum")
    return loss, len(batch["labels"])


def reporter(args, total_steps, first_step):
    """report() for trainer.train: each record as a line and, with --report_to tensorboard, its
    numbers as train/* or eval/* scalars. purge_step: TensorBoard drops what a killed run logged
    past the step this one resumes from, so each step shows once."""
    writer, runs = None, args.logging_dir or os.path.join(args.output_dir, "runs")
    if args.report_to == "tensorboard" and trainer.RANK == 0:
        from torch.utils.tensorboard import SummaryWriter  # optional: load() checked it is there

        writer = SummaryWriter(runs, purge_step=first_step + 1)

    def report(record):
        """`step 50/345  loss 0.6541 ...  eta 0:04:10`, or `step 115/345:  accuracy 0.8039 ...`"""
        section, values = ("eval", record["eval"]) if "eval" in record else ("train", dict(record))
        values.pop("step", None)
        eta = values.pop("eta_seconds", None)  # unknown at a launch's first steps
        line = f"step {record['step']}/{total_steps}" + (":" if section == "eval" else "")
        line += "".join(f"  {key} {value:.4g}" for key, value in values.items())
        print(line + (f"  eta {datetime.timedelta(seconds=round(eta))}" if eta else ""), flush=True)
        if writer:
            for key, value in values.items():
                writer.add_scalar(f"{section}/{key}", value, record["step"])
            writer.flush()  # a kill loses nothing logged

    return report


def load(args):
    """Every check and load that bad input can fail, before anything is written. Local rank 0
    reads and tokenizes first; the other ranks of its machine then read its `datasets` cache."""
    if ours(args.output_dir) and not (args.resume_from_checkpoint or args.overwrite_output_dir):
        raise ValueError(
            f"--output_dir {args.output_dir} holds a run ({', '.join(ours(args.output_dir)[:3])}):"
            " pass --resume_from_checkpoint auto to continue it, or --overwrite_output_dir"
        )
    if args.train_file and not args.validation_file:
        raise ValueError("--train_file needs a --validation_file to evaluate on")
    if args.task_name and (args.validation_file or args.test_file):
        raise ValueError("--validation_file and --test_file go with --train_file, not --task_name")
    if args.do_predict and args.train_file and not args.test_file:
        raise ValueError("--do_predict with --train_file needs a --test_file to predict")
    if args.dataset_name and (args.data_dir or args.train_file):  # $GLUE_DIR sets --data_dir
        raise ValueError("give one source: --dataset_name, --data_dir ($GLUE_DIR) or --train_file")
    tracks_best = args.load_best_model_at_end or args.early_stopping_patience
    if args.metric_for_best_model and not tracks_best:
        raise ValueError("--metric_for_best_model: for --load_best_model_at_end or early stopping")
    if args.report_to == "tensorboard" and not importlib.util.find_spec("tensorboard"):
        raise ValueError("--report_to tensorboard: pip install tensorboard")
    device = trainer.setup_distributed(args.ddp_timeout or 1800)
    if trainer.RANK != 0:  # one copy of the libraries' messages (the model-load report), not N
        transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.bf16 and not (  # emulated, bf16 runs many times slower (x86: AVX512-BF16 is native)
        torch.cuda.is_bf16_supported(including_emulation=False)
        if device.type == "cuda"
        else torch.cpu._is_avx512_bf16_supported()
    ):
        raise ValueError(f"--bf16: this {device.type.upper()} only emulates bf16: leave --bf16 out")
    torch.manual_seed(args.seed)  # the new classifier head depends on the seed alone
    limits = {"train": args.max_train_samples, "dev": args.max_eval_samples}
    task, tokenizer, model, splits, error = None, None, None, {}, None
    for local_rank_0_first in (True, False):
        if (trainer.LOCAL_RANK == 0) == local_rank_0_first:
            try:
                task = args.task_name and data.glue_task(
                    args.task_name, args.data_dir, args.do_predict, args.dataset_name
                )
                task = task or data.own_task(args.train_file, args.validation_file, args.test_file)
                tokenizer, model = load_model(args, task)
                for name in task["files"]:
                    table = data.read_split(task, name)  # cut before tokenizing: the rows used
                    limit = limits.get(name.split("_")[0]) or len(table)
                    table = table.select(range(min(limit, len(table))))
                    splits[name] = data.tokenize(table, task, name, tokenizer, args.max_seq_length)
            except Exception as load_error:  # a library's own type too: every rank must hear
                error = load_error
        trainer.check_all_ranks(error)  # every rank stops on any rank's error
    names = [prefix(s) + m for s in task["files"] if s.startswith("dev") for m in task["metrics"]]
    if tracks_best:  # HF also takes eval_accuracy
        args.metric_for_best_model = (args.metric_for_best_model or names[0]).removeprefix("eval_")
    if args.metric_for_best_model not in [None, *names]:
        raise trainer.AllRanksError(f"--metric_for_best_model must be one of {names}")
    if args.class_weights:
        args.class_weights = class_weights(args.class_weights, task["classes"], splits["train"])
    return device, task, tokenizer, model.to(device), splits


def class_weights(weights, classes, train_set):
    """--class_weights as one weight per class. `balanced` is scikit-learn's rule, n / (classes x
    count): a class's examples weigh as much in all as any other's, and the weights average 1 over
    the training examples (a class with no example, whose weight nothing uses, counts as one)."""
    if not classes or isinstance(train_set[0]["labels"], list):  # a score, or multi-label
        raise trainer.AllRanksError("--class_weights: for single-label classes only: leave it out")
    if weights == "balanced":
        counts = np.bincount(train_set["labels"], minlength=len(classes))
        weights = (len(train_set) / (len(classes) * np.maximum(counts, 1))).tolist()
    if len(weights) != len(classes):
        raise trainer.AllRanksError(f"--class_weights: give {len(classes)} weights, for {classes}")
    return weights


def resume_or_start(args, model, optimizer, scaler, train_set, total_steps):
    """The newest checkpoint restored, if the run resumes, then the run's first writes. The
    output dir's lock lets one run at a time in (a scheduler may requeue a job that still runs)."""
    flags = {k: v for k, v in vars(args).items() if k not in ("resume_from_checkpoint", "debug")}
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * trainer.WORLD_SIZE
    flags |= {"global_batch_size": batch, "train_data": data.fingerprint(train_set)}
    if len(set(trainer.all_gather(flags["train_data"]))) > 1:  # each node reads its own files
        raise trainer.AllRanksError("ranks read different training data: give every node the same")
    resume_from = args.output_dir if args.resume_from_checkpoint else None
    progress, notes = trainer.start_or_resume(
        model, optimizer, scaler, resume_from, flags, MUST_MATCH
    )
    if progress["step"] > total_steps:
        raise trainer.AllRanksError(f"checkpoint at step {progress['step']} is past {total_steps}")
    best = os.path.join(args.output_dir, f"checkpoint-{progress.get('best_step')}.pt")
    if args.load_best_model_at_end and "best_step" in progress and not os.path.exists(best):
        raise trainer.AllRanksError(
            f"{best}, the best evaluation's, is gone: put it back, or "
            "drop --load_best_model_at_end with --overwrite_output_dir"
        )
    if resume_from and not progress["step"] and os.path.exists(f"{args.output_dir}/final"):
        raise trainer.AllRanksError(
            f"{args.output_dir} holds a finished run (final/) and no "
            "checkpoint: train it again with --overwrite_output_dir"
        )
    error, lock = None, None
    if trainer.RANK == 0:  # the first writes, after every check
        try:
            os.makedirs(args.output_dir, exist_ok=True)
            lock = open(os.path.join(args.output_dir, ".lock"), "a+")  # held until this exits
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock.truncate(0)
            print(os.getpid(), file=lock, flush=True)  # names this run to the next one
            for name in set(ours(args.output_dir) if args.overwrite_output_dir else []) - {".lock"}:
                path = os.path.join(args.output_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        except BlockingIOError:
            lock.seek(0)
            error = f"--output_dir {args.output_dir} is in use by another run (process "
            error += f"{lock.read().strip() or '?'}): wait for it to end, or stop it"
        except OSError as write_error:
            error = f"cannot write --output_dir {args.output_dir} ({write_error.strerror})"
    trainer.check_all_ranks(error)
    if trainer.RANK == 0:  # what runs, and what the resume found
        labels = " / ".join(model.config.id2label.values())  # --class_weights' order
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        line = f"{len(train_set)} examples ({labels}), {total_steps} steps, {trained:,} of "
        line += f"{sum(p.numel() for p in model.parameters()):,} parameters trained"
        print(line, *notes, sep="\n", flush=True)
    return progress, flags, lock


@torch.no_grad()
def predict(args, model, tokenizer, table, autocast):
    """Each rank predicts every world_size-th example of a length-sorted order (little padding;
    running out of memory shows at once); gathered by index, each example counts once."""
    device, batch_size = next(model.parameters()).device, args.per_device_eval_batch_size
    mine = np.argsort(-data.lengths(table), kind="stable")[trainer.RANK :: trainer.WORLD_SIZE]
    model.eval()
    outputs = [torch.zeros(0, model.config.num_labels)]  # a rank may get no example
    for start in range(0, len(mine), batch_size):
        batch = data.collate(table[mine[start : start + batch_size].tolist()], tokenizer)
        with autocast():
            outputs.append(model(**trainer.to_device(batch, device)).logits.float().cpu())
    logits = torch.zeros(len(table), model.config.num_labels)
    for indices, values in trainer.all_gather((mine, torch.cat(outputs))):
        logits[indices] = values
    if model.config.problem_type == "multi_label_classification":
        return (logits > 0).long()  # each class whose sigmoid passes 0.5
    return logits.squeeze(-1) if model.config.num_labels == 1 else logits.argmax(-1)


def evaluate(args, task, tokenizer, splits, autocast, model, step):
    """The task's metrics on each dev split, computed on every rank."""
    scores = {}
    for name, table in splits.items():
        if name.startswith("dev"):
            predictions = predict(args, model, tokenizer, table, autocast).numpy()
            labels = np.asarray(table["labels"])
            for metric in task["metrics"]:
                scores[prefix(name) + metric] = getattr(metrics, metric)(predictions, labels)
    return scores


def prefix(split):
    return "" if split == "dev" else split[4:] + "_"  # MNLI's two: matched_, mismatched_


def keep_best(args, progress, step, scores):
    """Track the best evaluation in `progress`, which each checkpoint saves: a resume continues
    it exactly, and the rotation keeps the best step's checkpoint. Ends the run after
    --early_stopping_patience evaluations without improvement. Returns the scores."""
    if args.metric_for_best_model:
        score = scores[args.metric_for_best_model]
        score = -math.inf if math.isnan(score) else score  # an undefined score is no improvement
        improved = "best_step" not in progress or score > progress["best_score"]
        if improved:
            progress |= {"best_score": score, "best_step": step, "best_eval": scores}
        progress["evals_since_best"] = 0 if improved else progress["evals_since_best"] + 1
        progress["early_stopped"] = progress["evals_since_best"] == args.early_stopping_patience
    return scores


def save_model(model, tokenizer, path, record):
    """Hugging Face's format and eval.json (which step, what scores), written beside, flushed to
    disk, then swapped in by two renames. A crash between them leaves path.old: put back here."""
    if os.path.isdir(path + ".old") and not os.path.exists(path):
        os.replace(path + ".old", path)
    for leftover in (path + ".tmp", path + ".old"):  # what a failed or killed save left
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        model.save_pretrained(path + ".tmp")
        tokenizer.save_pretrained(path + ".tmp")
        with open(f"{path}.tmp/eval.json", "w") as f:
            f.write(trainer.to_json(record, indent=2))
        for name in os.listdir(path + ".tmp"):  # on disk before the renames make them visible
            with open(os.path.join(path + ".tmp", name), "rb+") as f:
                os.fsync(f.fileno())
    except Exception as error:  # a full disk, in whatever type the library raises it
        raise OSError(f"could not write {path} ({trainer.first_line(error)})") from error
    if os.path.exists(path):
        os.replace(path, path + ".old")
    os.replace(path + ".tmp", path)
    shutil.rmtree(path + ".old", ignore_errors=True)


def write_final_outputs(args, task, model, tokenizer, splits, summary, autocast):
    """The test predictions, then final/: the last weights (or the best evaluation's) and, in
    eval.json, the run's scores and speed. final/eval.json, written last: the run is complete."""
    if args.load_best_model_at_end:  # the best evaluation's weights, from its checkpoint
        path = os.path.join(args.output_dir, f"checkpoint-{summary['best_step']}.pt")
        model.load_state_dict(torch.load(path, "cpu", weights_only=True, mmap=True)["model"])
    if args.lora_rank:  # final/ holds plain weights: pipeline() and from_pretrained need no LoRA
        lora.merge(model)
    for name, table in [(name, t) for name, t in splits.items() if name.startswith("test")]:
        values = predict(args, model, tokenizer, table, autocast).tolist()
        classes = task["classes"]  # names; none for a score
        if task["problem_type"] == "multi_label_classification":  # a JSON list: json.loads reads it
            values = [json.dumps([classes[i] for i, on in enumerate(v) if on]) for v in values]
        else:
            values = [classes[v] if classes else round(v, 3) for v in values]
        ids = table["index"] if "index" in table.column_names else range(len(table))
        # "index, prediction" rows: GLUE's submission format (MNLI-m.tsv, MNLI-mm.tsv: its two)
        lines = [f"{i}\t{v}\n" for i, v in zip(ids, values, strict=True)]
        text = "index\tprediction\n" + "".join(lines)
        file = task["predictions"] + {"test_matched": "-m", "test_mismatched": "-mm"}.get(name, "")
        if trainer.RANK == 0:
            path = os.path.join(args.output_dir, f"{file}.tsv")
            trainer.write_atomically(path, lambda f, text=text: f.write(text.encode()))
    if trainer.RANK != 0:
        return
    record = {"task": args.task_name or args.train_file, "model": args.model_name_or_path}
    record |= {key: summary.get(key) for key in ["step", "skipped_steps", "early_stopped"]}
    record["train_samples_per_second"] = summary["examples"] / max(summary["seconds"], 1e-9)
    record["eval"] = summary["eval"]
    if args.load_best_model_at_end:  # final/'s weights; "eval", the last, is the honest score
        note = "final/ holds this evaluation's weights, chosen on the dev set: optimistic scores"
        record["best"] = {"step": summary["best_step"], "eval": summary["best_eval"], "note": note}
    save_model(model, tokenizer, os.path.join(args.output_dir, "final"), record)
    print("done: " + "  ".join(f"{k} {v:.4f}" for k, v in summary["eval"].items()), flush=True)


def main(argv=None):
    args = parse_args(argv)
    stop_requested, received = threading.Event(), []

    def on_signal(signum, frame):
        """SIGTERM (a preemption) or a first Ctrl-C: stop after the step, with a checkpoint; before
        the first step, at once. A second Ctrl-C aborts (torchrun sends one twice, <1 s apart)."""
        now, presses = time.monotonic(), [t for s, t in received if s == signal.SIGINT]
        received.append((signum, now))
        if not TRAINING.is_set():  # exit here: a library reading a big file may eat an exception
            print("error: stopped at once, without writing a checkpoint", file=sys.stderr)
            os._exit(128 + signum)  # as a shell reports a signal's end; stderr is line-buffered
        if signum == signal.SIGINT and any(now - t > 1 for t in presses):
            ignore_signals()  # stopping at once: further interrupts change nothing
            raise KeyboardInterrupt
        stop_requested.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    status = 1
    try:
        stopped = run(args, stop_requested)  # only a signal stops a run early
        signum = received[0][0] if received else signal.SIGTERM  # or another rank's signal
        status = 128 + signum if stopped else 0  # as a shell reports a signal's end
    except KeyboardInterrupt:  # raised by on_signal alone
        status = 128 + received[0][0]
        print("error: stopped at once, without writing a checkpoint", file=sys.stderr)
    except Exception as error:  # one line; --debug shows the traceback
        if args.debug:
            raise
        # An error every rank raised together is printed once per machine; one that this rank
        # met alone (running out of memory, say) by this rank, or nobody would see it.
        if trainer.LOCAL_RANK == 0 or not isinstance(error, trainer.AllRanksError):
            print(f"error: {trainer.first_line(error)}", file=sys.stderr)
    finally:
        ignore_signals()  # the status is decided: a signal now would end the process without it
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    sys.exit(status)


def ignore_signals():
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


if __name__ == "__main__":
    main()
