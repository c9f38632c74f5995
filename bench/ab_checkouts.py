"""Two checkouts of comlora, side by side: bench/bench.py of each, in turn, round by round (A B A B ...), and the
ratio B / A of each variant's median seconds per training step.

    python bench/ab_checkouts.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 3] [--mode quick]
                                 [--variants train:peft-lora,train:comlora-k2,train:comlora-k4] [--steps 5]

Each checkout runs its own bench/bench.py with its own src/ first on PYTHONPATH, in this Python; its results land
in that checkout's bench/results/, are read back and removed there. Prints the table and writes it to
bench/results/<date>-ab-checkouts.json in this checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(checkout: Path, args) -> dict:
    """One bench.py run in ``checkout``; returns its summary ({variant: {seconds_per_step, ...}})."""
    results = checkout / "bench" / "results"
    start = time.time()
    env = {**os.environ, "PYTHONPATH": str(checkout / "src")}
    subprocess.run([sys.executable, "bench/bench.py", "--mode", args.mode, "--rounds", "1", "--steps", str(args.steps),
                    "--variants", args.variants, "--no-doc"], cwd=checkout, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    (new,) = [p for p in results.glob("*-partial.json") if p.stat().st_mtime >= start]
    summary = json.loads(new.read_text())["summary"]
    new.unlink()                    # names have minutes only: the next run of the same minute would reuse it
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", default="quick")
    parser.add_argument("--variants", default="train:peft-lora,train:comlora-k2,train:comlora-k4")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    for _ in range(args.rounds):
        for side in ("old", "new"):
            for variant, figures in run_bench(getattr(args, side).resolve(), args).items():
                times[side].setdefault(variant, []).append(figures["seconds_per_step"])
    rows = []
    for variant in times["old"]:
        old, new = statistics.median(times["old"][variant]), statistics.median(times["new"][variant])
        rows.append({"variant": variant, "old_s_per_step": old, "new_s_per_step": new, "new_over_old": new / old,
                     "old_runs": times["old"][variant], "new_runs": times["new"][variant]})
        print(f"{variant:28s} old {old:.4f} s/step  new {new:.4f} s/step  new/old {new / old:.3f}")
    out = ROOT / "bench" / "results" / f"{time.strftime('%Y-%m-%d-%H%M')}-ab-checkouts.json"
    out.write_text(json.dumps({"command": " ".join(sys.argv), "old": str(args.old), "new": str(args.new),
                               "rounds": args.rounds, "mode": args.mode, "rows": rows}, indent=1) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
