"""GLUE data: the task table, loading (classic TSV layout or the hub), tokenization, batching."""

import csv
import hashlib
import io
import math
import os
import re

import numpy as np
import torch

# A sentence longer than csv's default limit (128 KiB) is unusual but legitimate data.
csv.field_size_limit(2**31 - 1)

# For each task:
#   keys     the hub's text columns
#   columns  the TSV header names of (text_a, text_b, label)
#   header   the column names of CoLA's header-less train and dev files
#   labels   label values as GLUE files write them (None: a regression score)
#   names    what the saved model reports (id2label), where not `labels`
#   metrics  what is reported, the main one first
TASKS = {
    "cola": dict(
        folder="CoLA",
        keys=("sentence", None),
        columns=("sentence", None, "label"),
        header=("source", "label", "original_mark", "sentence"),
        labels=("0", "1"),
        names=("unacceptable", "acceptable"),
        metrics=("matthews_correlation", "accuracy"),
    ),
    "sst2": dict(
        folder="SST-2",
        keys=("sentence", None),
        columns=("sentence", None, "label"),
        labels=("0", "1"),
        names=("negative", "positive"),
        metrics=("accuracy",),
    ),
    "mrpc": dict(
        folder="MRPC",
        keys=("sentence1", "sentence2"),
        columns=("#1 String", "#2 String", "Quality"),
        labels=("0", "1"),
        names=("not_equivalent", "equivalent"),
        metrics=("accuracy", "f1"),
    ),
    "stsb": dict(
        folder="STS-B",
        keys=("sentence1", "sentence2"),
        columns=("sentence1", "sentence2", "score"),
        labels=None,
        metrics=("pearson", "spearmanr"),
    ),
    "qqp": dict(
        folder="QQP",
        keys=("question1", "question2"),
        columns=("question1", "question2", "is_duplicate"),
        labels=("0", "1"),
        names=("not_duplicate", "duplicate"),
        metrics=("accuracy", "f1"),
    ),
    "mnli": dict(
        folder="MNLI",
        keys=("premise", "hypothesis"),
        columns=("sentence1", "sentence2", "gold_label"),
        labels=("entailment", "neutral", "contradiction"),
        metrics=("accuracy",),
    ),
    "qnli": dict(
        folder="QNLI",
        keys=("question", "sentence"),
        columns=("question", "sentence", "label"),
        labels=("entailment", "not_entailment"),
        metrics=("accuracy",),
    ),
    "rte": dict(
        folder="RTE",
        keys=("sentence1", "sentence2"),
        columns=("sentence1", "sentence2", "label"),
        labels=("entailment", "not_entailment"),
        metrics=("accuracy",),
    ),
    "wnli": dict(
        folder="WNLI",
        keys=("sentence1", "sentence2"),
        columns=("sentence1", "sentence2", "label"),
        labels=("0", "1"),
        names=("not_entailment", "entailment"),
        metrics=("accuracy",),
    ),
}


def get_task(name):
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}': use one of {', '.join(TASKS)}")
    return TASKS[name]


def splits(task_name, kind):
    """The 'validation' or 'test' splits of a task (MNLI has a matched and a mismatched one)."""
    if task_name == "mnli":
        return [f"{kind}_matched", f"{kind}_mismatched"]
    return [kind]


def is_regression(task_name):
    return TASKS[task_name]["labels"] is None  # STS-B: a score, not a class


def metric_name(task_name, split, metric):
    """What a metric is reported as: MNLI's two dev splits prefix theirs (matched_accuracy)."""
    if len(splits(task_name, "validation")) == 1:
        return metric
    return split.replace("validation_", "") + "_" + metric


