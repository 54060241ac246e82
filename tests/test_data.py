import os

import pytest
from transformers import AutoTokenizer

import data
from conftest import GLUE, SAMPLES, minilm_path, write_rows

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
    task = data.glue_task(task_name, GLUE if (task_name, split, rows) in FULL else SAMPLES, True)
    table = data.read_split(task, split)
    tokens = data.tokenize(table, task, split, tokenizer, 128)
    assert len(table) == len(tokens) == rows
    assert all(1 < n <= 128 for n in data.lengths(tokens))
    if split == "test":
        assert "labels" not in tokens.column_names and "index" in tokens.column_names
    elif task["classes"]:
        assert set(tokens["labels"]) == set(range(len(task["classes"])))
    else:
        labels = tokens["labels"]
        assert all(0.0 <= s <= 5.0 for s in labels) and len(set(labels)) > 1


def test_quirks_bom_quotes_string_labels_and_a_missing_header():
    mrpc = data.read_split(data.glue_task("mrpc", GLUE), "train")
    assert mrpc.column_names[0] == "Quality"  # the byte-order mark is not part of the name
    assert any('"' in s for s in mrpc["#1 String"])  # quotes kept verbatim, rows not merged
    rte = data.read_split(data.glue_task("rte", SAMPLES), "train")
    with open(os.path.join(SAMPLES, "RTE", "train.tsv")) as f:
        assert rte["label"][0] == f.readlines()[1].rstrip("\n").split("\t")[3]
    cola = data.read_split(data.glue_task("cola", SAMPLES), "train")  # the first line is data
    assert (
        cola["sentence"][0]
        == "Our friends won't buy this analysis, let alone the next one we propose."
    )


def write(folder, name, text):
    os.makedirs(folder, exist_ok=True)
    (folder / name).write_text(text)
    return str(folder / name)


RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"


@pytest.mark.parametrize(
    "text,message",
    [
        (RTE_HEADER + "0\ta\tb\tentailment\n1\ta\tb\tc\td\n", "Expected 4 fields in line 3, saw 5"),
        (RTE_HEADER + "0\ta\tb\tmaybe\n", "train.tsv, line 2: the label 'maybe' is not a class"),
        (RTE_HEADER, "no data rows"),
        ("index\tsentence1\tlabel\n0\ta\tentailment\n", "has no column 'sentence2'"),
    ],
)
def test_bad_rows_are_named_with_their_file(tmp_path, tokenizer, text, message):
    write(tmp_path / "RTE", "train.tsv", text)
    task = data.glue_task("rte", str(tmp_path))
    with pytest.raises(ValueError, match=message) as error:
        data.tokenize(data.read_split(task, "train"), task, "train", tokenizer, 128)
    assert "train.tsv" in str(error.value)


def test_a_field_longer_than_csvs_default_limit_is_read(tmp_path):
    long_sentence = "word " * 40_000  # 200 KB, past Python csv's 128 KiB default
    write(tmp_path / "RTE", "train.tsv", RTE_HEADER + f"0\t{long_sentence}\tb\tentailment\n")
    assert data.read_split(data.glue_task("rte", str(tmp_path)), "train")["sentence1"] == [
        long_sentence
    ]


def test_a_changed_file_is_read_afresh_even_with_its_old_size_and_time(tmp_path):
    path = write(tmp_path, "train.tsv", RTE_HEADER + "0\ta\tb\tentailment\n")
    assert data.read_table(path)["label"] == ["entailment"]
    times = os.stat(path)
    (tmp_path / "train.tsv").write_text(RTE_HEADER + "0\ta\tb\tneutralment\n")  # the same size
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert data.read_table(path)["label"] == ["neutralment"]


def test_the_tokenized_cache_follows_the_tokenizer_and_max_seq_length(tmp_path, tokenizer):
    write(
        tmp_path / "RTE",
        "train.tsv",
        RTE_HEADER + "0\t" + "glorptastic words " * 40 + "\tb\tentailment\n",
    )
    task = data.glue_task("rte", str(tmp_path))
    table = data.read_split(task, "train")

    def input_ids(tokenizer, max_seq_length):
        return data.tokenize(table, task, "train", tokenizer, max_seq_length)["input_ids"][0]

    assert [len(input_ids(tokenizer, n)) for n in (32, 64, 32)] == [32, 64, 32]
    other = AutoTokenizer.from_pretrained(minilm_path())
    other.add_tokens(["glorptastic"])  # one new token: other ids for the same text
    assert input_ids(other, 32) != input_ids(tokenizer, 32)


