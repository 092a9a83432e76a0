"""Synthetic and small real tasks that test how far back a sequence model remembers.

Every generator is deterministic in its `seed` and returns a `MemoryTask`: a train and a test split of
`SequenceData`, each with inputs, per-position targets and a mask of the positions that are scored. Tasks scored once
per sequence (the adding problem, digit classification) put their target at the last step and mask everything else,
so every task trains and evaluates the same way: per-position outputs, loss and metric on masked positions only.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from sklearn.datasets import load_digits


@dataclass
class SequenceData:
    """One split: `inputs` (N, T) token ids or (N, T, F) features; `targets` (N, T) class ids or values, meaningful
    where `mask` (N, T) is True."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: torch.Tensor | slice) -> "SequenceData":
        return SequenceData(self.inputs[index], self.targets[index], self.mask[index])


@dataclass
class MemoryTask:
    """A task's splits and the sizes a model needs to read and answer it.

    input_size: vocabulary size for token inputs, features per step otherwise.
    output_size: number of classes, or 1 for regression.
    metric: "accuracy" (classes, higher is better) or "mse" (regression, lower is better).
    """

    train: SequenceData
    test: SequenceData
    input_size: int
    output_size: int
    metric: Literal["accuracy", "mse"]

    @property
    def token_inputs(self) -> bool:
        return not self.train.inputs.is_floating_point()

    @property
    def length(self) -> int:
        return self.train.inputs.shape[1]


def multi_query_associative_recall(
    vocab_size: int, length: int, num_pairs: int, num_train: int, num_test: int, seed: int = 0, power_a: float = 0.01
) -> MemoryTask:
    """Multi-query associative recall (MQAR) as built in Zoology (Arora et al., 2023).

    A sequence starts with `num_pairs` key-value pairs `k1 v1 k2 v2 ...` (distinct keys from the lower half of the
    vocabulary, excluding 0; distinct values from the upper half). The rest of the sequence is random tokens with
    every key queried once, in random order, at even offsets: the query gaps are drawn without replacement with
    probability proportional to gap^(power_a - 1), so most queries come soon after the pairs and a few come late.
    The target at a query position is the value paired with that key (the next token in Zoology's language-model
    framing); only query positions are scored.
    """
    context = 2 * num_pairs
    key_vocab = vocab_size // 2
    slots = (length - context) // 2
    if num_pairs > key_vocab - 1 or num_pairs > vocab_size - key_vocab:
        raise ValueError(f"vocab_size={vocab_size} is too small for num_pairs={num_pairs} distinct keys and values.")
    if slots < num_pairs:
        raise ValueError(f"length={length} leaves room for fewer than num_pairs={num_pairs} queries (needs 4x).")
    generator = torch.Generator().manual_seed(seed)
    count = num_train + num_test
    keys = 1 + _distinct(count, key_vocab - 1, num_pairs, generator)
    values = key_vocab + _distinct(count, vocab_size - key_vocab, num_pairs, generator)
    inputs = torch.randint(vocab_size, (count, length), generator=generator)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    gap_weights = power_a * torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(gap_weights.expand(count, slots), num_pairs, replacement=False, generator=generator)
    queries = context + 2 * gaps
    inputs.scatter_(1, queries, keys)
    targets = torch.zeros_like(inputs).scatter_(1, queries, values)
    mask = torch.zeros_like(inputs, dtype=torch.bool).scatter_(1, queries, True)
    return _split(SequenceData(inputs, targets, mask), num_train, vocab_size, vocab_size, "accuracy")


NOISE_TOKEN, RECALL_TOKEN = 0, 1


def selective_copying(
    length: int, num_memorize: int, num_data_tokens: int, num_train: int, num_test: int, seed: int = 0
) -> MemoryTask:
    """Selective copying (as in the Mamba paper, Gu & Dao 2023): remember scattered tokens, recall them at the end.

    The first `length - num_memorize` positions are noise tokens (id 0) among which `num_memorize` data tokens (ids
    2 .. num_data_tokens + 1) sit at random positions. The last `num_memorize` positions hold the recall token (id 1);
    their targets are the data tokens in the order they appeared, and only they are scored.
    """
    body = length - num_memorize
    if body < num_memorize:
        raise ValueError(f"length={length} must be at least 2 * num_memorize={2 * num_memorize}.")
    generator = torch.Generator().manual_seed(seed)
    count = num_train + num_test
    positions = _distinct(count, body, num_memorize, generator).sort(dim=1).values
    data = 2 + torch.randint(num_data_tokens, (count, num_memorize), generator=generator)
    inputs = torch.full((count, length), NOISE_TOKEN)
    inputs.scatter_(1, positions, data)
    inputs[:, body:] = RECALL_TOKEN
    targets = torch.zeros_like(inputs)
    targets[:, body:] = data
    mask = torch.zeros_like(inputs, dtype=torch.bool)
    mask[:, body:] = True
    vocab_size = num_data_tokens + 2
    return _split(SequenceData(inputs, targets, mask), num_train, vocab_size, vocab_size, "accuracy")


