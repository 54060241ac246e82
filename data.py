"""The data: a GLUE task in the classic layout, or your own files, read by `datasets` into Arrow
tables, tokenized in one `map` cached on disk, and gathered by index into padded batches. A task
is a dict: its files by split, its text and label columns, its classes (none: a regression
score), its metrics (the main one first), and where its test predictions go."""

import csv
import glob
import hashlib
import math
import os
import re

import datasets
import pyarrow as pa
import pyarrow.compute as pc

datasets.disable_progress_bars()
datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # our own errors say what went wrong

PAIR, NUMBER = ["sentence1", "sentence2"], re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# name: (its folder in the classic layout, its text columns, the names of its classes, which the
# files write as names or as numbers (none: a regression score), its metrics, the main first)
GLUE = {
    "cola": ("CoLA", ["sentence"], "unacceptable acceptable", "matthews_correlation accuracy"),
    "sst2": ("SST-2", ["sentence"], "negative positive", "accuracy"),
    "mrpc": ("MRPC", ["#1 String", "#2 String"], "not_equivalent equivalent", "accuracy f1"),
    "stsb": ("STS-B", PAIR, "", "pearson spearmanr"),
    "qqp": ("QQP", ["question1", "question2"], "not_duplicate duplicate", "accuracy f1"),
    "mnli": ("MNLI", PAIR, "entailment neutral contradiction", "accuracy"),
    "qnli": ("QNLI", ["question", "sentence"], "entailment not_entailment", "accuracy"),
    "rte": ("RTE", PAIR, "entailment not_entailment", "accuracy"),
    "wnli": ("WNLI", PAIR, "not_entailment entailment", "accuracy"),
}
LABELS = {"mrpc": "Quality", "stsb": "score", "qqp": "is_duplicate", "mnli": "gold_label"}
# The hub's copy (nyu-mll/glue) names these texts otherwise, and every label `label`.
HUB_TEXTS = {"mrpc": PAIR, "mnli": ["premise", "hypothesis"]}
PROGRESS_ROWS = 100_000  # about 5 s of tokenizing on a 2-core CPU: show datasets' progress bar


def glue_task(name, data_dir, with_test=False, hub=None):
    """A GLUE task in the classic layout under data_dir or, without one, from the hub."""
    folder, texts, classes, metrics = GLUE[name]
    splits = ["train", "dev"] + ["test"] * with_test
    if name == "mnli":  # a matched and a mismatched set, for dev and for test
        splits = ["train", "dev_matched", "dev_mismatched"]
        splits += ["test_matched", "test_mismatched"] * with_test
    label, classes = LABELS.get(name, "label"), classes.split()
    task = {
        "files": {split: os.path.join(data_dir or "", folder, f"{split}.tsv") for split in splits},
        "columns": ["source", label, "mark", texts[0]] if name == "cola" else None,  # no header
        "texts": texts,
        "label": label,
        "classes": classes,
        "problem_type": "single_label_classification" if classes else "regression",
        # GLUE's files write a class by its name or its number (SST-2's 0 is negative).
        "label_ids": {key: i for i, name in enumerate(classes) for key in (name, str(i))},
        "metrics": metrics.split(),
        "predictions": folder,  # GLUE's submission names: MRPC.tsv, MNLI-m.tsv, MNLI-mm.tsv
    }
    if not data_dir:  # the hub's layout: its split names (validation...), texts and `label`
        files = {split: split.replace("dev", "validation") for split in splits}
        task |= {"files": files, "hub": (hub or "nyu-mll/glue", name), "columns": None}
        task |= {"label": "label", "texts": HUB_TEXTS.get(name, texts)}
    return task


