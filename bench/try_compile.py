"""Does torch.compile speed up a ComLoRA K=2 training step on SmolLM2? Eager vs compiled, same batch.

    python bench/try_compile.py eager; python bench/try_compile.py compile

The compiled variant compiles the frozen base model (with its ComLoRA layers) with fixed shapes;
the first step includes the compilation.
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import comlora, load_base, make_batch  # noqa: E402


def main(mode: str) -> None:
    model = load_base("full").train()
    batch = make_batch("full", model.config.vocab_size)
    cm = comlora(model, 2)
    if mode == "compile":
        cm.model.model = torch.compile(cm.model.model, dynamic=False)
    params = [p for p in cm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(i: int) -> float:
        started = time.perf_counter()
        cm.competition_step(**batch, step=i, total_steps=10).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    print(mode, "first step (incl. compile)", round(step(0), 1), flush=True)
    times = [step(i) for i in range(1, 5)]
    print(mode, "steps", [round(t, 2) for t in times], "median", round(statistics.median(times), 3))


if __name__ == "__main__":
    main(sys.argv[1])
