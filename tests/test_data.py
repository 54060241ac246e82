import os

import numpy as np
import pytest

import data
from conftest import GLUE, SAMPLES

FULL = [
    ("mrpc", "train", 3668),
    ("mrpc", "validation", 408),
    ("mrpc", "test", 1725),
    ("sst2", "train", 67349),
    ("sst2", "validation", 872),
    ("sst2", "test", 1821),
]
# The samples are the first 41 lines of each file: 40 rows after a header, 41 in CoLA's headerless train/dev.
SAMPLE = [
    (task, split, rows + (task == "cola" and split != "test"))
    for task in ("cola", "rte", "stsb", "wnli", "qnli")
    for split, rows in (("train", 40), ("validation", 40), ("test", 20))
    if not (task == "qnli" and split == "test")
]


@pytest.mark.parametrize("task_name,split,rows", FULL + SAMPLE)
def test_every_format_parses_with_its_row_count(task_name, split, rows):
    split_data = data.load_split(
        task_name, split, GLUE if (task_name, split, rows) in FULL else SAMPLES
    )
    task = data.TASKS[task_name]
    assert len(split_data["text_a"]) == len(split_data["index"]) == rows
    assert all(isinstance(t, str) and t for t in split_data["text_a"])
    assert (split_data["text_b"] is None) == (task["columns"][1] is None)
    if split == "test":
        assert split_data["label"] is None
    elif task["labels"] is None:
        assert (
            all(0.0 <= s <= 5.0 for s in split_data["label"]) and len(set(split_data["label"])) > 1
        )
    else:
        assert set(split_data["label"]) == set(range(len(task["labels"])))


def test_quirks_bom_quotes_and_string_labels():
    mrpc = data.load_split("mrpc", "train", GLUE)
    assert not mrpc["text_a"][0].startswith("\ufeff")
    assert any('"' in s for s in mrpc["text_a"])  # quotes kept verbatim, rows not merged
    rte = data.load_split("rte", "train", SAMPLES)
    with open(os.path.join(SAMPLES, "RTE", "train.tsv")) as f:
        first = f.readlines()[1].rstrip("\n").split("\t")
    assert rte["label"][0] == data.TASKS["rte"]["labels"].index(first[3])
    cola = data.load_split("cola", "train", SAMPLES)  # no header: the first line is data
    assert (
        cola["text_a"][0]
        == "Our friends won't buy this analysis, let alone the next one we propose."
    )


def write(tmp_path, folder, name, text):
    os.makedirs(tmp_path / folder, exist_ok=True)
    (tmp_path / folder / name).write_text(text)
    return str(tmp_path)


@pytest.mark.parametrize(
    "text,message",
    [
        ("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n", "line 3: 3 columns"),
        ("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n", "label 'maybe' is not one of"),
        ("index\tsentence1\tsentence2\tlabel\n", "no data rows"),
        ("index\tsentence1\tlabel\n0\ta\tentailment\n", r"no column \['sentence2'\]"),
    ],
)
def test_bad_rows_are_named_with_file_and_line(tmp_path, text, message):
    data_dir = write(tmp_path, "RTE", "train.tsv", text)
    with pytest.raises(ValueError, match=message) as error:
        data.load_split("rte", "train", data_dir)
    assert "train.tsv" in str(error.value)


def test_stsb_scores_must_be_numbers_in_range(tmp_path):
    header = (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    )
    for score, message in (("high", "is not a number"), ("7.5", "outside the STS-B range")):
        data_dir = write(
            tmp_path, "STS-B", "dev.tsv", header + f"0\tg\tf\ty\t1\tn\tn\ta\tb\t{score}\n"
        )
        with pytest.raises(ValueError, match=message):
            data.load_split("stsb", "validation", data_dir)


def test_missing_file_and_unknown_task():
    with pytest.raises(ValueError, match="missing data file"):
        data.load_split("qqp", "train", GLUE)
    with pytest.raises(ValueError, match="unknown task 'glue'"):
        data.get_task("glue")