def own_task(train_file, validation_file, test_file):
    """The label is the `label` column; the texts are sentence1 and sentence2 if there are such
    columns, else the first one or two others of text. Labels that are all whole numbers or all
    words are classes, each class its name as written (`5` is the class "5", not class id 5);
    numbers with fractions make a regression; lists of names (JSON) make a multi-label task."""
    table = read_table(train_file)
    columns, sample = table.column_names, table.select(range(min(100, len(table))))
    words = {c for c in columns for v in sample[c] if type(v) is str and not NUMBER.fullmatch(v)}
    others = [c for c in columns if c in words and c != "label"]  # not numbers, nulls, lists
    texts = [c for c in PAIR if c in columns] or others[:2]
    if "label" not in columns or not texts:
        raise ValueError(f"{train_file} needs a 'label' column and one of text (it has {columns})")
    multi_label = isinstance(table.features["label"], datasets.List)
    if multi_label:  # each example a set of names, maybe empty
        values = sorted({name for names in table["label"] for name in names or [] if name})
    else:
        values = [value for value in table.unique("label") if value]  # tokenize() names empty ones
    numbers = [value for value in values if NUMBER.fullmatch(value) and not multi_label]
    if 0 < len(numbers) < len(values) or len(values) < 2 - multi_label:  # or nothing to learn
        raise ValueError(f"{train_file}: make the labels one kind, of 2+ values: {values[:4]}")
    regression = numbers and not all(value.lstrip("+-").isdecimal() for value in values)
    classes = [] if regression else sorted(values, key=int if numbers else str)
    problem_type = "multi_label_classification" if multi_label else "single_label_classification"
    problem_type = "regression" if regression else problem_type
    metrics = ["pearson", "spearmanr"] if regression else ["accuracy", "f1_macro"]
    metrics = ["f1_micro", "f1_macro", "exact_match"] if multi_label else metrics
    files = {"train": train_file, "dev": validation_file, "test": test_file}
    return {
        "files": {split: path for split, path in files.items() if path},
        "texts": texts,
        "label": "label",
        "classes": classes,
        "problem_type": problem_type,
        "label_ids": {name: i for i, name in enumerate(classes)},
        "metrics": metrics,
        "predictions": "predictions",
    }


def read_split(task, split):
    """A split as a table of strings, checked for the columns it needs."""
    path = task["files"][split]
    if task.get("hub"):
        table = read_hub(*task["hub"], path)
    else:
        table = read_table(path, None if split.startswith("test") else task.get("columns"))
    needed = task["texts"] + ([] if split.startswith("test") else [task["label"]])
    missing = [column for column in needed if column not in table.column_names]
    if missing:
        raise ValueError(f"{path} has no column {missing[0]!r} (it has {table.column_names})")
    return table


