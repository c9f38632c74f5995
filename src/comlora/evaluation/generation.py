"""Batched text generation with left padding, shared by every generative evaluation."""

from __future__ import annotations


def generate_texts(model, tokenizer, prompts: list[str], batch_size: int = 8, max_new_tokens: int = 32,
                   num_beams: int = 1, progress=None, **generate_kwargs) -> list[str]:
    """Decode only the new tokens of each prompt's continuation; greedy when ``num_beams == 1``.

    ``model`` is anything with ``generate`` (a transformers model, a PeftModel, a ComLoraModel inside
    ``use_component``); ``generate_kwargs`` pass through (length_penalty, no_repeat_ngram_size, ...). A model with
    its own ``generate_texts`` (``llama_cpp_backend.LlamaCppGenerator``) tokenizes and decodes by itself.
    """
    if hasattr(model, "generate_texts"):
        return model.generate_texts(prompts, max_new_tokens=max_new_tokens, num_beams=num_beams, progress=progress,
                                    **generate_kwargs)
    import torch  # here, not at the top: the command line's options load this module (comlora eval --help)

    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                generated = model.generate(**enc, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                           do_sample=False, pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
            new_tokens = generated[:, enc["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
            if progress is not None:
                progress(len(chunk))
    finally:
        tokenizer.padding_side = previous_side
    return outputs
