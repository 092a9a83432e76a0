"""Corpora, tokenizer training and packing into blocks."""

import json
from collections import Counter

import pytest
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

from pmg.data import (
    END_OF_TEXT,
    TEST_WORKS,
    VALIDATION_WORKS,
    iterate_texts,
    load_shakespeare,
    load_text_dataset,
    pack_dataset,
    train_tokenizer,
)
from pmg.pretraining import bytes_per_token


@pytest.fixture(scope="module")
def shakespeare():
    return load_shakespeare()


@pytest.fixture(scope="module")
def tokenizer(shakespeare):
    return train_tokenizer(iterate_texts(shakespeare["train"]), vocab_size=1024)


def test_shakespeare_splits_hold_out_whole_works_of_every_genre(shakespeare):
    works = {split: set(data["work"]) for split, data in shakespeare.items()}
    assert sum(len(names) for names in works.values()) == 42
    assert works["validation"] == set(VALIDATION_WORKS) and works["test"] == set(TEST_WORKS)
    assert not works["train"] & (works["validation"] | works["test"])
    for split in ("validation", "test"):
        assert sorted(shakespeare[split]["genre"]) == ["comedy", "history", "tragedy"]
    assert Counter(shakespeare["train"]["genre"]) == {"comedy": 13, "tragedy": 10, "history": 8, "poem": 5}
    macbeth = shakespeare["validation"].filter(lambda work: work == "macbeth", input_columns="work")[0]
    assert macbeth["title"] == "Macbeth" and "Is this a dagger which I see before me" in macbeth["text"]


def test_local_files_of_each_format_load_with_a_validation_split(tmp_path):
    documents = [f"document number {i}\nhas two lines" for i in range(40)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(documents))  # paragraphs: the documents of a text file
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in documents))
    Dataset.from_dict({"body": documents}).to_csv(tmp_path / "corpus.csv")
    text = load_text_dataset(data_files=[str(tmp_path / "corpus.txt")])
    assert len(text["train"]) + len(text["validation"]) == 40 and len(text["validation"]) == 2
    assert set(text["train"]["text"]) | set(text["validation"]["text"]) == set(documents)
    # a text file without blank lines holds one document per line
    (tmp_path / "lines.txt").write_text("\n".join(document.replace("\n", " ") for document in documents))
    lines = load_text_dataset(data_files=[str(tmp_path / "lines.txt")])
    assert len(lines["train"]) + len(lines["validation"]) == 40
    for name in ("corpus.jsonl", "corpus.csv"):
        corpus = load_text_dataset(data_files=[str(tmp_path / name)], text_column="body", validation_fraction=0.25)
        assert len(corpus["validation"]) == 10
        assert set(corpus["train"]["body"]) | set(corpus["validation"]["body"]) == set(documents)


def test_validation_files_are_the_whole_validation_split(tmp_path):
    (tmp_path / "train.txt").write_text("\n\n".join(f"train {i}" for i in range(30)))
    (tmp_path / "held_out.txt").write_text("\n\n".join(f"held out {i}" for i in range(20)))
    corpus = load_text_dataset(
        data_files=[str(tmp_path / "train.txt")], validation_files=[str(tmp_path / "held_out.txt")]
    )
    assert len(corpus["train"]) == 30, "no validation documents are cut from the training files"
    assert list(corpus["validation"]["text"]) == [f"held out {i}" for i in range(20)]


def test_streaming_local_files_take_validation_documents_first(tmp_path):
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"line {i}" for i in range(30)))
    corpus = load_text_dataset(data_files=[str(tmp_path / "corpus.txt")], streaming=True, validation_documents=5)
    assert [row["text"] for row in corpus["validation"]] == [f"line {i}" for i in range(5)]
    assert next(iter(corpus["train"]))["text"] == "line 5"
    with pytest.raises(
        ValueError, match=r"holds at most 30 documents, the number a stream without a validation split holds back"
    ):
        load_text_dataset(data_files=[str(tmp_path / "corpus.txt")], streaming=True, validation_documents=30)


def test_bad_corpus_arguments_raise_clear_errors(tmp_path):
    (tmp_path / "corpus.txt").write_text("one\ntwo\n")
    (tmp_path / "corpus.md").write_text("x")
    with pytest.raises(ValueError, match=r"no text column 'body'; its columns are \['text'\]"):
        load_text_dataset(data_files=[str(tmp_path / "corpus.txt")], text_column="body")
    with pytest.raises(ValueError, match=r"Cannot tell how to read"):
        load_text_dataset(data_files=[str(tmp_path / "corpus.md")])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"Empty corpus: .*empty.txt'\] hold no text"):
        load_text_dataset(data_files=[str(tmp_path / "empty.txt")])
    with pytest.raises(ValueError, match=r"either dataset_name or data_files"):
        load_text_dataset(dataset_name="org/corpus", data_files=[str(tmp_path / "corpus.txt")])
    with pytest.raises(ValueError, match=r"validation_files need training files"):
        load_text_dataset(validation_files=[str(tmp_path / "corpus.txt")])


