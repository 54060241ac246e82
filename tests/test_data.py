import os

import pytest
from transformers import AutoTokenizer

import data
from conftest import GLUE, SAMPLES, minilm_path

FULL = [("mrpc", "train", 3668), ("mrpc", "dev", 408), ("mrpc", "test", 1725),
        ("sst2", "train", 67349), ("sst2", "dev", 872), ("sst2", "test", 1821)]  # fmt: skip
# The samples are the first 41 lines of each file: 40 rows after a header, 41 in CoLA's
# header-less train and dev.
SAMPLE = [
    (task, split, rows + (task == "cola" and split != "test"))
    for task in ("cola", "rte", "stsb", "wnli", "qnli")
    for split, rows in (("train", 40), ("dev", 40), ("test", 20))
    if not (task == "qnli" and split == "test")
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.mark.parametrize("task_name,split,rows", FULL + SAMPLE)
def test_every_format_reads_and_tokenizes_with_its_row_count(tokenizer, task_name, split, rows):
    folder = GLUE if (task_name, split, rows) in FULL else SAMPLES
    table, path = data.read_split(task_name, split, folder)
    tokens = data.tokenize(table, path, tokenizer, task_name, 128)
    assert len(table) == len(tokens) == rows
    assert all(1 < n <= 128 for n in data.lengths(tokens))
    classes = data.TASKS[task_name][2].split()
    if split == "test":
        assert "label" not in tokens.column_names and "index" in tokens.column_names
    elif classes:
        assert set(tokens["label"]) == set(range(len(classes)))
    else:
        labels = tokens["label"]
        assert all(0.0 <= s <= 5.0 for s in labels) and len(set(labels)) > 1


def test_quirks_bom_quotes_string_labels_and_a_missing_header():
    mrpc, _ = data.read_split("mrpc", "train", GLUE)
    assert mrpc.column_names[0] == "Quality"  # the byte-order mark is not part of the name
    assert any('"' in s for s in mrpc["#1 String"])  # quotes kept verbatim, rows not merged
    rte, _ = data.read_split("rte", "train", SAMPLES)
    with open(os.path.join(SAMPLES, "RTE", "train.tsv")) as f:
        assert rte["label"][0] == f.readlines()[1].rstrip("\n").split("\t")[3]
    cola, _ = data.read_split("cola", "train", SAMPLES)  # no header: the first line is data
    first = "Our friends won't buy this analysis, let alone the next one we propose."
    assert cola["sentence"][0] == first


def write(tmp_path, folder, name, text):
    os.makedirs(tmp_path / folder, exist_ok=True)
    (tmp_path / folder / name).write_text(text)
    return str(tmp_path)


RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"


@pytest.mark.parametrize(
    "text,message",
    [
        (RTE_HEADER + "0\ta\tb\tentailment\n1\ta\tb\tc\td\n", "Expected 4 fields in line 3, saw 5"),
        (RTE_HEADER + "0\ta\tb\tmaybe\n", "label 'maybe' is not one of"),
        (RTE_HEADER, "no data rows"),
        ("index\tsentence1\tlabel\n0\ta\tentailment\n", "has no column 'sentence2'"),
    ],
)
def test_bad_rows_are_named_with_their_file(tmp_path, tokenizer, text, message):
    data_dir = write(tmp_path, "RTE", "train.tsv", text)
    with pytest.raises(ValueError, match=message) as error:
        table, path = data.read_split("rte", "train", data_dir)
        data.tokenize(table, path, tokenizer, "rte", 128)
    assert "train.tsv" in str(error.value)


def test_a_field_longer_than_csvs_default_limit_is_read(tmp_path):
    long_sentence = "word " * 40_000  # 200 KB, past Python csv's 128 KiB default
    data_dir = write(
        tmp_path, "RTE", "train.tsv", RTE_HEADER + f"0\t{long_sentence}\tb\tentailment\n"
    )
    assert data.read_split("rte", "train", data_dir)[0]["sentence1"] == [long_sentence]


def test_collate_pads_to_the_longest_in_the_batch_not_to_max_length():
    rows = {
        "input_ids": [[101, 5, 102], [101, 5, 6, 7, 8, 9, 10, 11, 12, 102]],
        "token_type_ids": [[0, 0, 0], [0] * 5 + [1] * 5],
        "label": [1, 0],
    }
    batch = data.collate(rows, pad_token_id=0)
    assert batch["input_ids"].shape == (2, 16)  # longest is 10, rounded up to a multiple of 8
    assert batch["attention_mask"].sum().item() == 13
    assert batch["input_ids"][0, 3:].eq(0).all() and batch["labels"].tolist() == [1, 0]
    assert batch["token_type_ids"][1, 5:10].eq(1).all()


def test_the_fingerprint_changes_with_a_token_or_a_label_and_nothing_else(tmp_path, tokenizer):
    def fingerprint(text):
        table, path = data.read_split(
            "rte", "train", write(tmp_path / text[-12:-1], "RTE", "train.tsv", text)
        )
        return data.fingerprint(data.tokenize(table, path, tokenizer, "rte", 128))

    base = fingerprint(RTE_HEADER + "0\ta cat\tb\tentailment\n")
    assert fingerprint(RTE_HEADER + "7\ta cat\tb\tentailment\n") == base  # the index is no data
    assert fingerprint(RTE_HEADER + "0\ta dog\tb\tentailment\n") != base
    assert fingerprint(RTE_HEADER + "0\ta cat\tb\tnot_entailment\n") != base
