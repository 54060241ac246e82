"""GLUE data: the task table, loading (classic TSV layout or the hub), tokenization, batching."""
import csv
import math
import os

import numpy as np
import torch

# `keys`: the hub's text columns; `columns`: the TSV header names of (text_a, text_b, label), and `header` for
# CoLA's headerless train/dev files. `labels`: label values as GLUE files write them (None: regression); `names`:
# what the saved model reports (id2label), if not `labels`. `metrics`: what is reported, the first is the main one.
TASKS = {
    "cola": dict(folder="CoLA", keys=("sentence", None), columns=("sentence", None, "label"),
                 header=("source", "label", "original_mark", "sentence"),
                 labels=("0", "1"), names=("unacceptable", "acceptable"), metrics=("matthews_correlation", "accuracy")),
    "sst2": dict(folder="SST-2", keys=("sentence", None), columns=("sentence", None, "label"),
                 labels=("0", "1"), names=("negative", "positive"), metrics=("accuracy",)),
    "mrpc": dict(folder="MRPC", keys=("sentence1", "sentence2"), columns=("#1 String", "#2 String", "Quality"),
                 labels=("0", "1"), names=("not_equivalent", "equivalent"), metrics=("accuracy", "f1")),
    "stsb": dict(folder="STS-B", keys=("sentence1", "sentence2"), columns=("sentence1", "sentence2", "score"),
                 labels=None, metrics=("pearson", "spearmanr")),
    "qqp": dict(folder="QQP", keys=("question1", "question2"), columns=("question1", "question2", "is_duplicate"),
                labels=("0", "1"), names=("not_duplicate", "duplicate"), metrics=("accuracy", "f1")),
    "mnli": dict(folder="MNLI", keys=("premise", "hypothesis"), columns=("sentence1", "sentence2", "gold_label"),
                 labels=("entailment", "neutral", "contradiction"), metrics=("accuracy",)),
    "qnli": dict(folder="QNLI", keys=("question", "sentence"), columns=("question", "sentence", "label"),
                 labels=("entailment", "not_entailment"), metrics=("accuracy",)),
    "rte": dict(folder="RTE", keys=("sentence1", "sentence2"), columns=("sentence1", "sentence2", "label"),
                labels=("entailment", "not_entailment"), metrics=("accuracy",)),
    "wnli": dict(folder="WNLI", keys=("sentence1", "sentence2"), columns=("sentence1", "sentence2", "label"),
                 labels=("0", "1"), names=("not_entailment", "entailment"), metrics=("accuracy",)),
}


def get_task(name):
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}': use one of {', '.join(TASKS)}")
    return TASKS[name]


def splits(task_name, kind):
    """The 'validation' or 'test' splits of a task: MNLI has a matched and a mismatched one of each."""
    return [f"{kind}_matched", f"{kind}_mismatched"] if task_name == "mnli" else [kind]


def parse_label(task, raw, where):
    """A label as written in a GLUE file -> class id (or float score for regression)."""
    if task["labels"] is None:
        try:
            score = float(raw)
        except ValueError:
            raise ValueError(f"{where}: score '{raw}' is not a number") from None
        if not 0.0 <= score <= 5.0:
            raise ValueError(f"{where}: score {score} is outside the STS-B range [0, 5]")
        return score
    if raw in task["labels"]:
        return task["labels"].index(raw)
    if raw.isdigit() and int(raw) < len(task["labels"]):  # the hub stores every label as its class id
        return int(raw)
    raise ValueError(f"{where}: label '{raw}' is not one of {list(task['labels'])}")