def test_collate_pads_to_the_longest_in_batch_not_max_length():
    examples = [
        {"input_ids": [101, 5, 102], "token_type_ids": [0, 0, 0], "label": 1},
        {
            "input_ids": [101, 5, 6, 7, 8, 9, 10, 11, 12, 102],
            "token_type_ids": [0] * 5 + [1] * 5,
            "label": 0,
        },
    ]
    batch = data.collate(examples, pad_token_id=0)
    assert batch["input_ids"].shape == (2, 16)  # longest is 10, rounded up to a multiple of 8
    assert batch["attention_mask"].sum().item() == 13
    assert batch["input_ids"][0, 3:].eq(0).all() and batch["labels"].tolist() == [1, 0]
    assert batch["token_type_ids"][1, 5:10].eq(1).all()


def plan(lengths, batch, accumulation, world_size, rank, seed, epoch, group_by_length):
    return data.epoch_plan(
        lengths,
        per_device_batch=batch,
        accumulation=accumulation,
        world_size=world_size,
        rank=rank,
        seed=seed,
        epoch=epoch,
        group_by_length=group_by_length,
    )


def flatten(plan):
    return [i for _, micro in plan for ids in micro for i in ids]


@pytest.mark.parametrize("group_by_length", [False, True])
@pytest.mark.parametrize("n,batch,accumulation", [(103, 4, 1), (103, 4, 3), (64, 8, 2), (7, 1, 2)])
def test_epoch_plan_covers_every_example_once_whatever_the_world_size(
    n, batch, accumulation, group_by_length
):
    lengths = list(np.random.default_rng(1).integers(5, 100, n))
    plans = {}
    for world in (1, 2):
        ranks = [
            plan(lengths, batch * (2 // world), accumulation, world, r, 0, 3, group_by_length)
            for r in range(world)
        ]
        steps = {len(p) for p in ranks}
        assert len(steps) == 1  # every rank runs the same number of steps...
        assert steps == {data.steps_per_epoch(n, batch * 2 * accumulation, world)}
        for step in range(steps.pop()):
            assert len({len(p[step][1]) for p in ranks}) == 1  # ...and micro-steps in each
            assert all(len(ids) >= 1 for p in ranks for ids in p[step][1])
            assert sum(len(ids) for p in ranks for ids in p[step][1]) == ranks[0][step][0]
        seen = sorted(i for p in ranks for i in flatten(p))
        assert (
            len(seen) == len(set(seen)) and n - len(seen) < world
        )  # only a tail smaller than the world is dropped
        plans[world] = [
            sorted(i for p in ranks for _, micro in [p[s]] for ids in micro for i in ids)
            for s in range(len(ranks[0]))
        ]
    assert plans[1][:-1] == plans[2][:-1]  # the same examples in each step at world size 1 and 2


def test_epoch_plan_reshuffles_each_epoch_and_groups_lengths():
    lengths = list(np.random.default_rng(2).integers(5, 200, 2000))
    first, again, second = (flatten(plan(lengths, 16, 1, 1, 0, 7, e, False)) for e in (0, 0, 1))
    assert first == again and first != second

    def padding(plan):
        return sum(
            len(ids) * max(lengths[i] for i in ids) - sum(lengths[i] for i in ids)
            for _, m in plan
            for ids in m
        )

    grouped = plan(lengths, 16, 1, 1, 0, 7, 0, True)
    assert padding(grouped) < 0.2 * padding(plan(lengths, 16, 1, 1, 0, 7, 0, False))


@pytest.mark.parametrize("group_by_length", [False, True])
def test_the_step_with_the_longest_example_comes_first(group_by_length):
    """So that an out-of-memory error shows at the first step, not deep into an epoch."""
    lengths = list(np.random.default_rng(3).integers(5, 100, 500))
    lengths[417] = 128
    for epoch in range(3):
        first_step = plan(lengths, 8, 1, 1, 0, 0, epoch, group_by_length)[0]
        assert 417 in first_step[1][0]
