"""The configurations that benchmarks/glue_results.py runs on GLUE: plain dicts of train_glue.py
flags, read by that script and nothing else.

A configuration maps a flag name of train_glue.py (without the leading "--") to its value:
True means a switch that is given (--bf16); any other value is passed as `--name value`.

"per_device_train_batch_size" here is the batch of a one-process run, which is also the global
batch of every run: glue_results.py divides it among the processes it starts (16 per process
with 2), so the optimizer sees the same batch whatever --nproc_per_node is.
"""

TASKS = ["cola", "sst2", "mrpc", "stsb", "rte", "wnli"]

# -------------------------------------------------------------------------------------------------
# (a) "HF defaults": Hugging Face TrainingArguments' learning rate and epochs (5e-5, 3), with the
# batch, bf16, warmup and weight decay that GLUE fine-tuning scripts commonly add (TrainingArguments
# itself has batch 8, no warmup and no weight decay). The same for every task.
# -------------------------------------------------------------------------------------------------
DEFAULTS = {
    "per_device_train_batch_size": 32,
    "learning_rate": 5e-5,
    "num_train_epochs": 3,
    "bf16": True,
    "warmup_ratio": 0.1,
    "weight_decay": 0.01,
    # The first seed; glue_results.py replaces it with each seed of SEEDS[task].
    "seed": 42,
}

# -------------------------------------------------------------------------------------------------
# (b) "Our recipe": one configuration per task.
#
# PLACEHOLDERS: every entry below is still a copy of DEFAULTS. Nothing has been searched yet, and
# no value here is a result.
#
# How the values are to be chosen: for each task, run the candidates of SEARCH[task] (at most 6
# configurations, one seed each) and keep the one with the best dev score on the task's main
# metric (the first one results.md shows), e.g.
#
#     python benchmarks/glue_results.py --tasks rte --configs search
#
# The grid the candidates come from: learning rate in {5e-5, 1e-4, 2e-4}, epochs in {3, 5},
# batch in {16, 32}; everything else as in DEFAULTS. Write the chosen flags into RECIPES[task],
# then run `--configs defaults,recipe` to compare (a) and (b) over SEEDS[task].
#
# Note: the search picks on the same dev set the final table reports, so (b)'s dev score is
# slightly optimistic; with one seed per candidate, a winner within the seed noise of (a) is
# not evidence that (b) is better.
# -------------------------------------------------------------------------------------------------
RECIPES = {
    "cola": dict(DEFAULTS),  # PLACEHOLDER: choose from SEARCH["cola"]
    "sst2": dict(DEFAULTS),  # PLACEHOLDER: choose from SEARCH["sst2"]
    "mrpc": dict(DEFAULTS),  # PLACEHOLDER: choose from SEARCH["mrpc"]
    "stsb": dict(DEFAULTS),  # PLACEHOLDER: choose from SEARCH["stsb"]
    "rte": dict(DEFAULTS),  # PLACEHOLDER: choose from SEARCH["rte"]
    "wnli": dict(DEFAULTS),  # PLACEHOLDER: choose from SEARCH["wnli"]
}


def candidate(learning_rate, epochs, batch):
    """One search candidate: DEFAULTS with these three flags changed."""
    flags = dict(DEFAULTS)
    flags["learning_rate"] = learning_rate
    flags["num_train_epochs"] = epochs
    flags["per_device_train_batch_size"] = batch
    return flags


# The full grid has 3 x 2 x 2 = 12 points; the budget is 6 per task, so each task gets the half
# that its size makes worth trying (a judgement call, to revisit).
#
# The small tasks (CoLA 8.5k, MRPC 3.7k, STS-B 5.7k, RTE 2.5k, WNLI 635 training examples): batch
# 16, which gives twice the optimizer steps of batch 32 on so little data, with every learning
# rate and both epoch counts.
SMALL_TASK_SEARCH = [
    candidate(learning_rate=5e-5, epochs=3, batch=16),
    candidate(learning_rate=1e-4, epochs=3, batch=16),
    candidate(learning_rate=2e-4, epochs=3, batch=16),
    candidate(learning_rate=5e-5, epochs=5, batch=16),
    candidate(learning_rate=1e-4, epochs=5, batch=16),
    candidate(learning_rate=2e-4, epochs=5, batch=16),
]

# SST-2 (67k examples) has plenty of steps at either batch, and 5 epochs would cost hours more
# per candidate on a CPU: 3 epochs, every learning rate, both batches. The sixth point of that
# half, (5e-5, 3 epochs, batch 32), is DEFAULTS itself: its seed-42 run under `--configs
# defaults` is that candidate, so it is not run twice (compare against it when choosing).
SST2_SEARCH = [
    candidate(learning_rate=5e-5, epochs=3, batch=16),
    candidate(learning_rate=1e-4, epochs=3, batch=16),
    candidate(learning_rate=2e-4, epochs=3, batch=16),
    candidate(learning_rate=1e-4, epochs=3, batch=32),
    candidate(learning_rate=2e-4, epochs=3, batch=32),
]

SEARCH = {
    "cola": SMALL_TASK_SEARCH,
    "sst2": SST2_SEARCH,
    "mrpc": SMALL_TASK_SEARCH,
    "stsb": SMALL_TASK_SEARCH,
    "rte": SMALL_TASK_SEARCH,
    "wnli": SMALL_TASK_SEARCH,
}

# -------------------------------------------------------------------------------------------------
# Seeds: three on the small tasks, whose dev scores can move by points from seed to seed; one on
# SST-2, whose runs take hours on this machine.
# -------------------------------------------------------------------------------------------------
SEEDS = {
    "cola": [42, 43, 44],
    "sst2": [42],
    "mrpc": [42, 43, 44],
    "stsb": [42, 43, 44],
    "rte": [42, 43, 44],
    "wnli": [42, 43, 44],
}
