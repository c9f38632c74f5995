"""The answer options of LLM-Adapters multiple-choice items as texts, parsed from their instructions, and the
``text`` answer format (the response is the correct option's text instead of 'the correct answer is answer3') and
the ``cloze`` one (the same response after the question alone, the options and the answer format left out, as
lm-evaluation-harness prompts these tasks).

Every commonsense instruction ends with 'Answer format: L1/L2/...', the answer labels (answer1, solution1,
option1, ending1, ... or true/false). Option k's text follows its capitalised label ('Answer1: ', 'Solution1: ',
'Option1: ', 'Ending1: ') in one block after a blank line, the options separated by a space or a blank line:

    ...question\\n\\nAnswer1: make a new plan Answer2: Go home and see Riley Answer3: Find somewhere to go

BoolQ's options are its labels, 'true' and 'false'.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ANSWER_FORMAT = re.compile(r"(?:\n\n| )Answer format: ([a-z0-9]+(?:/[a-z0-9]+)+)\s*$")
OPTION_SEPARATOR = r"(?: |\n\n)"


@dataclass(frozen=True)
class Options:
    """An item's answer labels (as its 'Answer format:' line lists them), each label's option text, and the
    instruction without its options and 'Answer format:' line (the question a cloze prompt asks)."""

    labels: tuple[str, ...]
    texts: tuple[str, ...]
    question: str

    def index(self, answer: str) -> int:
        """The position of the gold label ``answer`` among the labels."""
        if answer not in self.labels:
            raise ValueError(f"answer {answer!r} is none of the item's labels {'/'.join(self.labels)}")
        return self.labels.index(answer)


def parse_options(instruction: str) -> Options:
    """The labels of the instruction's 'Answer format:' line and the text after each 'Label: ' marker (stripped),
    the markers in label order in the block that starts after the last blank line before the first one."""
    found = ANSWER_FORMAT.search(instruction)
    if found is None:
        raise ValueError("no 'Answer format: label1/label2/...' line at the end of the instruction")
    labels = tuple(found.group(1).split("/"))
    head = instruction[:found.start()]
    if labels == ("true", "false"):
        return Options(labels, labels, head.rstrip())
    names = [label[:1].upper() + label[1:] + ":" for label in labels]
    block = OPTION_SEPARATOR.join(re.escape(name) + " (.*?)" for name in names)
    start = head.rfind("\n\n" + names[0] + " ")
    match = re.fullmatch(r"\n\n" + block, head[start:], flags=re.DOTALL) if start >= 0 else None
    if match is None:
        raise ValueError(f"the options {' '.join(names)} of 'Answer format: {found.group(1)}' are not one block "
                         "after a blank line")
    texts = tuple(text.strip() for text in match.groups())
    empty = [label for label, text in zip(labels, texts) if not text]
    if empty:
        raise ValueError(f"option {', '.join(empty)} has no text")
    return Options(labels, texts, head[:start].rstrip())


def item_options(item: dict) -> tuple[Options, int]:
    """(options, gold option index) of an LLM-Adapters item; errors name the item's task and index if it has them."""
    try:
        options = parse_options(item["instruction"])
        return options, options.index(item["answer"])
    except (ValueError, KeyError) as err:
        where = " ".join(str(item[k]) for k in ("task", "index") if k in item) or "item"
        problem = "no field 'answer'" if isinstance(err, KeyError) else str(err)
        raise ValueError(f"{where}: cannot read its answer options: {problem}") from err


def text_answer_item(item: dict) -> dict:
    """The item with the correct option's text as its response (``output``); ``answer`` keeps the gold label."""
    options, answer = item_options(item)
    return dict(item, output=options.texts[answer])


def cloze_item(item: dict) -> dict:
    """``text_answer_item`` with the question alone as its instruction (no options, no answer format)."""
    options, answer = item_options(item)
    return dict(item, instruction=options.question, output=options.texts[answer])
