"""Text data for PMG language models: corpora, a trained byte-level BPE tokenizer, and packing into blocks.

Everything goes through `datasets` (loading, `map` with batching, caching and `num_proc`) and `tokenizers`; nothing
here is imported by the modeling files.
"""

import gzip
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SHAKESPEARE_PATH = Path(__file__).parent / "corpora" / "shakespeare.jsonl.gz"
# whole works held out, one of each dramatic genre per split: no line of them is ever trained on
VALIDATION_WORKS = ("macbeth", "twelfth_night", "richard_ii")
TEST_WORKS = ("julius_caesar", "as_you_like_it", "henry_iv_part_1")
# prompts for sample generations from models trained on the embedded plays (speaker names open every speech)
SHAKESPEARE_PROMPTS = ("KING HENRY.\n", "LADY MACBETH.\n", "ROMEO.\nBut soft,")
GENRES = ("comedy", "history", "tragedy")  # of the plays, as the First Folio groups them
END_OF_TEXT = "<|endoftext|>"
FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_shakespeare() -> DatasetDict:
    """The embedded corpus (42 works, see corpora/NOTICE.md) as train / validation / test splits of whole works."""
    works = load_dataset("json", data_files=str(SHAKESPEARE_PATH), split="train")
    held_out = set(VALIDATION_WORKS) | set(TEST_WORKS)
    return DatasetDict(
        train=works.filter(lambda work: work not in held_out, input_columns="work"),
        validation=works.filter(lambda work: work in VALIDATION_WORKS, input_columns="work"),
        test=works.filter(lambda work: work in TEST_WORKS, input_columns="work"),
    )


def load_genre_passages(passage_chars: int = 600, passages_per_play: int = 64) -> DatasetDict:
    """The embedded plays as a genre classification task: passages of whole lines (about `passage_chars`
    characters, from the first act on) labelled comedy, history or tragedy, `passages_per_play` of them spread evenly
    through each play. Splits keep whole plays apart (the held-out works of `load_shakespeare`); poems are left out.
    """
    if passage_chars < 1 or passages_per_play < 1:
        raise ValueError(
            f"passage_chars and passages_per_play must be positive, got {passage_chars}, {passages_per_play}."
        )
    labels = ClassLabel(names=list(GENRES))

    def passages(batch: dict) -> dict:
        rows = {"text": [], "label": [], "work": []}
        for work, genre, text in zip(batch["work"], batch["genre"], batch["text"], strict=True):
            cut = _passages_of(text, passage_chars)
            step = max(1, len(cut) // passages_per_play)
            chosen = cut[::step][:passages_per_play]
            rows["text"] += chosen
            rows["label"] += [labels.str2int(genre)] * len(chosen)
            rows["work"] += [work] * len(chosen)
        return rows

    def to_passages(works: Dataset) -> Dataset:
        plays = works.filter(lambda genre: genre in GENRES, input_columns="genre")
        rows = plays.map(passages, batched=True, remove_columns=plays.column_names)
        return rows.cast_column("label", labels)

    return DatasetDict({split: to_passages(works) for split, works in load_shakespeare().items()})


def _passages_of(text: str, passage_chars: int) -> list[str]:
    """Consecutive runs of whole lines of at least `passage_chars` characters, skipping the front matter (title and
    list of characters) up to the first act."""
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if line.strip().upper().startswith("ACT I")), 0)
    result, current = [], []
    for line in lines[start:]:
        current.append(line)
        if sum(len(part) + 1 for part in current) >= passage_chars:
            result.append("\n".join(current).strip())
            current = []
    return [passage for passage in result if passage]


def check_data_sources(
    dataset_name: str | None, data_files: list[str] | None, validation_files: list[str] | None
) -> None:
    """One source of data: a Hub dataset or local files, validation files only beside training files."""
    if dataset_name and data_files:
        raise ValueError("Pass either dataset_name or data_files (--train_files), not both.")
    if validation_files and not data_files:
        raise ValueError("validation_files need training files (data_files, --train_files) beside them.")