def read_table(path, columns=None):
    """A .tsv, .csv, .json or .jsonl file as a table of strings, read in chunks by a `datasets`
    builder and cached on disk. `columns`: the names of a header-less file's columns."""
    kind = os.path.splitext(path)[1].lower()
    if kind not in (".tsv", ".csv", ".json", ".jsonl"):
        raise ValueError(f"{path}: give a .tsv, .csv, .json or .jsonl file")
    try:
        options = {"description": digest(path)}  # in the cache's key: never served stale
        with open(path, encoding="utf-8-sig") as f:  # MRPC's train.tsv starts with a BOM
            lines = [f.readline(), f.readline()]
    except OSError as error:
        raise ValueError(f"cannot read {path} ({error.strerror}): check the path") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}): convert it") from None
    if kind.startswith(".json") and "".join(lines).lstrip()[:1] not in ("[", "{"):
        raise ValueError(f"{path} holds no JSON objects: give an array of them, or one per line")
    if kind in (".tsv", ".csv"):
        if not (lines[0] if columns else lines[1]).strip():  # the first row of data
            raise ValueError(f"{path} has no data rows: the file is empty or cut short")
        # GLUE's files are unquoted (their sentences hold unbalanced '"'); "NA" is a word.
        dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if kind == ".tsv" else {}
        names = columns or next(csv.reader(lines[:1], **dialect))
        options |= dialect | {"header": None if columns else 0, "names": names}
        options |= {"features": strings(dict.fromkeys(names)), "keep_default_na": False}
        options["encoding"] = "utf-8-sig"
    try:
        builder = "json" if kind.startswith(".json") else "csv"
        table = datasets.load_dataset(builder, data_files=path, split="train", **options)
    except (datasets.exceptions.DatasetGenerationError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: {str(error.__cause__ or error).strip()}") from None
    for name, feature in table.features.items():
        if isinstance(feature, datasets.Json):  # a JSON key whose values are of several kinds
            kinds = [type(value).__name__ for value in table[name]]
            row = next((i for i, kind in enumerate(kinds) if kind != kinds[0]), 0)
            where = f"item {row + 1}" if path.endswith(".json") else f"line {row + 1}"
            raise ValueError(
                f"{path}, {where}: {name!r} is a {kinds[row]} here but a {kinds[0]} in the first "
                "row: give it one kind in every row"
            )
    return table if builder == "csv" else table.cast(strings(table.features))


def read_hub(dataset, config, split):
    """A GLUE split in the hub's layout (a hub id or a local folder) as a table of strings like a
    classic file's: class ids as "0", "1", ...; `idx` as `index`; test labels (all -1) dropped."""
    options = {"description": digest(dataset)} if os.path.isdir(dataset) else {}  # never stale
    try:
        table = datasets.load_dataset(dataset, config, split=split, **options)
    except Exception as error:  # offline, or no such dataset, config or split
        where = f"{dataset} {config} {split}"
        raise ValueError(f"cannot load {where} (offline, give --data_dir): {error}") from None
    table = table.remove_columns("label") if split.startswith("test") else table
    table = table.rename_column("idx", "index")
    return table.cast(strings(table.features))


def digest(path):
    """The sha256 of a file's bytes, or of a folder's file names and bytes (not hidden files)."""
    files, sha = [path], hashlib.sha256()
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**"), recursive=True))
    for file in filter(os.path.isfile, files):
        sha.update(os.path.relpath(file, path).encode())  # a file renamed may be another split
        with open(file, "rb") as f:
            sha.update(hashlib.file_digest(f, "sha256").digest())
    return sha.hexdigest()


def strings(features):
    """Every column as text, a column of lists (multi-label) as lists of text."""
    text, columns = datasets.Value("string"), {}
    for name, kind in features.items():
        columns[name] = datasets.List(text) if isinstance(kind, datasets.List) else text
    return datasets.Features(columns)


def tokenize(table, task, split, tokenizer, max_seq_length):
    """Tokenize a split in one batched `map`, whose result `datasets` caches on disk (keyed by
    the table, the tokenizer and max_seq_length). Labels become `labels`, as the models' forward
    names them: class ids or float scores. A test split's labels are checked, then dropped."""
    path, test = task["files"][split], split.startswith("test")
    first_line = 1 if task.get("columns") and not test or path.endswith(".jsonl") else 2
    ids, multi_label = task["label_ids"], task["problem_type"] == "multi_label_classification"

    def label(value, row):
        """A label's class id, score, or 0/1 per class (multi-label); an error naming its row."""
        if test and not value:
            return None  # a test file may leave its labels out
        if multi_label and isinstance(value, list) and set(value) <= ids.keys():
            return [float(name in value) for name in task["classes"]]  # a sigmoid's target each
        if not multi_label and isinstance(value, str) and value in ids:
            return ids[value]
        if not task["classes"] and NUMBER.fullmatch(str(value)) and math.isfinite(float(value)):
            return float(value)
        kind = "a list of classes" if multi_label else "a class"
        kind = f"{kind} of the training set {task['classes']}" if task["classes"] else "a number"
        what = f"the label {value!r} is not {kind}" if value else "the label is empty"
        where = f"item {row + 1}" if path.endswith(".json") else f"line {row + first_line}"
        raise ValueError(f"{path}, {where}: {what}: fix the row")

    def encode(rows, indices):
        texts = [[text or "" for text in rows[column]] for column in task["texts"]]  # null: empty
        encoded = tokenizer(*texts, truncation=True, max_length=max_seq_length)
        if task["label"] in rows:
            values = zip(rows[task["label"]], indices, strict=True)
            labels = [label(value, row) for value, row in values]  # checked in a test split too
            if not test:
                encoded["labels"] = labels
        return encoded

    show_progress = len(table) >= PROGRESS_ROWS  # seconds or minutes: say how far it is
    datasets.enable_progress_bars() if show_progress else datasets.disable_progress_bars()
    removed = [column for column in table.column_names if column != "index"]  # ids: predictions
    return table.map(encode, batched=True, with_indices=True, remove_columns=removed, desc=split)


def lengths(table):
    return pc.list_value_length(table.with_format("arrow")[:]["input_ids"]).to_numpy()


def fingerprint(table):
    """A digest of the tokenized examples: ranks, and a resumed run, check their data with it."""
    arrow, digest = table.with_format("arrow")[:], hashlib.sha256(lengths(table).tobytes())
    for column in (arrow["input_ids"], arrow["labels"]):  # multi-label: a list of 0/1 per example
        column = pc.list_flatten(column) if pa.types.is_list(column.type) else column
        for chunk in column.chunks:
            digest.update(chunk.to_numpy(zero_copy_only=False).tobytes())
    return f"{len(table)} examples, sha256 {digest.hexdigest()[:16]}"


def collate(rows, tokenizer):
    """Pad a batch (rows as table[indices] gives them) to its own longest member, rounded up to a
    multiple of 8 for GPU tensor cores, not to max_seq_length: most of the compute saved on GLUE."""
    rows = {key: values for key, values in rows.items() if key != "index"}
    return dict(tokenizer.pad(rows, pad_to_multiple_of=8, return_tensors="pt"))