def metric_names(task_name):
    """Every metric a task reports, the main one first."""
    return [
        metric_name(task_name, split, metric)
        for split in splits(task_name, "validation")
        for metric in TASKS[task_name]["metrics"]
    ]


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
    # The hub stores every label as its class id.
    if re.fullmatch(r"[0-9]+", raw) and int(raw) < len(task["labels"]):
        return int(raw)
    raise ValueError(f"{where}: label '{raw}' is not one of {list(task['labels'])}")


def read_tsv(path, task, has_labels):
    """Read one classic-GLUE TSV into {"text_a", "text_b", "label", "index"} lists."""
    if not os.path.isfile(path):
        raise ValueError(
            f"missing data file {path}: point --data_dir (or GLUE_DIR) at a folder "
            f"holding {task['folder']}/{os.path.basename(path)}"
        )
    # utf-8-sig drops MRPC's byte-order mark; QUOTE_NONE because sentences contain unbalanced '"'.
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {error.start}): GLUE files are UTF-8 TSV; convert it "
            "or point --data_dir at the original"
        ) from None
    if "\x00" in text:
        raise ValueError(f"{path} is a binary file, not TSV text: point --data_dir at GLUE's files")
    rows = list(csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))
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
            raise ValueError(
                f"{path} line {n + first_data_line}: {len(row)} columns where the header has "
                f"{len(header)} (malformed row)"
            )
    column = {name: [row[i] for row in rows] for i, name in enumerate(header)}
    labels = None
    if has_labels:
        labels = []
        for n, raw in enumerate(column[label]):
            labels.append(parse_label(task, raw, f"{path} line {n + first_data_line}"))
    if "index" in header:
        index = column["index"]
    elif "id" in header:
        index = column["id"]
    else:
        index = [str(n) for n in range(len(rows))]
    text_b_column = column[text_b] if text_b else None
    return {"text_a": column[text_a], "text_b": text_b_column, "label": labels, "index": index}


def load_split(task_name, split, data_dir):
    """One split from a local classic-GLUE folder, or the hub's nyu-mll/glue if data_dir is None."""
    task = get_task(task_name)
    has_labels = not split.startswith("test")
    if data_dir:
        if not os.path.exists(data_dir):
            raise ValueError(
                f"--data_dir (or GLUE_DIR) {data_dir} does not exist: give the folder holding "
                f"{task['folder']}/"
            )
        if not os.path.isdir(data_dir):
            raise ValueError(
                f"--data_dir (or GLUE_DIR) {data_dir} is a file: give the folder holding "
                f"{task['folder']}/"
            )
        # dev.tsv, dev_matched.tsv, test_mismatched.tsv, ...
        file_name = split.replace("validation", "dev") + ".tsv"
        return read_tsv(os.path.join(data_dir, task["folder"], file_name), task, has_labels)
    import datasets  # only this path needs it: local runs never touch the hub

    rows = datasets.load_dataset("nyu-mll/glue", task_name, split=split)
    key_a, key_b = task["keys"]
    return {
        "text_a": rows[key_a],
        "text_b": rows[key_b] if key_b else None,
        "label": rows["label"] if has_labels else None,
        "index": [str(i) for i in rows["idx"]],
    }


def tokenize(split_data, tokenizer, max_seq_length):
    """Tokenize a whole split once, in batches with the fast tokenizer; no padding (see collate)."""
    encoded = tokenizer(
        split_data["text_a"], split_data["text_b"], truncation=True, max_length=max_seq_length
    )
    keys = [k for k in ("input_ids", "token_type_ids") if k in encoded]
    examples = [{k: encoded[k][i] for k in keys} for i in range(len(encoded["input_ids"]))]
    if split_data["label"] is not None:
        for example, label in zip(examples, split_data["label"], strict=True):
            example["label"] = label
    return examples


