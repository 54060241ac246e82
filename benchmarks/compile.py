"""What --torch_compile costs and gains: the first step's time (compilation included) and the
steady samples/s after it, for MiniLM on MRPC at batch 32, with and without compiling, run one
after the other in one invocation on the same machine.

    python benchmarks/compile.py --model "$MODEL" --data_dir ../shared/glue

Each is a real `train_glue.py` run of --steps steps logged at every step; the steady rate is the
mean of steps 11 and on, after the first shapes' compilations (a batch's length varies, so a few
steps compile again: those times are in the printed per-step list).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_run(model, data_dir, steps, compile_it):
    """(step seconds, the run's wall seconds, the logged losses) of a short MRPC run."""
    with tempfile.TemporaryDirectory() as output_dir:
        command = [sys.executable, "train_glue.py", "--task_name", "mrpc", "--data_dir", data_dir,
                   "--model_name_or_path", model, "--output_dir", output_dir, "--max_steps", steps,
                   "--logging_steps", 1, "--max_eval_samples", 64, "--seed", 42]  # fmt: skip
        command += ["--torch_compile"] if compile_it else []
        started = time.perf_counter()
        command = [str(part) for part in command]  # train_glue's error: line shows on stderr
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        with open(os.path.join(output_dir, "log.jsonl")) as f:
            records = [json.loads(line) for line in f]
    step_seconds = [32 / r["samples_per_second"] for r in records if "loss" in r]
    return step_seconds, wall, [r["loss"] for r in records if "loss" in r]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data_dir", default=os.path.join(os.path.dirname(ROOT), "shared", "glue"))
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    args.data_dir, args.model = os.path.abspath(args.data_dir), os.path.abspath(args.model)
    for compile_it in (False, True):
        seconds, wall, losses = one_run(args.model, args.data_dir, args.steps, compile_it)
        steady = 32 * len(seconds[10:]) / sum(seconds[10:])
        print(f"{'--torch_compile' if compile_it else 'eager          '}: first step "
              f"{seconds[0]:.1f} s, steady {steady:.1f} samples/s (steps 11-{len(seconds)}), "
              f"whole run {wall:.0f} s, loss at step {len(losses)} {losses[-1]:.4f}")  # fmt: skip
        print("  step seconds:", " ".join(f"{s:.2f}" for s in seconds), flush=True)


if __name__ == "__main__":
    main()
