"""What --gradient_checkpointing saves and costs: activation memory (the bytes autograd keeps for
backward, counted exactly with saved-tensor hooks), peak RSS of a short real run, and the time of
a forward and backward, for MiniLM on MRPC at batch 32, with and without checkpointing.

    python benchmarks/checkpointing.py --model "$MODEL" --data_dir ../shared/glue

Rows: the first 32 training pairs padded as the trainer pads them (to the batch's longest), and
the same batch padded to --max_seq_length 512, where long inputs make activations dominate.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import psutil
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import train_glue  # noqa: E402


def saved_for_backward(model, batch):
    """Bytes of the tensors autograd keeps for backward in one forward: the activation memory.
    tests/test_training.py checks --gradient_checkpointing with it too."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}  # each storage once: views of one tensor share it; the weights are no activations

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(**batch).loss.backward()
    return sum(saved.values())


def seconds_of_a_step(model, batch):
    """Seconds of one forward and backward."""
    started = time.perf_counter()
    model(**batch).loss.backward()
    return time.perf_counter() - started


def peak_rss(command):
    """Peak RSS in GB of a process, sampled every 0.1 s."""
    process, peak = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL), 0
    while process.poll() is None:
        peak = max(peak, psutil.Process(process.pid).memory_info().rss)
        time.sleep(0.1)
    assert process.returncode == 0, command
    return peak / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data_dir", default=os.path.join(os.path.dirname(ROOT), "shared", "glue"))
    options = parser.parse_args()
    torch.manual_seed(0)
    task = data.glue_task("mrpc", options.data_dir)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        "| batch | gradient checkpointing | saved for backward | forward + backward | peak RSS, 4 steps |"
    )
    print("|---|---|---|---|---|")
    for length in (128, 512):
        for checkpointing in (False, True):
            flags = ["--task_name", "mrpc", "--data_dir", options.data_dir, "--model_name_or_path",
                     options.model, "--max_seq_length", str(length)] + ["--gradient_checkpointing"] * checkpointing  # fmt: skip
            args = train_glue.parse_args([*flags, "--output_dir", "unused"])
            tokenizer, model = train_glue.load_model(args, task)
            rows = data.read_split(task, "train").select(range(32))
            rows = data.tokenize(rows, task, "train", tokenizer, length)[:]
            rows = {k: v for k, v in rows.items() if k != "index"}
            padding = "longest" if length == 128 else "max_length"
            batch = dict(
                tokenizer.pad(rows, padding=padding, max_length=length, return_tensors="pt")
            )
            saved = saved_for_backward(model.train(), batch)
            seconds = seconds_of_a_step(model, batch)
            with tempfile.TemporaryDirectory() as out:
                command = [sys.executable, "train_glue.py", *flags, "--output_dir", out,
                           "--max_train_samples", "128", "--max_steps", "4", "--max_eval_samples", "32"]  # fmt: skip
                rss = peak_rss(command)
            shape = "x".join(map(str, batch["input_ids"].shape))
            print(
                f"| {shape} | {'on' if checkpointing else 'off'} | {saved / 2**20:.0f} MiB | {seconds:.2f} s | {rss:.2f} GB |",
                flush=True,
            )


if __name__ == "__main__":
    main()
