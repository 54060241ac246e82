"""GLUE dev results of train_glue.py: (a) HF defaults and (b) our per-task recipe, over several seeds.
Writes a Markdown table (results.md) and one PNG of training curves per task.

    python benchmarks/glue_results.py                                  # everything: hours on a CPU
    python benchmarks/glue_results.py --tasks rte --configs search     # the recipe search of one task
    python benchmarks/glue_results.py --dry_run                        # only print the commands
    python benchmarks/glue_results.py --tasks wnli --configs defaults --nproc_per_node 0 \\
        --max_train_samples 64 --max_eval_samples 32 --epochs 1 --out_dir /tmp/glue_smoke

The configurations live in benchmarks/recipes.py. Each run is the README's command, started as a
subprocess from the repository root, with its own folder {out_dir}/{task}/{config}/seed-{seed}/.

Rerun the same command after an interruption: finished runs (their folder has results.json) are
skipped, and an unfinished one continues from its last checkpoint (--resume_from_checkpoint auto).
Ctrl-C stops the current run after it writes a checkpoint.

Beside train_glue.py's own outputs, each run folder gets run.json (the flags and command, written
before the first launch) and wall.json (the wall time this script measured around the subprocess).
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import recipes  # noqa: E402

import data  # noqa: E402  (the task table: which metric comes first)

CONFIG_CHOICES = ["defaults", "recipe", "search"]

# The exit statuses of train_glue.py stopped by Ctrl-C (130) or SIGTERM (143), after it wrote a
# checkpoint: the user wants to stop, so this script stops too.
STOPPED_STATUSES = (130, 143)


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--tasks", default=",".join(recipes.TASKS), help="comma list (default: all six)")
    add("--configs", default="defaults,recipe", help="comma list of defaults, recipe, search")
    add("--data_dir", default=os.path.join(ROOT, "..", "shared", "glue"))
    add("--out_dir", default=os.path.join(ROOT, "runs", "glue_results"))
    add(
        "--nproc_per_node",
        type=int,
        default=2,
        help="processes per run under torch.distributed.run; 0: plain `python train_glue.py`",
    )
    add("--max_train_samples", type=int, help="passed to train_glue.py (smoke tests)")
    add("--max_eval_samples", type=int, help="passed to train_glue.py (smoke tests)")
    add("--epochs", type=float, help="replaces every configuration's epochs (smoke tests)")
    add("--logging_steps", type=int, default=10, help="passed to train_glue.py: curve resolution")
    add("--dry_run", action="store_true", help="print the commands, run nothing, write nothing")
    args = parser.parse_args()

    args.tasks = split_list(args.tasks)
    args.configs = split_list(args.configs)
    for task in args.tasks:
        if task not in recipes.TASKS:
            parser.error(f"unknown task '{task}': use some of {', '.join(recipes.TASKS)}")
    for config in args.configs:
        if config not in CONFIG_CHOICES:
            parser.error(f"unknown config '{config}': use some of {', '.join(CONFIG_CHOICES)}")
    if args.nproc_per_node < 0:
        parser.error("--nproc_per_node must be 0 (one plain process) or more")
    # Absolute paths, so that the runs (started from the repository root) and this script agree
    # on them wherever this script was started from.
    args.data_dir = os.path.abspath(args.data_dir)
    args.out_dir = os.path.abspath(args.out_dir)
    if not os.path.isdir(args.data_dir):
        parser.error(f"--data_dir {args.data_dir} is not a folder")
    return args


def split_list(text):
    items = []
    for item in text.split(","):
        item = item.strip().lower()
        if item:
            items.append(item)
    return items


# =================================================================================================
# Planning: which runs, with which flags, in which folders
# =================================================================================================


def plan_runs(args):
    """Every (task, config, seed) to run, in order, each with its full set of flags."""
    runs = []
    for task in args.tasks:
        for config in args.configs:
            if config == "defaults":
                named_configs = [("defaults", recipes.DEFAULTS)]
                seeds = recipes.SEEDS[task]
            elif config == "recipe":
                named_configs = [("recipe", recipes.RECIPES[task])]
                seeds = recipes.SEEDS[task]
            else:
                # The search compares candidates, so one seed each keeps it within budget.
                named_configs = []
                for flags in recipes.SEARCH[task]:
                    named_configs.append((search_name(flags), flags))
                seeds = recipes.SEEDS[task][:1]
            for name, flags in named_configs:
                for seed in seeds:
                    runs.append(make_run(args, task=task, config=name, seed=seed, flags=flags))
    return runs


def search_name(flags):
    """A folder-friendly name for a search candidate, e.g. search-lr0.0001-ep5-bs16."""
    learning_rate = flags["learning_rate"]
    epochs = flags["num_train_epochs"]
    batch = flags["per_device_train_batch_size"]
    return f"search-lr{learning_rate:g}-ep{epochs:g}-bs{batch}"


def make_run(args, task, config, seed, flags):
    """One run: the configuration's flags plus this seed and the command-line overrides."""
    flags = dict(flags)  # a copy: the dicts in recipes.py stay as written
    flags["seed"] = seed
    if args.epochs is not None:
        flags["num_train_epochs"] = args.epochs
    if args.max_train_samples is not None:
        flags["max_train_samples"] = args.max_train_samples
    if args.max_eval_samples is not None:
        flags["max_eval_samples"] = args.max_eval_samples
    flags["logging_steps"] = args.logging_steps
    folder = os.path.join(args.out_dir, task, config, f"seed-{seed}")
    return {"task": task, "config": config, "seed": seed, "flags": flags, "folder": folder}


