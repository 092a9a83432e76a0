"""Data loading for the `shakespeare_lastword` task (referenced from its YAML as `!function utils.load_examples`)."""

import json
from pathlib import Path

from datasets import Dataset, DatasetDict

EXAMPLES_PATH = Path(__file__).with_name("shakespeare_lastword.jsonl")


def load_examples(**kwargs) -> DatasetDict:
    """The examples file next to this module as its "test" and "validation" (few-shot) splits, wherever the harness
    runs from.

    lm-eval passes `dataset_kwargs: data_files` to `datasets.load_dataset` unchanged, so a relative path there would
    be read from the working directory; this loader resolves the file itself. `kwargs` (the task's metadata and
    dataset_kwargs, which the harness passes to every custom loader) are unused.
    """
    with EXAMPLES_PATH.open(encoding="utf-8") as file:
        examples = [json.loads(line) for line in file]
    return DatasetDict(
        {
            split: Dataset.from_list([example for example in examples if example["split"] == split])
            for split in ("test", "validation")
        }
    )
