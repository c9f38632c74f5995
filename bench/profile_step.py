"""Where one ComLoRA training step's time goes: torch.profiler on SmolLM2 (or the quick tiny model).

    python bench/profile_step.py --mode full --k 2
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from bench import comlora, load_base, make_batch  # noqa: E402
from comlora.cpu_memory import retain_freed_memory  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["quick", "full"], default="full")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--system-malloc", action="store_true",
                        help="Keep glibc's defaults (as --no-retain-cpu-memory).")
    args = parser.parse_args()
    if not args.system_malloc:
        retain_freed_memory()                          # as `comlora train` on a CPU
    model = load_base(args.mode).train()
    batch = make_batch(args.mode, model.config.vocab_size)
    cm = comlora(model, args.k)
    params = [p for p in cm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        cm.competition_step(**batch, step=1, total_steps=10).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()                                             # warm-up (twice: the retained heap settles)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"python bench/profile_step.py --mode {args.mode} --k {args.k}"
          + (" --system-malloc" if args.system_malloc else ""))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