def build_command(args, run, resume):
    """The README's command for this run, as a list of arguments."""
    if args.nproc_per_node == 0:
        launcher = [sys.executable]
    else:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc_per_node}",
        ]
    command = launcher + [
        "train_glue.py",
        "--task_name",
        run["task"],
        "--data_dir",
        shown_path(args.data_dir),
        "--output_dir",
        shown_path(run["folder"]),
    ]
    flags = dict(run["flags"])
    # recipes.py gives the global batch; each of N processes takes 1/N of it, so the optimizer
    # sees the same batch (and the same data order) whatever the number of processes.
    flags["per_device_train_batch_size"] = per_process_batch(
        flags["per_device_train_batch_size"], args.nproc_per_node
    )
    command += flags_to_arguments(flags)
    if resume:
        command += ["--resume_from_checkpoint", "auto"]
    return command


def per_process_batch(global_batch, nproc_per_node):
    if nproc_per_node <= 1:
        return global_batch
    if global_batch % nproc_per_node != 0:
        raise SystemExit(
            f"error: a batch of {global_batch} does not split evenly over "
            f"{nproc_per_node} processes: change --nproc_per_node"
        )
    return global_batch // nproc_per_node


def flags_to_arguments(flags):
    """{"learning_rate": 5e-5, "bf16": True} -> ["--learning_rate", "5e-05", "--bf16"]."""
    arguments = []
    for name, value in flags.items():
        if value is True:
            arguments.append(f"--{name}")  # a switch (store_true in train_glue.py)
        elif value is False:
            continue  # a switch left off: train_glue.py's default
        else:
            arguments += [f"--{name}", str(value)]
    return arguments


def shown_path(path):
    """The path relative to the repository root (the runs' working folder) when that is short, so
    that commands read like the README's; otherwise absolute."""
    relative = os.path.relpath(path, ROOT)
    if relative.startswith(os.path.join("..", "..")):
        return path
    return relative


def shown_command(command):
    """The command as one shell line, with `python` for this interpreter's full path."""
    words = list(command)
    if words[0] == sys.executable:
        words[0] = "python"
    return shlex.join(words)


# =================================================================================================
# Run folders: finished, interrupted or new
# =================================================================================================


