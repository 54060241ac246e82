"""The GLUE results page (docs/glue_results/results.md): every command it prints runs on today's
train_glue.py, as the real argument parser reads it."""

import os
import shlex
import sys

import pytest

import train_glue
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import glue_results  # noqa: E402


def parse(command):
    """train_glue.py's flags in a printed command, read by train_glue.py's own parser (which
    exits on a flag it does not know, or a bad value)."""
    words = shlex.split(command.replace('"$MODEL"', "model"))
    program = (
        ["python", "benchmarks/compare_hf.py", "--hf"]
        if "compare_hf.py" in command
        else ["python", "train_glue.py"]
    )
    assert words[: len(program)] == program, command
    return train_glue.parse_args(words[len(program) :])


def test_every_command_on_the_results_page_parses():
    with open(os.path.join(ROOT, "docs", "glue_results", "results.md")) as f:
        commands = [line.strip() for line in f if line.startswith("    python ")]
    assert len(commands) >= 2  # the runs' and MNLI's
    for command in commands:
        parse(command)


@pytest.mark.parametrize("config", glue_results.CONFIGS)
def test_every_configuration_makes_a_command_that_parses(config):
    for task in glue_results.TASKS:
        words = glue_results.command_of(task, config, 42, "bf16", f"runs/{task}")
        args = parse(shlex.join(words).replace("'$MODEL'", '"$MODEL"'))
        assert args.task_name == task and args.bf16 and args.seed == 42
        assert (args.lora_rank == 8) == (config == "lora")
