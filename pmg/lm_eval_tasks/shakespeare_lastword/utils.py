"""Data loading for the `shakespeare_lastword` task (referenced from its YAML as `!function utils.load_examples`)."""

import json
from pathlib import Path

from datasets import Dataset, DatasetDict

EXAMPLES_PATH = Path(__file__).with_name("shakespeare_lastword.jsonl")


def load_examples(**kwargs) -> DatasetDict:
    """The examples file next to this module as a "test" split, wherever the harness runs from.

    lm-eval passes `dataset_kwargs: data_files` to `datasets.load_dataset` unchanged, so a relative path there would
    be read from the working directory; this loader resolves the file itself. `kwargs` (the task's metadata and
    dataset_kwargs, which the harness passes to every custom loader) are unused.
    """
    with EXAMPLES_PATH.open(encoding="utf-8") as file:
        return DatasetDict(test=Dataset.from_list([json.loads(line) for line in file]))