def read_json(path):
    """The JSON in `path`, or None if there is no such file."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path, value):
    """Write to a temporary name and rename: a kill mid-write leaves the old file or the new one,
    never half of one that the next resume would choke on."""
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(temporary, path)


def run_state(run):
    """'finished' (results.json is there), 'interrupted' (launched before, never finished) or 'new'."""
    if os.path.isfile(os.path.join(run["folder"], "results.json")):
        return "finished"
    if os.path.isfile(os.path.join(run["folder"], "run.json")):
        return "interrupted"
    return "new"


def check_folders(runs):
    """Refuse to reuse a folder that holds a run with other flags (for instance a recipe changed
    since): skipping or resuming it would report the old flags under the new name."""
    problems = []
    for run in runs:
        recorded = read_json(os.path.join(run["folder"], "run.json"))
        if recorded is not None and recorded["flags"] != run["flags"]:
            changes = flag_changes(recorded["flags"], run["flags"])
            problems.append(
                f"{run['folder']} holds a run with other flags ({changes}): delete that "
                "folder or choose another --out_dir"
            )
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        sys.exit(1)


def flag_changes(before, now):
    """'name: old -> new' for each flag that differs, e.g. 'num_train_epochs: 3 -> 5'."""
    changes = []
    for name in sorted(set(before) | set(now)):
        old_value = before.get(name, "not given")
        new_value = now.get(name, "not given")
        if old_value != new_value:
            changes.append(f"{name}: {old_value} -> {new_value}")
    return ", ".join(changes)


# =================================================================================================
# Running
# =================================================================================================


def format_duration(seconds):
    """3725.2 -> '1:02:05' (hours:minutes:seconds; hours may pass 24 in a full run)."""
    hours, rest = divmod(int(seconds), 3600)
    minutes, whole_seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{whole_seconds:02d}"


def run_all(args, runs):
    """Run (or skip) every planned run in order. Returns the runs that failed; exits if stopped."""
    start = time.perf_counter()
    failed = []
    for number, run in enumerate(runs, start=1):
        name = f"[{number}/{len(runs)}] {run['task']} {run['config']} seed {run['seed']}"
        elapsed = format_duration(time.perf_counter() - start)
        state = run_state(run)
        if state == "finished":
            print(f"{name}: skipped, {run['folder']} already has results.json", flush=True)
            continue
        command = build_command(args, run, resume=state == "interrupted")
        if args.dry_run:
            print(f"{name}:\n    {shown_command(command)}", flush=True)
            continue
        how = "resuming from its last checkpoint" if state == "interrupted" else "starting"
        print(f"\n{name}: {how} (elapsed {elapsed})\n    {shown_command(command)}", flush=True)
        status, stopped = launch(run, command)
        if stopped or status in STOPPED_STATUSES:
            print(
                f"{name}: stopped (exit status {status}). Rerun the same command to continue "
                "from its checkpoint.",
                file=sys.stderr,
            )
            sys.exit(130)
        if status != 0:
            print(
                f"{name}: FAILED (exit status {status}, its error is above); rerunning this "
                "script retries it",
                file=sys.stderr,
                flush=True,
            )
            failed.append(name)
            continue
        wall = read_json(os.path.join(run["folder"], "wall.json"))
        minutes = wall["seconds"] / 60
        elapsed = format_duration(time.perf_counter() - start)
        print(f"{name}: done in {minutes:.1f} min (elapsed {elapsed})", flush=True)
    return failed


def launch(run, command):
    """Run one training subprocess and record its wall time. Returns (exit status, whether this
    script was interrupted)."""
    os.makedirs(run["folder"], exist_ok=True)
    record_path = os.path.join(run["folder"], "run.json")
    if not os.path.isfile(record_path):  # the first launch: what this folder is for
        record = {
            "task": run["task"],
            "config": run["config"],
            "seed": run["seed"],
            "flags": run["flags"],
            "command": shown_command(command),
        }
        write_json(record_path, record)
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT)
    status, interrupted = wait_for(process)
    seconds = time.perf_counter() - start
    save_wall_time(run["folder"], seconds=seconds, finished=status == 0)
    return status, interrupted


def wait_for(process):
    """Wait until the subprocess exits, also through Ctrl-C. Returns (exit status, interrupted)."""
    interrupted = False
    while True:
        try:
            return process.wait(), interrupted
        except KeyboardInterrupt:
            # Ctrl-C reaches every process in the terminal's foreground group, so the run got it
            # too and is finishing its step and writing a checkpoint: wait for that instead of
            # killing it halfway. A second Ctrl-C makes it exit at once (the last checkpoint
            # stays intact).
            interrupted = True
            print("\nstopping: waiting for the run to write its checkpoint", file=sys.stderr)


def save_wall_time(folder, seconds, finished):
    """wall.json: the wall time of every launch of this run that this script saw, summed.
    A resumed run adds its launches; a launch this script could not time (a kill -9 of the
    script itself) is missing from the sum."""
    path = os.path.join(folder, "wall.json")
    wall = read_json(path)
    if wall is None:
        wall = {"seconds": 0.0, "launch_seconds": []}
    wall["launch_seconds"].append(seconds)
    wall["seconds"] = sum(wall["launch_seconds"])
    wall["finished"] = finished
    write_json(path, wall)


# =================================================================================================
# Collecting: every finished run under out_dir
# =================================================================================================


def collect(out_dir):
    """{(task, config): [run, ...]} for every run folder with a results.json, seeds in order."""
    groups = {}
    for task in sorted_names(out_dir, first=recipes.TASKS):
        task_dir = os.path.join(out_dir, task)
        for config in sorted_names(task_dir, first=["defaults", "recipe"]):
            config_dir = os.path.join(task_dir, config)
            runs = []
            for seed_name in os.listdir(config_dir):
                if not seed_name.startswith("seed-"):
                    continue
                folder = os.path.join(config_dir, seed_name)
                results = read_json(os.path.join(folder, "results.json"))
                if results is None:  # not finished (yet)
                    continue
                run = {
                    "task": task,
                    "config": config,
                    "seed": int(seed_name.removeprefix("seed-")),
                    "folder": folder,
                    "results": results,
                    "wall": read_json(os.path.join(folder, "wall.json")),
                    "record": read_json(os.path.join(folder, "run.json")),
                }
                runs.append(run)
            if runs:
                runs.sort(key=lambda run: run["seed"])
                groups[(task, config)] = runs
    return groups


def sorted_names(folder, first):
    """The sub-folders of `folder`: those named in `first` in that order, then the rest sorted."""
    if not os.path.isdir(folder):
        return []
    names = []
    for name in os.listdir(folder):
        if os.path.isdir(os.path.join(folder, name)):
            names.append(name)
    ordered = []
    for name in first:
        if name in names:
            ordered.append(name)
    for name in sorted(names):
        if name not in ordered:
            ordered.append(name)
    return ordered


# =================================================================================================
# results.md
# =================================================================================================


def format_score(values):
    """mean ± population std over the seeds, 4 digits; a single seed shows its score alone."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {statistics.pstdev(values):.4f}"