def read_tsv(path, task, has_labels):
    """Read one classic-GLUE TSV into {"text_a", "text_b", "label", "index"} lists."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing data file {path}: point --data_dir (or GLUE_DIR) at a folder "
                                f"holding {task['folder']}/{os.path.basename(path)}")
    # utf-8-sig drops MRPC's byte-order mark; QUOTE_NONE because sentences contain unbalanced '"'.
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    first_data_line = 2
    if "header" in task and has_labels:  # CoLA train/dev: no header row
        header, first_data_line = list(task["header"]), 1
    elif rows:
        header, rows = rows[0], rows[1:]
    if not rows:
        raise ValueError(f"{path} has no data rows: the file is empty or truncated")
    text_a, text_b, label = task["columns"]
    missing = [c for c in (text_a, text_b, label if has_labels else None) if c and c not in header]
    if missing:
        raise ValueError(f"{path}: header has no column {missing}; found {header}")
    for n, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"{path} line {n + first_data_line}: {len(row)} columns where the header has "
                             f"{len(header)} (malformed row)")
    column = {name: [row[i] for row in rows] for i, name in enumerate(header)}
    index_col = next((c for c in ("index", "id") if c in header), None)
    return {"text_a": column[text_a], "text_b": column[text_b] if text_b else None,
            "label": [parse_label(task, raw, f"{path} line {n + first_data_line}") for n, raw in enumerate(column[label])]
            if has_labels else None, "index": column[index_col] if index_col else [str(n) for n in range(len(rows))]}


def load_split(task_name, split, data_dir):
    """One split from a local classic-GLUE folder, or from the hub's nyu-mll/glue when data_dir is None."""
    task = get_task(task_name)
    has_labels = not split.startswith("test")
    if data_dir:
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"--data_dir {data_dir} does not exist: give the folder that holds {task['folder']}/")
        file_name = split.replace("validation", "dev") + ".tsv"  # dev.tsv, dev_matched.tsv, test_mismatched.tsv, ...
        return read_tsv(os.path.join(data_dir, task["folder"], file_name), task, has_labels)
    import datasets  # only this path needs it: local runs never touch the hub

    rows = datasets.load_dataset("nyu-mll/glue", task_name, split=split)
    key_a, key_b = task["keys"]
    return {"text_a": rows[key_a], "text_b": rows[key_b] if key_b else None,
            "label": rows["label"] if has_labels else None, "index": [str(i) for i in rows["idx"]]}


def tokenize(split_data, tokenizer, max_seq_length):
    """Tokenize a whole split once, in batches with the fast tokenizer; no padding here (see collate)."""
    encoded = tokenizer(split_data["text_a"], split_data["text_b"], truncation=True, max_length=max_seq_length)
    keys = [k for k in ("input_ids", "token_type_ids") if k in encoded]
    examples = [{k: encoded[k][i] for k in keys} for i in range(len(encoded["input_ids"]))]
    for example, label in zip(examples, split_data["label"] or []):
        example["label"] = label
    return examples


def collate(examples, pad_token_id, pad_to_multiple_of=8):
    """Pad a batch to its own longest member (dynamic padding), not to max_seq_length: most of the compute saved
    on GLUE. A multiple of 8 keeps matmul shapes kernel-friendly and gives torch.compile few distinct shapes."""
    length = math.ceil(max(len(e["input_ids"]) for e in examples) / pad_to_multiple_of) * pad_to_multiple_of
    batch = {}
    for key, pad_value in (("input_ids", pad_token_id), ("token_type_ids", 0)):
        if key in examples[0]:
            batch[key] = torch.full((len(examples), length), pad_value, dtype=torch.long)
            for row, e in enumerate(examples):
                batch[key][row, :len(e[key])] = torch.tensor(e[key])
    batch["attention_mask"] = (torch.arange(length) < torch.tensor([[len(e["input_ids"])] for e in examples])).long()
    if "label" in examples[0]:
        batch["labels"] = torch.tensor([e["label"] for e in examples])
    return batch


def epoch_plan(lengths, per_device_batch, accumulation, world_size, rank, seed, epoch, group_by_length):
    """This rank's work for one epoch: a list of optimizer steps, each (examples in the step across all
    ranks, [this rank's micro-batches as index lists]). The global order depends only on (seed, epoch),
    never on the world size or on earlier epochs, so every rank derives it without communicating, each
    epoch reshuffles, and a resumed run rebuilds exactly the order it was in. A step takes
    world_size * accumulation * per_device_batch examples; rank r takes every world_size-th micro-batch."""
    generator = np.random.default_rng([seed, epoch])
    order = generator.permutation(len(lengths))
    step_size = per_device_batch * accumulation * world_size
    if group_by_length:
        # Sort by length inside windows of 50 steps, then shuffle the steps: batches need little
        # padding yet the order stays random at the scale of an epoch.
        window = 50 * step_size
        order = np.concatenate([sorted(order[i:i + window], key=lambda j: -lengths[j])
                                for i in range(0, len(order), window)])
        steps = [order[i:i + step_size] for i in range(0, len(order), step_size)]
        full = len(steps) - (len(steps[-1]) < step_size)
        steps = [steps[i] for i in generator.permutation(full)] + steps[full:]
    else:
        steps = [order[i:i + step_size] for i in range(0, len(order), step_size)]
    if len(steps[-1]) < world_size:  # too few left to give every rank one example: drop them
        steps.pop()
    plan = []
    for step in steps:
        # A short last step keeps per_device_batch per micro-batch but fewer micro-steps, split
        # evenly so every rank runs the same number of forward/backward passes (DDP requires it).
        micro_steps = min(math.ceil(len(step) / (per_device_batch * world_size)), len(step) // world_size)
        pieces = np.array_split(step, micro_steps * world_size)
        plan.append((len(step), [pieces[m * world_size + rank].tolist() for m in range(micro_steps)]))
    return plan
