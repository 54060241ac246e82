"""GLUE data on `datasets`: the task table, the classic TSV files read into Arrow tables,
tokenization as one `map` cached on disk, and batches gathered by index and padded."""

import csv
import hashlib
import os

import datasets
import pyarrow.compute as pc
import torch

datasets.disable_progress_bars()
datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # our own errors say what went wrong
# The classic files: unquoted (sentences hold unbalanced '"'), MRPC's with a byte-order mark, and
# "NA" or "null" are words, not missing values.
TSV = {"sep": "\t", "quoting": csv.QUOTE_NONE, "encoding": "utf-8-sig", "keep_default_na": False}

PAIR = ["sentence1", "sentence2"]
# task: (its folder in the classic layout, its text columns, the names of its classes, which the
# files write as names or as numbers (none: a regression score), its metrics, the main first)
TASKS = {
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
LABEL_COLUMNS = {"mrpc": "Quality", "stsb": "score", "qqp": "is_duplicate", "mnli": "gold_label"}


def splits(task_name, kind):
    """A task's 'dev' or 'test' splits, as its files are named: MNLI has two of each."""
    return [f"{kind}_matched", f"{kind}_mismatched"] if task_name == "mnli" else [kind]


def metric_names(task_name):
    """What a task reports, the main metric first; MNLI's name their dev split."""
    prefixes = [split.removeprefix("dev").lstrip("_") for split in splits(task_name, "dev")]
    return [
        f"{p}_{metric}" if p else metric for p in prefixes for metric in TASKS[task_name][3].split()
    ]


def read_split(task_name, split, data_dir):
    """One split of a task as a table of strings, from the classic layout in data_dir."""
    (folder, texts, _, _), label = TASKS[task_name], LABEL_COLUMNS.get(task_name, "label")
    path = os.path.join(data_dir, folder, split + ".tsv")
    headerless = task_name == "cola" and split != "test"  # CoLA's train and dev have no header
    table = read_tsv(path, ["source", label, "mark", texts[0]] if headerless else None)
    needed = texts + ([] if split.startswith("test") else [label])
    missing = [column for column in needed if column not in table.column_names]
    if missing:
        raise ValueError(f"{path} has no column {missing[0]!r} (it has {table.column_names})")
    return table, path


def read_tsv(path, names=None):
    """A tab-separated file as a table of strings, read in chunks by the `datasets` csv builder
    and cached on disk (keyed by the file's path and modification time). `names`: the columns of
    a file without a header row."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # MRPC's train.tsv starts with a BOM
            lines = [f.readline(), f.readline()]
    except FileNotFoundError:
        raise ValueError(f"missing data file {path}: point --data_dir at the GLUE folder") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}): convert it") from None
    header = names is None
    names = lines.pop(0).rstrip("\r\n").split("\t") if header else names
    if not lines[0].strip():
        raise ValueError(f"{path} has no data rows: the file is empty or cut short")
    features = datasets.Features({name: datasets.Value("string") for name in names})
    try:
        return datasets.load_dataset(
            "csv",
            data_files=path,
            split="train",
            header=0 if header else None,
            names=names,
            features=features,
            **TSV,
        )
    except (datasets.exceptions.DatasetGenerationError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: {str(error.__cause__ or error).strip()}") from None


def tokenize(table, path, tokenizer, task_name, max_seq_length):
    """Tokenize a split in one batched `map`, whose result `datasets` caches on disk (keyed by
    the table, the tokenizer and max_seq_length). Labels become class ids (or float scores); no
    padding yet (see collate)."""
    _, texts, classes, _ = TASKS[task_name]
    label, labels = LABEL_COLUMNS.get(task_name, "label"), classes.split()
    ids = {name: i for i, name in enumerate(labels)} | {str(i): i for i in range(len(labels))}

    def encode(rows):
        encoded = tokenizer(*[rows[c] for c in texts], truncation=True, max_length=max_seq_length)
        if label in rows:
            encoded["label"] = [ids[value] if labels else float(value) for value in rows[label]]
        return encoded

    try:  # the test split's ids stay, for the predictions file
        removed = [column for column in table.column_names if column != "index"]
        return table.map(encode, batched=True, remove_columns=removed)
    except KeyError as error:
        raise ValueError(f"{path}: label {error} is not one of {labels}") from None
    except ValueError as error:
        raise ValueError(f"{path}: a score is not a number ({error})") from None


def lengths(table):
    return pc.list_value_length(table.with_format("arrow")[:]["input_ids"]).to_numpy()


def fingerprint(table):
    """A digest of the tokenized examples: the ranks, and a resumed run, check with it that they
    train on the same data."""
    arrow, digest = table.with_format("arrow")[:], hashlib.sha256(lengths(table).tobytes())
    for column in (pc.list_flatten(arrow["input_ids"]), arrow["label"]):
        for chunk in column.chunks:
            digest.update(chunk.to_numpy(zero_copy_only=False).tobytes())
    return f"{len(table)} examples, sha256 {digest.hexdigest()[:16]}"


def collate(rows, pad_token_id):
    """Pad a batch (rows as table[indices] gives them) to its own longest member, rounded up to a
    multiple of 8 for GPU tensor cores, not to max_seq_length: most of the compute saved on GLUE."""
    lengths = [len(ids) for ids in rows["input_ids"]]
    width = -(-max(lengths) // 8) * 8
    batch = {}
    for key, pad in (("input_ids", pad_token_id), ("token_type_ids", 0)):
        if key in rows:
            batch[key] = torch.full((len(lengths), width), pad, dtype=torch.long)
            for row, values in enumerate(rows[key]):
                batch[key][row, : len(values)] = torch.tensor(values)
    batch["attention_mask"] = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    if "label" in rows:
        batch["labels"] = torch.tensor(rows["label"])
    return batch