def table_row(runs):
    first = runs[0]
    metric_names = list(first["results"]["final"])  # the task's main metric first
    scores = []
    for metric in metric_names:
        values = []
        for run in runs:
            values.append(run["results"]["final"][metric])
        scores.append(format_score(values))
    wall_minutes = []
    for run in runs:
        if run["wall"] is not None:
            wall_minutes.append(run["wall"]["seconds"] / 60)
    if wall_minutes:
        wall = f"{statistics.fmean(wall_minutes):.1f}"
    else:
        wall = "n/a"
    samples_per_second = []
    for run in runs:
        samples_per_second.append(run["results"]["train_samples_per_second"])
    seeds = []
    for run in runs:
        seeds.append(str(run["seed"]))
    if first["record"] is not None:
        command = f"`{first['record']['command']}`"
    else:
        command = "n/a"  # a folder this script did not launch
    cells = [
        first["task"],
        first["config"],
        " / ".join(metric_names),
        " / ".join(scores),
        ", ".join(seeds),
        wall,
        f"{statistics.fmean(samples_per_second):.1f}",
        command,
    ]
    return "| " + " | ".join(cells) + " |"


def placeholder_note():
    """A line naming the tasks whose recipe is still DEFAULTS, so that nobody reads (b) as tuned."""
    untouched = []
    for task in recipes.TASKS:
        if recipes.RECIPES[task] == recipes.DEFAULTS:
            untouched.append(task)
    if not untouched:
        return None
    return (
        f"**Note:** the recipe of {', '.join(untouched)} is still the placeholder copy of the "
        "defaults in benchmarks/recipes.py: its `recipe` rows are not tuned."
    )