def load_text_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    data_files: list[str] | None = None,
    text_column: str = "text",
    streaming: bool = False,
    validation_files: list[str] | None = None,
    validation_fraction: float = 0.05,
    validation_documents: int = 100,
    seed: int = 0,
) -> DatasetDict | IterableDatasetDict:
    """A text corpus with "train" and "validation" splits: a Hub dataset by name, local files, or the embedded plays.

    Local files are read by the `datasets` builder their extension names (.txt, .json/.jsonl, .parquet, .csv); the
    documents of .txt files are their paragraphs, or their lines where a file has no blank line (`text_documents`).
    `validation_files` (with `data_files`) are the validation split; without any validation split, one is cut from
    the training documents: `validation_fraction` of them, or the first `validation_documents` when streaming.
    """
    check_data_sources(dataset_name, data_files, validation_files)
    if dataset_name:
        corpus = load_dataset(dataset_name, dataset_config_name, streaming=streaming)
    elif data_files:
        every_file = [*data_files, *(validation_files or [])]
        empty = [path for path in every_file if Path(path).is_file() and Path(path).stat().st_size == 0]
        if empty:
            raise ValueError(f"Empty corpus: {empty} hold no text.")
        splits = {"train": list(data_files), **({"validation": list(validation_files)} if validation_files else {})}
        builder = file_builder(every_file)
        options = {"sample_by": text_documents(every_file)} if builder == "text" else {}
        corpus = load_dataset(builder, data_files=splits, streaming=streaming, **options)
    else:
        corpus = load_shakespeare()
        if streaming:
            corpus = IterableDatasetDict({split: data.to_iterable_dataset() for split, data in corpus.items()})
    if "train" not in corpus:
        raise ValueError(f"The dataset has no 'train' split; its splits are {list(corpus)}.")
    if isinstance(corpus["train"], Dataset) and len(corpus["train"]) == 0:
        raise ValueError("Empty corpus: the training split has no documents.")
    columns = corpus["train"].column_names
    if columns is not None and text_column not in columns:
        raise ValueError(f"The dataset has no text column {text_column!r}; its columns are {columns}.")
    if "validation" not in corpus:
        corpus = _split_off_validation(corpus, validation_fraction, validation_documents, seed)
    return corpus


def text_documents(paths: list[str], chunk_size: int = 1 << 20) -> str:
    """How `datasets`' text builder should cut these files into documents: "paragraph" (blank-line separated, lines
    and newlines kept together) when every file has a blank line, else "line" (a file of one document per line).
    Line by line, prose would become one document per line, each ended by an end-of-text token and shuffled apart
    from its neighbours; paragraph by paragraph, a file without blank lines would be one document. Each file is read
    up to its first blank line."""
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace", newline=None) as file:
            tail = ""
            while chunk := file.read(chunk_size):
                if "\n\n" in tail + chunk:
                    break
                tail = chunk[-1:]
            else:
                return "line"
    return "paragraph"


def file_builder(data_files: list[str]) -> str:
    """The `datasets` builder ("text", "json", "parquet", "csv") for local files, from their common extension."""
    extensions = {Path(path.removesuffix(".gz")).suffix for path in data_files}
    if len(extensions) != 1 or (extension := extensions.pop()) not in FILE_BUILDERS:
        raise ValueError(
            f"Cannot tell how to read {data_files}: use files of one type among {sorted(FILE_BUILDERS)} "
            "(optionally gzipped)."
        )
    return FILE_BUILDERS[extension]