def test_collate_pads_to_the_longest_in_the_batch_not_to_max_length(tokenizer):
    rows = {
        "input_ids": [[101, 5, 102], [101, 5, 6, 7, 8, 9, 10, 11, 12, 102]],
        "token_type_ids": [[0, 0, 0], [0] * 5 + [1] * 5],
        "labels": [1, 0],
        "index": [7, 8],  # a test split's ids, not the model's
    }
    batch = data.collate(rows, tokenizer)
    assert sorted(batch) == ["attention_mask", "input_ids", "labels", "token_type_ids"]
    assert batch["input_ids"].shape == (2, 16)  # longest is 10, rounded up to a multiple of 8
    assert batch["attention_mask"].sum().item() == 13
    assert batch["input_ids"][0, 3:].eq(0).all() and batch["labels"].tolist() == [1, 0]
    assert batch["token_type_ids"][1, 5:10].eq(1).all()


def test_the_fingerprint_changes_with_a_token_or_a_label_and_nothing_else(tmp_path, tokenizer):
    def fingerprint(name, text):
        write(tmp_path / name / "RTE", "train.tsv", RTE_HEADER + text)
        task = data.glue_task("rte", str(tmp_path / name))
        return data.fingerprint(
            data.tokenize(data.read_split(task, "train"), task, "train", tokenizer, 128)
        )

    base = fingerprint("base", "0\ta cat\tb\tentailment\n")
    assert fingerprint("index", "7\ta cat\tb\tentailment\n") == base  # the index is no data
    assert fingerprint("token", "0\ta dog\tb\tentailment\n") != base
    assert fingerprint("label", "0\ta cat\tb\tnot_entailment\n") != base


@pytest.mark.parametrize("kind", ["csv", "tsv", "json", "jsonl"])
def test_own_files_find_their_texts_and_kind_of_label(tmp_path, tokenizer, kind):
    classes = [{"id": i, "review": f"text {i}", "label": ["bad", "good"][i % 2]} for i in range(6)]
    task = data.own_task(
        write_rows(tmp_path / f"a.{kind}", classes),
        write_rows(tmp_path / f"b.{kind}", classes),
        None,
    )
    assert task["texts"] == ["review"] and task["classes"] == ["bad", "good"]
    assert task["metrics"] == ["accuracy", "f1_macro"]
    integers = [{"sentence1": "a", "sentence2": "b", "label": i % 3} for i in range(6)]
    task = data.own_task(
        write_rows(tmp_path / f"c.{kind}", integers),
        write_rows(tmp_path / f"d.{kind}", integers),
        None,
    )
    assert task["texts"] == ["sentence1", "sentence2"] and task["classes"] == ["0", "1", "2"]
    scores = [{"text": "a", "label": i / 4} for i in range(6)]
    task = data.own_task(
        write_rows(tmp_path / f"e.{kind}", scores), write_rows(tmp_path / f"f.{kind}", scores), None
    )
    assert task["classes"] == [] and task["metrics"] == ["pearson", "spearmanr"]
    tokens = data.tokenize(data.read_split(task, "dev"), task, "dev", tokenizer, 32)
    assert tokens["labels"] == [i / 4 for i in range(6)]


@pytest.mark.parametrize(
    "rows,message",
    [
        ([{"text": "a", "score": 1}], "needs a 'label' column and one of text .*'score'"),
        ([{"label": 1, "number": 2}], "needs a 'label' column and one of text"),
        (
            [{"text": "a", "label": "good"}, {"text": "b", "label": 3}],
            "make the labels one kind, of 2\\+ values",
        ),
    ],
)
def test_own_files_without_what_a_run_needs_are_refused(tmp_path, rows, message):
    path = write_rows(tmp_path / "train.csv", rows)
    with pytest.raises(ValueError, match=message):
        data.own_task(path, path, None)


def test_an_unsupported_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="give a .tsv, .csv, .json or .jsonl file"):
        data.read_table(write(tmp_path, "train.xlsx", "label\n1\n"))


def test_a_json_key_of_lists_or_numbers_is_no_text(tmp_path):
    rows = [
        {"id": 1, "tags": ["a"], "text": "good film", "label": "a"},
        {"id": 2, "tags": [], "text": "bad", "label": "b"},
    ]
    path = write_rows(tmp_path / "train.jsonl", rows)
    assert data.own_task(path, path, None)["texts"] == ["text"]


@pytest.mark.parametrize("first", [0, 2])  # a null before any word too: no column of numbers
def test_a_json_null_text_is_an_empty_text(tmp_path, tokenizer, first):
    rows = [{"text": "good film", "label": "a"}, {"text": None, "label": "b"}, {"label": "a"}]
    rows = rows[first:] + rows[:first]
    path = write_rows(tmp_path / "train.jsonl", rows)
    task = data.own_task(path, path, None)
    assert task["texts"] == ["text"]
    table = data.tokenize(data.read_split(task, "train"), task, "train", tokenizer, 32)
    assert [len(ids) for ids in table["input_ids"]].count(len(tokenizer("")["input_ids"])) == 2
    assert table["labels"] == [0 if row["label"] == "a" else 1 for row in rows]
