"""GLUE dev results of train_glue.py: (a) HF defaults and (b) our per-task recipe, over several
seeds, beside HF Trainer at (a). Writes a Markdown table (results.md) and one PNG of training curves
per task.

    python benchmarks/glue_results.py --report_dir docs/glue_results  # the README's table: hours
    python benchmarks/glue_results.py --tasks rte --configs search     # the recipe search of one task
    python benchmarks/glue_results.py --dry_run                        # only print the commands
    python benchmarks/glue_results.py --tasks wnli --configs defaults \\
        --max_train_samples 64 --max_eval_samples 32 --epochs 1 --out_dir /tmp/glue_smoke

The configurations live in benchmarks/recipes.py. Each run is the README's command (one plain
process by default, the faster launch on a CPU; --nproc_per_node 2 for torchrun's), started as a
subprocess from the repository root, with its own folder {out_dir}/{task}/{config}/seed-{seed}/.
HF runs are benchmarks/compare_hf.py's HF Trainer, written in the same shapes.

Rerun the same command after an interruption: finished runs (their folder has results.json) are
skipped, and an unfinished one continues from its last checkpoint (--resume_from_checkpoint auto).
A run whose command matches a finished run's but for its folder is linked to it, not run again.
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

CONFIG_CHOICES = ["defaults", "recipe", "search", "hf"]

# The exit statuses of train_glue.py stopped by Ctrl-C (130) or SIGTERM (143), after it wrote a
# checkpoint: the user wants to stop, so this script stops too.
STOPPED_STATUSES = (130, 143)


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--tasks", default=",".join(recipes.TASKS), help="comma list (default: all six)")
    add(
        "--configs",
        default="defaults,search,recipe,hf",
        help="comma list of defaults, search, recipe, hf (default: all, in that order)",
    )
    add("--data_dir", default=os.path.join(ROOT, "..", "shared", "glue"))
    add("--out_dir", default=os.path.join(ROOT, "runs", "glue_results"), help="the run folders")
    add("--report_dir", help="where results.md and the curves go (default: --out_dir)")
    add(
        "--nproc_per_node",
        type=int,
        default=0,
        help="0 (default): plain `python train_glue.py`, one process with all cores, the faster "
        "launch on a CPU; N: N processes under torch.distributed.run",
    )
    add("--seeds", help="comma list: only these of each configuration's seeds")
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
    args.report_dir = os.path.abspath(args.report_dir or args.out_dir)
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
            elif config == "hf":
                if task not in recipes.HF_TASKS:
                    continue
                named_configs = [("hf", recipes.DEFAULTS)]
                seeds = recipes.HF_SEEDS
            else:
                # The search compares candidates, so one seed each keeps it within budget.
                named_configs = []
                for flags in recipes.SEARCH[task]:
                    named_configs.append((search_name(flags), flags))
                seeds = recipes.SEEDS[task][:1]
            if args.seeds is not None:
                seeds = [seed for seed in seeds if str(seed) in split_list(args.seeds)]
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
    """The README's command for this run (or compare_hf.py's for an HF run), as a list of arguments."""
    if run["config"] == "hf":
        return build_hf_command(args, run)
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


def build_hf_command(args, run):
    """One HF Trainer run at configuration (a), by benchmarks/compare_hf.py. Its worker has (a)'s
    batch (32), learning rate (5e-5) and weight decay (0.01) written in; the rest is passed. An
    interrupted HF run starts again from the beginning: it saves no checkpoints."""
    flags = run["flags"]
    command = [
        sys.executable,
        os.path.join("benchmarks", "compare_hf.py"),
        "--task",
        run["task"],
        "--data_dir",
        shown_path(args.data_dir),
        "--hf_run_dir",
        shown_path(run["folder"]),
        "--seed",
        str(run["seed"]),
        "--epochs",
        str(flags["num_train_epochs"]),
        "--warmup_ratio",
        str(flags["warmup_ratio"]),
        "--precisions",
        "bf16" if flags.get("bf16") else "fp32",
        "--logging_steps",
        str(flags["logging_steps"]),
    ]
    if args.max_train_samples is not None:
        command += ["--max_train_samples", str(args.max_train_samples)]
    if args.max_eval_samples is not None:
        command += ["--max_eval_samples", str(args.max_eval_samples)]
    return command


def check_hf_defaults():
    """compare_hf.py's worker has (a)'s batch, learning rate and weight decay written in and takes
    the four flags in `passed`; refuse to label its runs (a) if DEFAULTS holds anything else."""
    fixed = {"per_device_train_batch_size": 32, "learning_rate": 5e-5, "weight_decay": 0.01}
    passed = {"num_train_epochs", "warmup_ratio", "bf16", "seed"}
    for name, value in recipes.DEFAULTS.items():
        if name not in passed and fixed.get(name, "not handled") != value:
            raise SystemExit(
                f"error: DEFAULTS[{name!r}] is {value}, which compare_hf.py's HF worker does not "
                "use: change the worker too, or leave out --configs hf"
            )


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


def same_run_key(command, flags):
    """What makes two runs the same run: the same program launched the same way on the same task
    and data, with equal flags (3 and 3.0 epochs are equal; a switch left off is no flag). Only
    the folder they write to may differ."""
    words = shlex.split(command)
    launcher = []
    for word in words:
        launcher.append(word)
        if word.endswith(".py"):  # train_glue.py or compare_hf.py: the launch ends here
            break
    task = words[words.index("--task_name" if "--task_name" in words else "--task") + 1]
    data_dir = words[words.index("--data_dir") + 1]
    normalized = {}
    for name, value in flags.items():
        if value is False:
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = float(value)
        normalized[name] = value
    return launcher, task, data_dir, normalized


def find_finished_twin(args, run, command):
    """A finished run folder under out_dir whose command is this run's but for its folder: the
    search's copy of DEFAULTS is the defaults' run, the recipe's seed 42 a search candidate's."""
    wanted = same_run_key(shown_command(command), run["flags"])
    for task_config in sorted(os.listdir(os.path.join(args.out_dir, run["task"]))):
        seed_folder = os.path.join(args.out_dir, run["task"], task_config, f"seed-{run['seed']}")
        if os.path.realpath(seed_folder) == os.path.realpath(run["folder"]):
            continue
        if os.path.islink(seed_folder) or run_state({"folder": seed_folder}) != "finished":
            continue
        record = read_json(os.path.join(seed_folder, "run.json"))
        if record is not None and same_run_key(record["command"], record["flags"]) == wanted:
            return seed_folder
    return None


def check_folders(runs):
    """Refuse to reuse a folder that holds a run with other flags (for instance a recipe changed
    since): skipping or resuming it would report the old flags under the new name."""
    problems = []
    for run in runs:
        if os.path.islink(run["folder"]):
            recorded = read_json(os.path.join(run["folder"], "run.json"))
            if recorded is None or recorded["flags"] != run["flags"]:
                # A link to a run that is gone, or that is no longer this run (a recipe chosen
                # since): the link holds no data of its own, so it goes and the run is planned
                # afresh.
                os.unlink(run["folder"])
            continue
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
        twin = None
        if state == "new" and os.path.isdir(os.path.join(args.out_dir, run["task"])):
            twin = find_finished_twin(args, run, command)
        if twin is not None:
            if not args.dry_run:
                if os.path.isdir(run["folder"]):
                    os.rmdir(run["folder"])  # "new" yet there: empty, made just before a kill
                # A link, not a copy: the table counts the run under both names, honestly
                # the same run, and a rerun of this script finds it finished.
                os.makedirs(os.path.dirname(run["folder"]), exist_ok=True)
                os.symlink(os.path.relpath(twin, os.path.dirname(run["folder"])), run["folder"])
            print(f"{name}: the same run as {twin}: linked, not run again", flush=True)
            continue
        if args.dry_run:
            print(f"{name}:\n    {shown_command(command)}", flush=True)
            continue
        how = "resuming from its last checkpoint" if state == "interrupted" else "starting"
        print(f"\n{name}: {how} (elapsed {elapsed})\n    {shown_command(command)}", flush=True)
        status, stopped = launch(run, command)
        if stopped or status in STOPPED_STATUSES:
            print(
                f"{name}: stopped (exit status {status}). Rerun the same command to continue "
                "(a train_glue.py run from its checkpoint, an HF run from the beginning).",
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
    # An HF run saves no checkpoints and starts again from the beginning: only its last launch
    # counts.
    save_wall_time(
        run["folder"], seconds=seconds, finished=status == 0, restart=run["config"] == "hf"
    )
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


def save_wall_time(folder, seconds, finished, restart=False):
    """wall.json: the wall time of every launch of this run that this script saw, summed.
    A resumed run adds its launches; a launch this script could not time (a kill -9 of the
    script itself) is missing from the sum."""
    path = os.path.join(folder, "wall.json")
    wall = read_json(path)
    if wall is None or restart:
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
        if task not in recipes.TASKS:
            continue  # not a run folder of this script
        task_dir = os.path.join(out_dir, task)
        for config in sorted_names(task_dir, first=["defaults", "recipe"]):
            config_dir = os.path.join(task_dir, config)
            runs = []
            for seed_name in os.listdir(config_dir):
                if not seed_name.startswith("seed-"):
                    continue
                if not seed_name.removeprefix("seed-").isdigit():
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


def main_score(runs):
    """'0.7843 ± 0.0061 (3)': the main metric over the seeds, and how many seeds."""
    values = []
    for run in runs:
        values.append(next(iter(run["results"]["final"].values())))
    return f"{format_score(values)} ({len(values)})"


def mean_wall_minutes(runs):
    minutes = []
    for run in runs:
        if run["wall"] is not None:
            minutes.append(run["wall"]["seconds"] / 60)
    if not minutes:
        return "n/a"
    return f"{statistics.fmean(minutes):.1f}"


def summary_lines(groups):
    """One row per task: the main metric under (a), (b) and HF at (a), the wall time of (a) and (b),
    and what (b) changes. Rows only for tasks with a finished (a)."""
    lines = [
        "## Summary",
        "",
        "Main dev metric, mean ± std (number of seeds); wall: minutes per run.",
        "",
        "| task | metric | (a) defaults | (b) our recipe | HF Trainer at (a) | wall (a) | "
        "wall (b) | (b) changes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in recipes.TASKS:
        defaults = groups.get((task, "defaults"))
        if defaults is None:
            continue
        recipe = groups.get((task, "recipe"))
        hf = groups.get((task, "hf"))
        cells = [task, next(iter(defaults[0]["results"]["final"])), main_score(defaults)]
        cells.append(main_score(recipe) if recipe else "not run")
        cells.append(main_score(hf) if hf else "not run")
        cells.append(mean_wall_minutes(defaults))
        cells.append(mean_wall_minutes(recipe) if recipe else "")
        if recipe and defaults[0]["record"] and recipe[0]["record"]:
            changes = flag_changes(defaults[0]["record"]["flags"], recipe[0]["record"]["flags"])
            cells.append(changes or "none: the defaults won the search")
        else:
            cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


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
        "training time only (the last launch of a resumed run; for HF runs, Trainer's "
        "train_runtime less its evaluations). Command: the first seed's, run from the repository "
        "root (a resumed launch adds `--resume_from_checkpoint auto`). HF runs: HF Trainer at (a) "
        "with DataCollatorWithPadding, batches in random order (its default); ours group batches "
        "by length (train_glue.py's default), which is faster and changes the batches, not the "
        "examples seen.",
        "",
    ]
    lines += summary_lines(groups)
    lines += [
        "## Every configuration run",
        "",
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
    if "hf" in args.configs:
        check_hf_defaults()
    print(f"{len(runs)} runs into {args.out_dir}", flush=True)
    failed = run_all(args, runs)
    if args.dry_run:
        return

    groups = collect(args.out_dir)
    if groups:
        os.makedirs(args.report_dir, exist_ok=True)
        print(f"\nwrote {write_results(args.report_dir, groups)}")
        tasks = []
        for task, _ in groups:
            if task not in tasks:
                tasks.append(task)
        for task in tasks:
            print(f"wrote {plot_curves(args.report_dir, task, groups)}")
    if failed:
        print(f"\n{len(failed)} runs failed:", file=sys.stderr)
        for name in failed:
            print(f"    {name}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