def _split_off_validation(
    corpus: DatasetDict | IterableDatasetDict, fraction: float, documents: int, seed: int
) -> DatasetDict | IterableDatasetDict:
    train = corpus["train"]
    if isinstance(train, IterableDataset):
        rest = train.skip(documents)
        if next(iter(rest), None) is None:  # reads the stream's first documents, not all of it
            raise ValueError(
                f"The stream holds at most {documents} documents, the number a stream without a validation split "
                "holds back for validation, so none is left to train on: give more data or a validation split "
                "(validation files, or a dataset that has one)."
            )
        return IterableDatasetDict(train=rest, validation=train.take(documents))
    if len(train) < 2:
        raise ValueError(f"Cannot split a validation set off a training split of {len(train)} document(s).")
    split = train.train_test_split(test_size=fraction, seed=seed)
    return DatasetDict(train=split["train"], validation=split["test"])


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (no unknown tokens) with `<|endoftext|>` as bos, eos and pad token."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes and <|endoftext|>), got {vocab_size}.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT
    )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained`, with an error that says a missing local folder is missing.

    transformers speaks only of the Hub when a name is neither a folder nor reachable there, for what is most often
    a mistyped local path (the default checkpoints are written by `scripts/train.py`).
    """
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as error:
        if Path(name_or_path).exists():
            raise
        raise OSError(
            f"No folder {name_or_path!r} here, and no Hub repository of that name could be loaded "
            f"({type(error).__name__}). The default checkpoint is written by `python scripts/train.py`."
        ) from error


def iterate_texts(
    dataset: Dataset | IterableDataset,
    text_column: str = "text",
    batch_size: int = 64,
    max_documents: int | None = None,
) -> Iterator[list[str]]:
    """Batches of texts (at most `max_documents` in all), for `train_tokenizer` without holding the corpus in one
    list; streamed datasets are read from their start."""
    if max_documents is not None:
        dataset = (
            dataset.take(max_documents)
            if isinstance(dataset, IterableDataset)
            else dataset.select(range(min(max_documents, len(dataset))))
        )
    for batch in dataset.select_columns([text_column]).iter(batch_size=batch_size):
        yield batch[text_column]


def pack_dataset(
    dataset: Dataset | IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    text_column: str = "text",
    document_resets: bool = False,
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
    """Tokenize documents (each followed by eos) and cut their concatenation into blocks of `block_size` tokens.

    Returns columns `input_ids` and `labels` (equal: the model shifts inside). With `document_resets`, also
    `position_ids` that restart at 0 where a document starts inside a block, so PMG memories reset there and
    attention stays inside documents; otherwise documents flow into each other as one stream. Documents are packed
    1,000 at a time, as transformers' examples pack them, and the incomplete last block of each such group is
    dropped: under one block per 1,000 documents (0.2-1.2% of the tokens of a corpus of one paragraph per line, at
    blocks of 256-1024). Larger groups drop less but hold more tokens in memory per process.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}.")
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer needs an eos token to mark document ends.")
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict) -> dict:
        texts = [text for text in batch[text_column] if text is not None]  # a null cell holds no document
        ids = [[*document, eos] for document in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        tokenized = {"input_ids": ids}
        if document_resets:
            tokenized["position_ids"] = [list(range(len(document))) for document in ids]
        return tokenized

    def group(batch: dict) -> dict:
        blocks = {}
        for column, documents in batch.items():
            stream = list(chain.from_iterable(documents))
            usable = len(stream) - len(stream) % block_size
            blocks[column] = [stream[start : start + block_size] for start in range(0, usable, block_size)]
        blocks["labels"] = [list(block) for block in blocks["input_ids"]]
        return blocks

    parallel = {"num_proc": num_proc} if isinstance(dataset, Dataset) else {}
    # other columns (ids, metadata) would be cut into blocks too; streamed datasets may not even list them
    texts = dataset.select_columns([text_column])
    tokenized = texts.map(tokenize, batched=True, remove_columns=[text_column], **parallel)
    packed = tokenized.map(group, batched=True, batch_size=1000, **parallel)
    if isinstance(packed, Dataset) and len(packed) == 0:
        total = sum(len(ids) for ids in tokenized["input_ids"])
        raise ValueError(
            f"The corpus has {total} tokens, fewer than one block of {block_size}: use shorter blocks "
            "(--block_size; --max_length in fine-tuning) or more data."
        )
    return packed
