import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from conftest import GLUE, ROOT, launch_command, model_weights, run_cli


def test_ddp_two_processes_match_one_process_and_evaluate_every_example_once(tiny_model, tmp_path):
    """37 examples at global batch 8: a short last step; 41 dev examples: not divisible by 2 ranks."""
    common = [
        "--task_name",
        "mrpc",
        "--data_dir",
        GLUE,
        "--model_name_or_path",
        tiny_model,
        "--num_train_epochs",
        2,
        "--max_train_samples",
        37,
        "--max_eval_samples",
        41,
        "--learning_rate",
        1e-3,
        "--do_predict",
    ]
    single = run_cli(
        common + ["--output_dir", tmp_path / "single", "--per_device_train_batch_size", 8]
    )
    double = run_cli(
        common + ["--output_dir", tmp_path / "ddp", "--per_device_train_batch_size", 2,
                  "--gradient_accumulation_steps", 2], torchrun=2,
    )  # fmt: skip
    assert single.returncode == double.returncode == 0
    one, two = (
        model_weights(tmp_path / "single" / "final"),
        model_weights(tmp_path / "ddp" / "final"),
    )
    assert any(not torch.equal(one[k], model_weights(tiny_model)[k]) for k in one)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    results = [
        json.loads((tmp_path / run / "final" / "eval.json").read_text())
        for run in ("single", "ddp")
    ]
    assert results[0]["eval"] == results[1]["eval"] and not math.isnan(
        results[1]["eval"]["accuracy"]
    )
    assert results[0]["step"] == results[1]["step"] == 10
    predictions = [
        (tmp_path / run / "MRPC.tsv").read_text().splitlines() for run in ("single", "ddp")
    ]
    with open(f"{GLUE}/MRPC/test.tsv", encoding="utf-8-sig") as f:
        test_ids = [line.split("\t")[0] for line in f.read().splitlines()[1:]]
    assert [
        line.split("\t")[0] for line in predictions[1][1:]
    ] == test_ids  # every test row once, in order
    assert predictions[0] == predictions[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(tmp_path, args, data_dirs=(GLUE, GLUE)):
    """Two `torchrun --nnodes=2` launches on this machine, each in its own working directory with
    a relative --output_dir: two nodes that share no filesystem. Returns their results."""
    port = free_port()
    processes = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir(exist_ok=True)
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                   f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
                   os.path.join(ROOT, "train_glue.py"), "--data_dir", data_dirs[node], "--output_dir", "run",
                   *[str(a) for a in args]]  # fmt: skip
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        processes.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))  # fmt: skip
    return [(p.wait(timeout=240), p.stdout.read()) for p in processes]


def errors(output):
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.mark.slow  # two 2-node launches: kept out of the default run's 10 minutes
def test_two_nodes_without_a_shared_filesystem_stop_together_instead_of_drifting(
    tiny_model, tmp_path
):
    args = ["--task_name", "mrpc", "--model_name_or_path", tiny_model, "--max_train_samples", 32,
            "--per_device_train_batch_size", 4, "--max_eval_samples", 16, "--save_steps", 2]  # fmt: skip
    (first, out0), (second, out1) = two_nodes(tmp_path, args + ["--max_steps", 4])
    assert first == second == 0, out0 + out1
    assert os.path.exists(tmp_path / "node0" / "run" / "checkpoint-4.pt")
    assert not (tmp_path / "node1" / "run").exists()  # rank 0 alone writes
    # Node 0 sees checkpoint-4, node 1 sees none: every rank stops, each machine says why once.
    results = two_nodes(tmp_path, args + ["--max_steps", 8, "--resume_from_checkpoint", "auto"])
    assert [code for code, _ in results] == [1, 1]
    for _, output in results:
        [message] = errors(output)
        assert "ranks see different checkpoints" in message and "every node" in message
    assert sorted(os.listdir(tmp_path / "node0" / "run")).count("checkpoint-4.pt") == 1


def test_nodes_with_different_training_data_refuse_to_start(tiny_model, tmp_path):
    other = tmp_path / "other-glue"
    shutil.copytree(os.path.join(GLUE, "MRPC"), other / "MRPC")
    lines = (other / "MRPC" / "train.tsv").read_text(encoding="utf-8-sig").splitlines(keepends=True)
    label, rest = lines[1].split("\t", 1)
    lines[1] = ("0" if label == "1" else "1") + "\t" + rest  # one label differs
    (other / "MRPC" / "train.tsv").write_text("".join(lines))
    args = ["--task_name", "mrpc", "--model_name_or_path", tiny_model, "--max_train_samples", 32,
            "--per_device_train_batch_size", 4, "--max_steps", 2]  # fmt: skip
    results = two_nodes(tmp_path, args, data_dirs=(GLUE, str(other)))
    assert [code for code, _ in results] == [1, 1]
    for _, output in results:  # once on each machine
        [message] = errors(output)
        assert "ranks read different training data" in message
    assert not (tmp_path / "node0" / "run").exists()


def test_an_error_under_torchrun_is_printed_once_per_machine(tiny_model, tmp_path):
    result = run_cli(["--task_name", "rte", "--data_dir", GLUE, "--model_name_or_path", tiny_model,
                      "--output_dir", tmp_path / "out", "--max_seq_length", 3], torchrun=2, check=False)  # fmt: skip
    assert result.returncode != 0
    assert errors(result.stderr) == ["error: --max_seq_length must be in [5, 512] for this model"]


LEAVE_THE_GROUP = r"""
import os, torch, trainer
trainer.setup_distributed()
trainer.build_optimizer(torch.nn.Linear(2, 2), 1e-3, 0.0)  # torch.optim's first use imports torch._dynamo
trainer.all_gather(None)
torch.distributed.destroy_process_group()
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
left = [name for name in threads if "gloo" in name]
os.write(1, f"gloo threads left: {left}\n".encode())  # one write: the ranks' lines stay whole
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads threads from Linux's /proc")
def test_leaving_the_process_group_ends_its_threads_so_none_can_abort_the_exit(tmp_path):
    """A gloo thread alive at the interpreter's exit aborts it now and then (SIGABRT, 'terminate
    called without an active exception') while it drops the last collective's tensors. They end
    with the group, unless torch.distributed.nn was first imported after init_process_group."""
    (tmp_path / "leave.py").write_text(LEAVE_THE_GROUP)
    result = subprocess.run([*launch_command(torchrun=2), "leave.py"], cwd=tmp_path, env=dict(
        os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("gloo threads left: []") == 2, result.stdout
