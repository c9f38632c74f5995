"""ConvAI2 / PersonaChat (self persona, original, no candidates): ParlAI text parsing, a deterministic split by
dialogue, persona + history prompts, and training items in the LLM-Adapters format (docs/evaluation.md)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

PERSONA_PREFIX = "your persona: "
INSTRUCTION = "Continue the conversation as the person described by this persona. Reply with one message."
SPLIT_NAMES = ("train", "validation", "test")
CONVAI2_FILE = "convai2/valid_self_original_no_cands.txt"   # below the data root


@dataclass
class Dialogue:
    """One dialogue: the speaker's persona sentences and its (partner utterance, gold response) turns."""

    index: int  # 0-based position in the file
    line: int   # 1-based file line where it starts
    persona: list[str] = field(default_factory=list)
    turns: list[tuple[str, str]] = field(default_factory=list)


def load_convai2(path: str | Path) -> list[Dialogue]:
    """Dialogues of a ParlAI ConvAI2 file: 'N your persona: ...' lines, then 'N partner<TAB>response' lines,
    N restarting at 1 for each dialogue; every problem names the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ConvAI2 file")
    dialogues: list[Dialogue] = []
    expected = 1
    for line_no, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        match = re.match(r"(\d+) (.*)$", raw)
        if match is None:
            raise ValueError(f"{path}:{line_no}: expected '<number> <text>', got {raw[:60]!r}")
        number, text = int(match.group(1)), match.group(2)
        if number == 1:
            dialogues.append(Dialogue(index=len(dialogues), line=line_no))
        elif number != expected:
            raise ValueError(f"{path}:{line_no}: line number {number} breaks the dialogue's count "
                             f"(expected {expected} or 1)")
        expected = number + 1
        dialogue = dialogues[-1]
        if text.startswith(PERSONA_PREFIX):
            if dialogue.turns:
                raise ValueError(f"{path}:{line_no}: persona line after the dialogue's first turn")
            dialogue.persona.append(text[len(PERSONA_PREFIX):].strip())
            continue
        fields = text.split("\t")
        if len(fields) < 2 or not fields[1].strip():
            raise ValueError(f"{path}:{line_no}: a turn needs '<partner utterance>\\t<response>'; no response found")
        dialogue.turns.append((fields[0].strip(), fields[1].strip()))
    for d in dialogues:
        if not d.turns:
            raise ValueError(f"{path}:{d.line}: dialogue {d.index} has no turn")
    if not dialogues:
        raise ValueError(f"{path}: the file holds no dialogue")
    return dialogues


def split_dialogues(dialogues: list[Dialogue], seed: int = 0,
                    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> dict[str, list[Dialogue]]:
    """Train / validation / test BY DIALOGUE (no dialogue's turns in two splits): shuffle the dialogue
    indices with ``random.Random(seed)``, cut at round(f_train * n) and round((f_train + f_val) * n), and
    return each split in file order. Deterministic given ``seed``, ``fractions`` and the dialogue count."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    order = list(range(len(dialogues)))
    random.Random(seed).shuffle(order)
    n = len(order)
    cuts = [0, round(fractions[0] * n), round((fractions[0] + fractions[1]) * n), n]
    return {name: [dialogues[i] for i in sorted(order[cuts[k]:cuts[k + 1]])] for k, name in enumerate(SPLIT_NAMES)}


def dialogue_prompt(persona: list[str], history: list[tuple[str, str]], utterance: str) -> str:
    """The instruction text: task line, persona sentences, earlier turns ('Partner:' / 'You:'), the partner's
    message."""
    lines = [INSTRUCTION, "", "Persona:", *persona, "", "Conversation:"]
    for partner, response in history:
        lines += [f"Partner: {partner}", f"You: {response}"]
    lines.append(f"Partner: {utterance}")
    return "\n".join(lines)


def convai2_examples(dialogues: list[Dialogue], history_turns: int | None = None) -> list[dict]:
    """One example per turn: {"prompt", "response", "dialogue", "turn"}; the prompt holds the last
    ``history_turns`` earlier turn pairs (None = all, 0 = only the partner's current message)."""
    if history_turns is not None and history_turns < 0:
        raise ValueError(f"history_turns must be None or >= 0, got {history_turns}")
    examples = []
    for d in dialogues:
        for t, (utterance, response) in enumerate(d.turns):
            history = d.turns[:t] if history_turns is None else d.turns[max(0, t - history_turns):t]
            examples.append({"prompt": dialogue_prompt(d.persona, history, utterance), "response": response,
                             "dialogue": d.index, "turn": t})
    return examples


def convai2_training_items(dialogues: list[Dialogue], history_turns: int | None = None) -> list[dict]:
    """``convai2_examples`` in the LLM-Adapters format: instruction = prompt, output = answer = gold response."""
    return [{"instruction": ex["prompt"], "input": "", "output": ex["response"], "answer": ex["response"],
             "dialogue": ex["dialogue"], "turn": ex["turn"]} for ex in convai2_examples(dialogues, history_turns)]
