"""Generation through llama.cpp (``llama-cpp-python``, the optional extra ``comlora[gguf]``): the GGUF base and a
GGUF LoRA adapter run as llama.cpp, Ollama and LM Studio users run them, behind ``generation.generate_texts``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from comlora.base_models import DEFAULT_MODEL, smollm2_gguf_path

INSTALL_HINT = "pip install 'comlora[gguf]' (builds llama-cpp-python from source; or `make setup-gguf`)"


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as err:
        raise ImportError(f"the llama.cpp backend needs llama-cpp-python: {INSTALL_HINT}") from err
    return llama_cpp


def gguf_model_path(model: str) -> Path:
    """The GGUF file of ``--model``: the embedded default's, or a .gguf file."""
    if model == DEFAULT_MODEL:
        return smollm2_gguf_path()
    path = Path(model)
    if path.suffix != ".gguf" or not path.is_file():
        raise ValueError(f"the llama.cpp backend runs GGUF files: --model {DEFAULT_MODEL} or a .gguf file, "
                         f"not {model!r}")
    return path


class LlamaCppGenerator:
    """A GGUF model, optionally with a GGUF LoRA adapter, in llama.cpp; decodes greedily (llama.cpp's greedy
    sampler, no repetition penalty) until an end-of-generation token or ``max_new_tokens``. ``n_ctx`` tokens of
    context (prompt + new tokens); ``logits_all`` keeps every position's logits (n_ctx x vocab floats)."""

    def __init__(self, model_path: str | Path, lora_path: str | Path | None = None, n_ctx: int = 4096,
                 n_threads: int | None = None, logits_all: bool = False) -> None:
        llama_cpp = import_llama_cpp()
        for label, path in (("model", model_path), ("adapter", lora_path)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{label} file {path} does not exist")
        self.llama_cpp = llama_cpp
        self.model_path, self.lora_path = Path(model_path), lora_path and Path(lora_path)
        self.llm = llama_cpp.Llama(model_path=str(model_path), lora_path=None if lora_path is None else str(lora_path),
                                   n_ctx=n_ctx, n_threads=n_threads or os.cpu_count(), logits_all=logits_all,
                                   verbose=False)

    def tokenize(self, text: str) -> list[int]:
        """The model's tokens for ``text``, with the special tokens its GGUF says to add (as transformers does)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of ``prompt_ids`` (the KV cache of a shared prompt prefix is reused)."""
        if len(prompt_ids) + max_new_tokens > self.llm.n_ctx():
            raise ValueError(f"a prompt of {len(prompt_ids)} tokens + {max_new_tokens} new ones exceed llama.cpp's "
                             f"context of {self.llm.n_ctx()} tokens")
        new: list[int] = []
        if max_new_tokens <= 0:
            return new
        for token in self.llm.generate(prompt_ids, temp=0.0, repeat_penalty=1.0, reset=True):
            if self.llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token):
                break
            new.append(token)
            if len(new) == max_new_tokens:
                break
        return new

    def generate_texts(self, prompts: list[str], max_new_tokens: int = 32, num_beams: int = 1, progress=None,
                       **generate_kwargs) -> list[str]:
        """``generation.generate_texts`` for llama.cpp: the decoded new text of each prompt (special tokens left
        out)."""
        if num_beams != 1:
            raise ValueError("the llama.cpp backend decodes greedily (llama.cpp has no beam search): use --greedy")
        unsupported = {k: v for k, v in generate_kwargs.items() if v}
        if unsupported:
            raise ValueError(f"the llama.cpp backend does not support {sorted(unsupported)}")
        texts = []
        for prompt in prompts:
            new = self.generate_ids(self.tokenize(prompt), max_new_tokens)
            texts.append(self.llm.detokenize(new).decode("utf-8", errors="replace"))
            if progress is not None:
                progress(1)
        return texts

    def close(self) -> None:
        """Free llama.cpp's model and context now (not at interpreter exit, where llama-cpp-python's finalizer
        fails)."""
        self.llm.close()

    def next_token_logits(self, token_ids: list[int]):
        """Logits [len(token_ids), vocab] of the next token at every position (needs ``logits_all=True``)."""
        if not self.llm._logits_all:
            raise ValueError("next_token_logits needs a LlamaCppGenerator made with logits_all=True")
        self.llm.reset()
        self.llm.eval(token_ids)
        return self.llm.scores[:len(token_ids)].copy()


def run_generator(method, model: str, component: int | None = None, **kwargs) -> LlamaCppGenerator:
    """llama.cpp with the base GGUF of a run's base ``model`` and the run's LoRA (ComLoRA: ``component``, default
    the winner) exported to a temporary GGUF adapter (llama.cpp reads it fully when loading)."""
    from comlora.export.gguf import GgufLayout, adapted_weights, write_lora_gguf
    from comlora.provenance import base_gguf_file

    base = base_gguf_file(model)
    if base is None:
        raise ValueError(f"the llama.cpp backend needs the run's base as a GGUF file; {model!r} did not come from one "
                         f"(the default {DEFAULT_MODEL} does)")
    weights, alpha, _ = adapted_weights(method, component)
    with tempfile.TemporaryDirectory(prefix="comlora-gguf-") as folder:
        adapter = write_lora_gguf(Path(folder) / "adapter.gguf", weights, alpha,
                                  GgufLayout.from_config(method.model.config))
        return LlamaCppGenerator(base, adapter, **kwargs)