def test_a_hub_dataset_with_an_empty_training_split_is_refused(monkeypatch):
    empty = DatasetDict(train=Dataset.from_dict({"text": []}))
    monkeypatch.setattr("pmg.data.load_dataset", lambda *args, **kwargs: empty)
    with pytest.raises(ValueError, match="Empty corpus: the training split has no documents"):
        load_text_dataset("org/empty")


def test_trained_tokenizer_round_trips_any_text_and_reloads(tokenizer, tmp_path):
    assert len(tokenizer) == 1024
    assert tokenizer.eos_token == tokenizer.pad_token == tokenizer.bos_token == END_OF_TEXT
    unseen = "Zwölf Boxkämpfer jagen Viktor 🚀 quer über den großen Sylter Deich.\n\tTo be, or not to be"
    ids = tokenizer(unseen, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == unseen, "byte-level BPE has no unknown tokens"
    assert len(tokenizer("To be, or not to be, that is the question")["input_ids"]) < 20
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(unseen, add_special_tokens=False)["input_ids"] == ids
    assert reloaded.eos_token_id == tokenizer.eos_token_id
    with pytest.raises(ValueError, match=r"vocab_size must be at least 257"):
        train_tokenizer(["abc"], vocab_size=100)


def test_packing_concatenates_documents_into_full_blocks(tokenizer):
    documents = Dataset.from_dict({"text": ["first document here", "second one", "and a third, longer document"]})
    stream = []
    for text in documents["text"]:
        stream += [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    packed = pack_dataset(documents, tokenizer, block_size=4)
    assert len(packed) == len(stream) // 4
    assert [token for block in packed["input_ids"] for token in block] == stream[: 4 * len(packed)]
    assert packed["labels"] == packed["input_ids"]
    assert "position_ids" not in packed.column_names
    # a null cell (csv, json) holds no document: it adds no tokens, not even an eos
    with_nulls = Dataset.from_dict({"text": [None, *documents["text"][:2], None, documents["text"][2]]})
    assert pack_dataset(with_nulls, tokenizer, block_size=4)["input_ids"] == packed["input_ids"]


def test_packing_drops_less_than_one_block_per_thousand_documents(tokenizer):
    """Documents are packed 1,000 at a time, each group dropping its incomplete last block (as documented)."""
    documents = Dataset.from_dict({"text": [f"Line {i}: a short paragraph of the corpus." for i in range(2500)]})
    total = sum(len(ids) + 1 for ids in tokenizer(list(documents["text"]), add_special_tokens=False)["input_ids"])
    packed = pack_dataset(documents, tokenizer, block_size=64)
    assert total // 64 - 3 <= len(packed) < total // 64  # three groups, and here some remainder in each


def test_bytes_per_token_follows_the_blocks_that_evaluation_reads(tokenizer, shakespeare):
    """With --max_eval_blocks, bits per byte divide the loss of the first blocks by their own bytes per token: the
    front matter of a play has far fewer bytes per token than the play as a whole (7-22% here, found in review)."""
    validation = shakespeare["validation"]
    blocks = pack_dataset(validation, tokenizer, block_size=64).select(range(20))
    read = [token for block in blocks["input_ids"] for token in block]
    exact = len(tokenizer.decode(read, skip_special_tokens=True).encode("utf-8")) / len(read)
    assert bytes_per_token(validation, "text", tokenizer, max_tokens=len(read)) == pytest.approx(exact, rel=0.01)
    assert bytes_per_token(validation, "text", tokenizer) != pytest.approx(exact, rel=0.05)


def test_packing_with_document_resets_restarts_positions_at_each_document(tokenizer):
    texts = ["a b c d e f g", "h i", "j k l m n o p q r s"]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]
    packed = pack_dataset(Dataset.from_dict({"text": texts}), tokenizer, block_size=5, document_resets=True)
    positions = [p for block in packed["position_ids"] for p in block]
    expected = [p for length in lengths for p in range(length)][: len(positions)]
    assert positions == expected


def test_packing_streams_and_rejects_a_corpus_shorter_than_one_block(tokenizer):
    documents = Dataset.from_dict({"text": ["short text"] * 20})
    streamed = list(pack_dataset(documents.to_iterable_dataset(), tokenizer, block_size=8))
    assert streamed and all(len(row["input_ids"]) == 8 for row in streamed)
    assert [row["input_ids"] for row in streamed] == pack_dataset(documents, tokenizer, block_size=8)["input_ids"]
    with pytest.raises(ValueError, match=r"fewer than one block of 4096: use shorter blocks \(--block_size; --max"):
        pack_dataset(Dataset.from_dict({"text": ["tiny"]}), tokenizer, block_size=4096)
    with pytest.raises(ValueError, match=r"block_size must be at least 2"):
        pack_dataset(documents, tokenizer, block_size=1)