def fingerprint(examples):
    """A digest of tokenized examples: the ranks, and a resumed run, check they train on the same
    data with it."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(np.asarray(example["input_ids"], dtype=np.int64).tobytes())
        digest.update(repr(example.get("label")).encode())
    return f"{len(examples)} examples, sha256 {digest.hexdigest()[:16]}"


def collate(examples, pad_token_id, pad_to_multiple_of=8):
    """Pad a batch to its own longest member (dynamic padding), not to max_seq_length: most of the
    compute saved on GLUE. A multiple of 8 keeps matmul shapes kernel-friendly (GPU tensor cores)
    and gives torch.compile few distinct shapes."""
    longest = max(len(e["input_ids"]) for e in examples)
    length = math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of
    batch = {}
    for key, pad_value in (("input_ids", pad_token_id), ("token_type_ids", 0)):
        if key in examples[0]:
            batch[key] = torch.full((len(examples), length), pad_value, dtype=torch.long)
            for row, e in enumerate(examples):
                batch[key][row, : len(e[key])] = torch.tensor(e[key])
    real_lengths = torch.tensor([[len(e["input_ids"])] for e in examples])
    batch["attention_mask"] = (torch.arange(length) < real_lengths).long()
    if "label" in examples[0]:
        batch["labels"] = torch.tensor([e["label"] for e in examples])
    return batch


def steps_per_epoch(num_examples, step_size, world_size):
    """How many steps epoch_plan makes of an epoch (the same for every rank, seed and epoch)."""
    full_steps, rest = divmod(num_examples, step_size)
    if rest >= world_size:  # a short last step; fewer examples than ranks are dropped
        return full_steps + 1
    return full_steps


def epoch_plan(
    lengths, *, per_device_batch, accumulation, world_size, rank, seed, epoch, group_by_length
):
    """This rank's work for one epoch: a list of optimizer steps, each (examples in the step on all
    ranks, [this rank's micro-batches as lists of example indices]).

    The global order depends only on (seed, epoch), never on the world size or on earlier epochs:
    every rank derives it without communicating, each epoch reshuffles, and a resumed run rebuilds
    exactly the order it was in. A step takes world_size * accumulation * per_device_batch
    examples; rank r takes every world_size-th micro-batch of it."""
    generator = np.random.default_rng([seed, epoch])
    order = generator.permutation(len(lengths))
    step_size = per_device_batch * accumulation * world_size
    if group_by_length:
        # Sort by length inside windows of 50 steps, then shuffle the steps: batches need little
        # padding yet the order stays random at the scale of an epoch.
        window = 50 * step_size
        sorted_windows = []
        for start in range(0, len(order), window):
            sorted_windows.append(sorted(order[start : start + window], key=lambda j: -lengths[j]))
        order = np.concatenate(sorted_windows)
        steps = [order[i : i + step_size] for i in range(0, len(order), step_size)]
        full = len(steps) - (len(steps[-1]) < step_size)  # a short last step stays last
        steps = [steps[i] for i in generator.permutation(full)] + steps[full:]
    else:
        steps = [order[i : i + step_size] for i in range(0, len(order), step_size)]
    if len(steps[-1]) < world_size:  # too few left to give every rank one example: drop them
        steps.pop()
    # The full step holding the longest example goes first, so that an out-of-memory error shows
    # at once rather than deep into an epoch. (Full steps are the same at every world size.)
    full_steps = [i for i, step in enumerate(steps) if len(step) == step_size]
    if full_steps:
        longest = max(full_steps, key=lambda i: max(lengths[j] for j in steps[i]))
        steps.insert(0, steps.pop(longest))
    plan = []
    for step in steps:
        # A short last step keeps per_device_batch per micro-batch but fewer micro-steps, split
        # evenly so every rank runs the same number of forward/backward passes (DDP requires it).
        micro_steps = math.ceil(len(step) / (per_device_batch * world_size))
        micro_steps = min(micro_steps, len(step) // world_size)  # at least one example each
        pieces = np.array_split(step, micro_steps * world_size)
        mine = [pieces[m * world_size + rank].tolist() for m in range(micro_steps)]
        plan.append((len(step), mine))
    return plan
