"""Minor page faults and system time of single ComLoRA training steps, with and without retained memory.

    python bench/page_faults.py            # K=1 and K=4 on SmolLM2, each in a fresh process, both allocators

Shows why K=4 cost more than 4 x K=1 under glibc's default malloc: the step's large buffers are
mmap'd afresh and page-faulted in every step (``cpu_memory.retain_freed_memory`` keeps them).
"""

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import comlora, load_base, make_batch  # noqa: E402
from comlora.cpu_memory import retain_freed_memory  # noqa: E402


def measure(k: int, retain: bool, steps: int) -> None:
    if retain:
        retain_freed_memory()
    model = load_base("full").train()
    batch = make_batch("full", model.config.vocab_size)
    cm = comlora(model, k)
    optimizer = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad], lr=1e-4)

    def step():
        cm.competition_step(**batch, step=1, total_steps=10).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    step()                                               # warm-up (the retained heap settles)
    for _ in range(steps):
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
        print(f"K={k} {'retained' if retain else 'glibc default':14s} step {seconds:.2f} s  "
              f"minor faults {after.ru_minflt - before.ru_minflt:7d}  system {after.ru_stime - before.ru_stime:.2f} s  "
              f"user {after.ru_utime - before.ru_utime:.2f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--retain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.k:
        measure(args.k, args.retain, args.steps)
        return
    print(f"python bench/page_faults.py --steps {args.steps}")
    for k in (1, 4):
        for retain in (False, True):
            subprocess.run([sys.executable, __file__, "--k", str(k), "--steps", str(args.steps)]
                           + (["--retain"] if retain else []), check=True, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
