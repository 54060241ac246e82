"""benchmarks/glue_results.py's bookkeeping, without training: which runs it links instead of
running again, and what its summary table says."""

import os
import statistics
import sys

from conftest import GLUE, ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import glue_results  # noqa: E402
import recipes  # noqa: E402


def make_args(out_dir, *configs):
    argv = ["--tasks", "mrpc", "--configs", *configs, "--data_dir", GLUE, "--out_dir", str(out_dir)]
    return glue_results.parse_args(argv)


def write_finished_run(args, run, score, seconds, before_2026_11_29=False):
    """A run folder as glue_results.py leaves it after a successful run, with a made-up score:
    train_glue.py's scores in final/eval.json, or in results.json as its earlier runs have them."""
    os.makedirs(os.path.join(run["folder"], "final"))
    command = glue_results.build_command(args, run, resume=False)
    record = {"flags": run["flags"], "command": glue_results.shown_command(command)}
    glue_results.write_json(os.path.join(run["folder"], "run.json"), record)
    scores = {"accuracy": score, "f1": score / 2}
    if before_2026_11_29:
        results = {"final": scores, "train_samples_per_second": 50.0}
        glue_results.write_json(os.path.join(run["folder"], "results.json"), results)
    else:
        results = {"step": 345, "train_samples_per_second": 50.0, "eval": scores}
        glue_results.write_json(os.path.join(run["folder"], "final", "eval.json"), results)
    wall = {"seconds": seconds, "launch_seconds": [seconds], "finished": True}
    glue_results.write_json(os.path.join(run["folder"], "wall.json"), wall)


def test_a_search_candidate_equal_to_the_defaults_is_linked_to_their_run_not_run_again(
    tmp_path, monkeypatch
):
    args = make_args(tmp_path, "defaults")
    defaults = glue_results.plan_runs(args)
    write_finished_run(args, defaults[0], score=0.8, seconds=60)  # seed 42 only
    # The defaults' run was given 3 epochs as "3.0": still the same run.
    record = glue_results.read_json(os.path.join(defaults[0]["folder"], "run.json"))
    record["flags"]["num_train_epochs"] = 3.0
    record["command"] = record["command"].replace(
        "--num_train_epochs 3 ", "--num_train_epochs 3.0 "
    )
    assert "--num_train_epochs 3.0 " in record["command"]
    glue_results.write_json(os.path.join(defaults[0]["folder"], "run.json"), record)

    launched = []

    def fake_launch(run, command):
        launched.append(run["folder"])
        return 0, False

    monkeypatch.setattr(glue_results, "launch", fake_launch)
    args = make_args(tmp_path, "search")
    search = glue_results.plan_runs(args)
    same_as_defaults = [run for run in search if run["flags"] == defaults[0]["flags"]]
    assert len(same_as_defaults) == 1
    assert glue_results.run_all(args, same_as_defaults) == []

    folder = same_as_defaults[0]["folder"]
    assert launched == []
    assert os.path.islink(folder)
    assert os.path.realpath(folder) == os.path.realpath(defaults[0]["folder"])

    # Candidates with another learning rate are other runs: launched, not linked.
    others = [run for run in search if run["flags"] != defaults[0]["flags"]]
    assert others
    glue_results.run_all(args, others)
    assert launched == [run["folder"] for run in others]
    for run in others:
        assert not os.path.islink(run["folder"])


def test_the_summary_gives_each_configurations_mean_and_spread_and_what_the_recipe_changes(
    tmp_path, monkeypatch
):
    monkeypatch.setitem(recipes.RECIPES, "mrpc", dict(recipes.DEFAULTS, learning_rate=1e-4))
    args = make_args(tmp_path, "defaults", "recipe")
    scores = {"defaults": [0.70, 0.74, 0.75], "recipe": [0.80, 0.81, 0.85]}
    for run in glue_results.plan_runs(args):  # (a)'s runs as train_glue.py wrote them before
        index = recipes.SEEDS["mrpc"].index(run["seed"])
        score, seconds = scores[run["config"]][index], 60 * (index + 1)
        write_finished_run(args, run, score, seconds, before_2026_11_29=run["config"] == "defaults")

    path = glue_results.write_results(str(tmp_path), glue_results.collect(str(tmp_path)))
    with open(path) as f:
        lines = f.read().splitlines()

    # The summary's columns, as the README's table and docs/glue_results/results.md have them.
    header = "| task | metric | (a) defaults | (b) our recipe | HF Trainer at (a) | wall (a) | "
    assert header + "wall (b) | (b) changes |" in lines
    rows = [line for line in lines if line.startswith("| mrpc | accuracy |")]
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    for config, cell in zip(["defaults", "recipe"], cells[2:4], strict=True):
        values = scores[config]
        mean = statistics.fmean(values)
        spread = statistics.pstdev(values)
        assert cell == f"{mean:.4f} ± {spread:.4f} (3)"
    assert cells[4] == "not run"  # no HF runs in this folder
    assert cells[5] == cells[6] == "2.0"  # minutes: (1 + 2 + 3) / 3
    assert cells[7] == "learning_rate: 5e-05 -> 0.0001"


def fail_launch(run, command):
    raise AssertionError(f"launched, not linked: {run['folder']}")


def test_a_link_made_stale_by_a_new_recipe_is_replaced_not_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(glue_results, "launch", fail_launch)
    monkeypatch.setitem(recipes.RECIPES, "mrpc", dict(recipes.DEFAULTS))  # (b) = (a): linked
    args = make_args(tmp_path, "defaults")
    defaults = [run for run in glue_results.plan_runs(args) if run["seed"] == 42]
    write_finished_run(args, defaults[0], score=0.8, seconds=60)
    args = make_args(tmp_path, "recipe")
    placeholder = [run for run in glue_results.plan_runs(args) if run["seed"] == 42]
    glue_results.run_all(args, placeholder)
    assert os.path.islink(placeholder[0]["folder"])

    monkeypatch.setitem(recipes.RECIPES, "mrpc", dict(recipes.DEFAULTS, learning_rate=1e-4))
    tuned = [run for run in glue_results.plan_runs(args) if run["seed"] == 42]
    glue_results.check_folders(tuned)  # would exit if it refused the folder

    assert not os.path.lexists(tuned[0]["folder"])
    assert glue_results.read_results(defaults[0]["folder"])  # the run itself: untouched