def adding_problem(length: int, num_train: int, num_test: int, seed: int = 0) -> MemoryTask:
    """The adding problem (Hochreiter & Schmidhuber, 1997; as in Arjovsky et al., 2016).

    Each step has two features: a value drawn uniformly from [0, 1] and a marker, 1 at exactly two steps (one in each
    half of the sequence) and 0 elsewhere. The target, scored at the last step only, is the sum of the two marked
    values. Always answering 1 gives an MSE of 1/6 (the variance of the sum); that is the score to beat.
    """
    generator = torch.Generator().manual_seed(seed)
    count = num_train + num_test
    values = torch.rand(count, length, generator=generator)
    half = length // 2
    first = torch.randint(half, (count, 1), generator=generator)
    second = half + torch.randint(length - half, (count, 1), generator=generator)
    markers = torch.zeros(count, length).scatter_(1, first, 1.0).scatter_(1, second, 1.0)
    targets = torch.zeros(count, length)
    targets[:, -1] = (values.gather(1, first) + values.gather(1, second)).squeeze(1)
    inputs = torch.stack([values, markers], dim=-1)
    return _split(SequenceData(inputs, targets, _last_step(count, length)), num_train, 2, 1, "mse")


DIGIT_PIXELS = 64


def digit_permutation(seed: int = 0) -> torch.Tensor:
    """The fixed pixel order of the permuted digits task."""
    return torch.randperm(DIGIT_PIXELS, generator=torch.Generator().manual_seed(seed))


def sequential_digits(
    order: Literal["plain", "permuted"] = "plain", test_fraction: float = 0.2, seed: int = 0
) -> MemoryTask:
    """Sequential digit classification: scikit-learn's bundled 8x8 digits (1797 images) read one pixel per step.

    The 64 pixels (scaled to [0, 1]) are read row by row ("plain") or in the fixed order `digit_permutation(seed)`
    ("permuted", the harder variant of permuted sequential MNIST: neighbouring pixels end up far apart in time). The
    class (0-9) is scored at the last step. Both orders share the same train/test split, drawn from `seed`.
    """
    if order not in ("plain", "permuted"):
        raise ValueError(f'order must be "plain" or "permuted", got {order!r}.')
    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32).reshape(-1, DIGIT_PIXELS, 1) / 16.0
    if order == "permuted":
        pixels = pixels[:, digit_permutation(seed)]
    count = pixels.shape[0]
    targets = torch.zeros(count, DIGIT_PIXELS, dtype=torch.long)
    targets[:, -1] = torch.tensor(digits.target)
    shuffled = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    data = SequenceData(pixels, targets, _last_step(count, DIGIT_PIXELS))[shuffled]
    return _split(data, count - round(count * test_fraction), 1, 10, "accuracy")


def _distinct(count: int, population: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(count, size) indices into range(population), distinct within each row, in random order (rows in blocks, so
    that vocabularies of thousands and 100k rows fit in memory)."""
    block = max(1, 2**24 // population)
    return torch.cat(
        [
            torch.rand(min(block, count - start), population, generator=generator).topk(size, dim=1).indices
            for start in range(0, count, block)
        ]
    )


def _last_step(count: int, length: int) -> torch.Tensor:
    mask = torch.zeros(count, length, dtype=torch.bool)
    mask[:, -1] = True
    return mask


def _split(data: SequenceData, num_train: int, input_size: int, output_size: int, metric: str) -> MemoryTask:
    return MemoryTask(data[:num_train], data[num_train:], input_size, output_size, metric)


__all__ = [
    "MemoryTask",
    "SequenceData",
    "adding_problem",
    "digit_permutation",
    "multi_query_associative_recall",
    "selective_copying",
    "sequential_digits",
]
