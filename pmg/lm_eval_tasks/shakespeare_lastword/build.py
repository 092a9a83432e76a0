"""Build `shakespeare_lastword.jsonl`, the examples of the `shakespeare_lastword` task, from the held-out plays.

A candidate is a spoken line of a play (after its first act heading; not a speaker name, act or scene heading or
stage direction) whose last word has at least `MIN_WORD_LETTERS` letters and follows other words on the line. Each
example is a passage of `PASSAGE_LINES` lines of the play ending with such a line: `context` is the passage up to
that last word (without the space before it), `target` is " " + the word, without the punctuation after it.
`EXAMPLES_PER_WORK` candidates are drawn from each test play (the "test" split), and `FEWSHOT_EXAMPLES_PER_WORK` from
each validation play (the "validation" split, where few-shot examples come from: never a passage of the play under
test), with `random.Random(SEED)`, so the file is the same on every run:

    python pmg/lm_eval_tasks/shakespeare_lastword/build.py
"""

import json
import random
import re
from pathlib import Path

from pmg.data import TEST_WORKS, VALIDATION_WORKS, load_shakespeare

EXAMPLES_PATH = Path(__file__).with_name("shakespeare_lastword.jsonl")
PASSAGE_LINES = 8
EXAMPLES_PER_WORK = 100
FEWSHOT_EXAMPLES_PER_WORK = 20
MIN_WORD_LETTERS = 3
SEED = 0
# the last word of a line (letters, inner apostrophes or hyphens) after a space, then only punctuation
LAST_WORD = re.compile(r"(?<=\s)([A-Za-z]+(?:['-][A-Za-z]+)*)[^\w\s]*\s*$")
# "ACT I." / "ACT 1", "SCENE II. A Room in the Palace.": headings, not speech (some in mixed case)
HEADING = re.compile(r"(ACT|SCENE)\b")
FIRST_ACT = re.compile(r"ACT (I|1)\.?")


def line_examples(work: str, text: str) -> list[dict]:
    """Every candidate example of one play, in text order."""
    lines = text.split("\n")
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line) + 1)
    first = next(index for index, line in enumerate(lines) if FIRST_ACT.fullmatch(line)) + 1
    examples = []
    for index in range(first, len(lines)):
        line = lines[index]
        match = LAST_WORD.search(line)
        if line.isupper() or HEADING.match(line) or "[" in line or "]" in line or not match:
            continue
        word = match.group(1)
        if sum(character.isalpha() for character in word) < MIN_WORD_LETTERS:
            continue
        passage_start = starts[max(first, index - PASSAGE_LINES + 1)]
        context = text[passage_start : starts[index] + match.start(1)].strip()
        examples.append({"work": work, "line": index + 1, "context": context, "target": f" {word}"})
    return examples


def build_examples() -> list[dict]:
    """The task's examples, each with its `split`: the test plays' in `TEST_WORKS` and then text order, then the
    validation plays' likewise."""
    corpus = load_shakespeare()
    rng = random.Random(SEED)
    examples = []
    for split, works, per_work in (
        ("test", TEST_WORKS, EXAMPLES_PER_WORK),
        ("validation", VALIDATION_WORKS, FEWSHOT_EXAMPLES_PER_WORK),
    ):
        texts = {play["work"]: play["text"] for play in corpus[split]}
        for work in works:
            candidates = line_examples(work, texts[work])
            drawn = sorted(rng.sample(range(len(candidates)), per_work))
            examples += [{"split": split, **candidates[index]} for index in drawn]
    return examples


def main() -> None:
    """Write the examples, one JSON object a line."""
    with EXAMPLES_PATH.open("w", encoding="utf-8") as file:
        for example in build_examples():
            file.write(json.dumps(example, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