def write_results(out_dir, groups):
    import torch  # only for its version; imported here so that --dry_run stays quick

    lines = [
        "# GLUE dev results",
        "",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}; written by "
        "`benchmarks/glue_results.py`.",
        "",
        "Dev score: the final model's (results.json `final`), mean ± population std over the "
        "seeds listed (one seed: its score alone). Wall: minutes per run measured around the "
        "subprocess, every launch of a resumed run added up. Train samples/s: train_glue.py's, "
        "training time only (the last launch of a resumed run). Command: the first seed's, run "
        "from the repository root (a resumed launch adds `--resume_from_checkpoint auto`).",
        "",
    ]
    note = placeholder_note()
    if note is not None:
        lines += [note, ""]
    lines += [
        "| task | config | metric(s) | dev score | seeds | wall (min) | train samples/s | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for runs in groups.values():
        lines.append(table_row(runs))
    path = os.path.join(out_dir, "results.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


# =================================================================================================
# Training curves
# =================================================================================================


def read_log(folder):
    """(training records, evaluation records) of a run's log.jsonl; none if it has no log."""
    training = []
    evaluations = []
    path = os.path.join(folder, "log.jsonl")
    if not os.path.isfile(path):
        return training, evaluations
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            if "loss" in record:
                training.append(record)
            elif "eval" in record:
                evaluations.append(record)
    return training, evaluations


def plot_curves(out_dir, task, groups):
    """curves-{task}.png: training loss (left) and the main dev metric (right) against the step,
    one line per (config, seed); a config keeps one colour, its seeds differ in line style."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    metric = data.metric_names(task)[0]
    figure, (loss_axes, metric_axes) = plt.subplots(1, 2, figsize=(13, 4.5))
    line_styles = ["-", "--", ":", "-."]
    config_number = 0
    for (group_task, config), runs in groups.items():
        if group_task != task:
            continue
        colour = f"C{config_number % 10}"
        config_number += 1
        for seed_number, run in enumerate(runs):
            training, evaluations = read_log(run["folder"])
            label = f"{config} seed {run['seed']}"
            style = line_styles[seed_number % len(line_styles)]
            loss_axes.plot(
                [record["step"] for record in training],
                [record["loss"] for record in training],
                color=colour,
                linestyle=style,
                marker=".",  # so that a short run's one or two log points still show
                markersize=3,
                label=label,
            )
            # Evaluations are few (one an epoch by default): markers show each of them.
            metric_axes.plot(
                [record["step"] for record in evaluations],
                [record["eval"][metric] for record in evaluations],
                color=colour,
                linestyle=style,
                marker="o",
                label=label,
            )
    loss_axes.set_xlabel("optimizer step")
    loss_axes.set_ylabel("training loss")
    loss_axes.set_title(f"{task}: training loss")
    metric_axes.set_xlabel("optimizer step")
    metric_axes.set_ylabel(f"dev {metric}")
    metric_axes.set_title(f"{task}: dev {metric}")
    metric_axes.legend(fontsize="small")
    figure.tight_layout()
    path = os.path.join(out_dir, f"curves-{task}.png")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# =================================================================================================
# Main
# =================================================================================================


def main():
    args = parse_args()
    runs = plan_runs(args)
    check_folders(runs)
    for run in runs:  # refuse an uneven batch split now, not hours into the runs
        per_process_batch(run["flags"]["per_device_train_batch_size"], args.nproc_per_node)
    print(f"{len(runs)} runs into {args.out_dir}", flush=True)
    failed = run_all(args, runs)
    if args.dry_run:
        return

    groups = collect(args.out_dir)
    if groups:
        print(f"\nwrote {write_results(args.out_dir, groups)}")
        tasks = []
        for task, _ in groups:
            if task not in tasks:
                tasks.append(task)
        for task in tasks:
            print(f"wrote {plot_curves(args.out_dir, task, groups)}")
    if failed:
        print(f"\n{len(failed)} runs failed:", file=sys.stderr)
        for name in failed:
            print(f"    {name}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
