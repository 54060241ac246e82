"""How our cost grows with the work: tokens/s and peak memory against max_seq_length and batch size,
and data preparation time against dataset size. Prints a table and saves a PNG.

    python benchmarks/scaling.py                       # writes benchmarks/scaling.png
    python benchmarks/scaling.py --bf16 --steps 6

Training points run train_glue.py itself (one process) on synthetic MRPC-format data whose every
pair fills max_seq_length, so each batch is exactly batch x length tokens. Data preparation times
data.load_split + data.tokenize on the first N rows of SST-2's training set (67k sentences).
"""

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_hf import default_model, watch  # noqa: E402

import data  # noqa: E402


def synthetic_mrpc(folder, rows, words_per_sentence, seed=0):
    """MRPC-format train/dev files of random words, long enough that truncation fills max_seq_length."""
    with open(
        os.path.join(ROOT, "..", "shared", "glue", "MRPC", "train.tsv"), encoding="utf-8-sig"
    ) as f:
        vocabulary = sorted({w for line in f for w in line.split("\t")[-1].split() if w.isalpha()})
    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "MRPC"), exist_ok=True)
    for name in ("train.tsv", "dev.tsv"):
        with open(os.path.join(folder, "MRPC", name), "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar=None)
            writer.writerow(["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"])
            for i in range(rows):
                writer.writerow(
                    [i % 2, i, i]
                    + [" ".join(rng.choices(vocabulary, k=words_per_sentence)) for _ in "ab"]
                )


def train_point(data_dir, model, length, batch, steps, bf16):
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable,
            "train_glue.py",
            "--task_name",
            "mrpc",
            "--data_dir",
            data_dir,
            "--output_dir",
            out,
            "--model_name_or_path",
            model,
            "--max_seq_length",
            str(length),
            "--per_device_train_batch_size",
            str(batch),
            "--max_steps",
            str(steps),
            "--max_eval_samples",
            "8",
            "--logging_steps",
            "1",
        ]
        rc, peak, _ = watch(command + (["--bf16"] if bf16 else []), dict(os.environ))
        if rc != 0:
            raise SystemExit(f"run failed: {' '.join(command)}")
        with open(os.path.join(out, "log.jsonl")) as f:
            steps_after_warmup = [json.loads(line) for line in f if '"loss"' in line][1:]
    seconds = sum(
        batch / r["samples_per_second"] for r in steps_after_warmup
    )  # one record per step
    return {
        "length": length,
        "batch": batch,
        "samples_per_second": batch * len(steps_after_warmup) / seconds,
        "tokens_per_second": sum(
            batch / r["samples_per_second"] * r["tokens_per_second"] for r in steps_after_warmup
        )
        / seconds,
        "peak_gib": peak / 2**30,
    }


def prep_point(sst2_train, rows, tokenizer):
    with tempfile.TemporaryDirectory() as folder:
        os.makedirs(os.path.join(folder, "SST-2"))
        with (
            open(sst2_train, encoding="utf-8") as f,
            open(os.path.join(folder, "SST-2", "train.tsv"), "w") as g,
        ):
            for _, line in zip(range(rows + 1), f, strict=False):
                g.write(line)
        start = time.perf_counter()
        split = data.load_split("sst2", "train", folder)
        read = time.perf_counter() - start
        data.tokenize(split, tokenizer, 128)
        return {
            "rows": len(split["text_a"]),
            "read_s": read,
            "tokenize_s": time.perf_counter() - start - read,
        }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="64,128,256,512")
    parser.add_argument("--batches", default="8,16,32,64")
    parser.add_argument("--length_sweep_batch", type=int, default=16)
    parser.add_argument("--batch_sweep_length", type=int, default=128)
    parser.add_argument(
        "--steps",
        type=int,
        default=5,
        help="optimizer steps per point; the first, warm-up, is not timed",
    )
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--plot", default=os.path.join(ROOT, "benchmarks", "scaling.png"))
    parser.add_argument("--json")
    args = parser.parse_args()
    model = default_model()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)

    results = {"length": [], "batch": [], "prep": []}
    with tempfile.TemporaryDirectory() as data_dir:
        synthetic_mrpc(
            data_dir,
            rows=max(map(int, args.batches.split(","))) * args.steps,
            words_per_sentence=400,
        )
        for length in map(int, args.lengths.split(",")):
            results["length"].append(
                train_point(data_dir, model, length, args.length_sweep_batch, args.steps, args.bf16)
            )
            print(results["length"][-1], flush=True)
        for batch in map(int, args.batches.split(",")):
            results["batch"].append(
                train_point(data_dir, model, args.batch_sweep_length, batch, args.steps, args.bf16)
            )
            print(results["batch"][-1], flush=True)
    sst2 = os.path.join(ROOT, "..", "shared", "glue", "SST-2", "train.tsv")
    for rows in (1000, 4000, 16000, 10**6):
        results["prep"].append(prep_point(sst2, rows, tokenizer))
        print(results["prep"][-1], flush=True)

    precision = "bf16" if args.bf16 else "fp32"
    print(
        f"\n{precision}, {args.steps} steps per point, the first not timed, {time.strftime('%Y-%m-%d')}"
    )
    print("max_seq_length  batch  tokens/s  samples/s  peak GiB")
    for r in results["length"] + results["batch"]:
        print(
            f"{r['length']:>14}  {r['batch']:>5}  {r['tokens_per_second']:>8.0f}  {r['samples_per_second']:>9.2f}  "
            f"{r['peak_gib']:>8.2f}"
        )
    print("rows    read s  tokenize s  rows/s")
    for r in results["prep"]:
        print(
            f"{r['rows']:<6}  {r['read_s']:>6.3f}  {r['tokenize_s']:>10.3f}  {r['rows'] / (r['read_s'] + r['tokenize_s']):>6.0f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, label in (
        (axes[0], "length", f"max_seq_length (batch {args.length_sweep_batch})"),
        (axes[1], "batch", f"batch size (length {args.batch_sweep_length})"),
    ):
        xs = [r[key] for r in results[key]]
        ax.plot(xs, [r["tokens_per_second"] for r in results[key]], "o-", label="tokens/s")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("tokens/s")
        twin = ax.twinx()
        twin.plot(
            xs, [r["peak_gib"] for r in results[key]], "s--", color="tab:red", label="peak GiB"
        )
        twin.set_ylabel("peak RSS GiB", color="tab:red")
    rows = [r["rows"] for r in results["prep"]]
    axes[2].plot(rows, [r["read_s"] for r in results["prep"]], "o-", label="read TSV")
    axes[2].plot(rows, [r["tokenize_s"] for r in results["prep"]], "s-", label="tokenize")
    axes[2].set_xscale("log")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("SST-2 training rows")
    axes[2].set_ylabel("seconds")
    axes[2].legend()
    figure.suptitle(
        f"train_glue.py scaling, MiniLM-L6, {precision}, {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}"
    )
    figure.tight_layout()
    figure.savefig(args.plot, dpi=100)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
