"""Side-by-side benchmark of training steps and inference (issue: one-pass competition, measured).

    python bench/bench.py --mode quick          # tiny random Llama, seconds
    python bench/bench.py --mode full           # SmolLM2-135M, minutes

Every variant runs in its own fresh process (so its peak resident memory is its own), and the
variants are interleaved round by round (A B C ... A B C ...) so machine noise hits all alike. The
orchestrator prints a table of absolute numbers and of the ratios the targets are stated in, and
writes bench/results/<date>-<machine>-<mode>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from comlora.cpu_memory import peak_rss_mb, retain_freed_memory

TRAIN_VARIANTS = ["peft-lora", "comlora-k1", "comlora-k2", "comlora-k2-noselector", "comlora-k2-sequential",
                  "comlora-k2-checkpointing", "comlora-k2-decided", "comlora-k4", "comlora-k4-sequential",
                  "comlora-k4-lowmem", "comlora-k4-system-malloc", "moelora-k4", "teamlora-k4"]
INFER_VARIANTS = ["base", "base-again", "comlora-merged", "peft-unmerged", "moelora-k4"]  # base-again: the noise floor
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
SIZES = {"quick": dict(batch=4, length=64, new_tokens=16), "full": dict(batch=4, length=128, new_tokens=32)}


def load_base(mode: str):
    if mode == "full":
        from comlora.base_models import load_model_and_tokenizer

        return load_model_and_tokenizer("smollm2-135m", device="cpu", dtype="float32")[0]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config)


def make_batch(mode: str, vocab: int) -> dict:
    """Random tokens; the first half of each sequence is the 'prompt' (label -100), as in instruction tuning."""
    size = SIZES[mode]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (size["batch"], size["length"]), generator=g)
    labels = ids.clone()
    labels[:, : size["length"] // 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def comlora(model, k: int, **options):
    from comlora import ComLoraConfig, ComLoraModel

    values = dict(num_components=k, r=8, lora_alpha=16, top_n=k, target_modules=TARGETS, selector_dropout=0.0)
    if model.config.hidden_size % 8:
        values["selector_heads"] = 9 if model.config.hidden_size % 9 == 0 else 4
    return ComLoraModel(model, ComLoraConfig(**{**values, **options}))


def sequential_step(cm, batch: dict, step: int, total: int):
    """The naive competition: one forward per component (each replaying the frozen base), same objective."""
    from comlora.methods.losses import sequence_losses

    per_component = []
    for k in range(cm.config.num_components):
        with cm.use_component(k):
            losses, counts = sequence_losses(cm.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        per_component.append(losses[:, 0])
    out = cm.competition_objective(torch.stack(per_component, 1), counts, batch["input_ids"], batch["attention_mask"],
                                   step, total)
    return out.loss


def training_step_fn(variant: str, model, batch: dict):
    """(function running one optimizer step, its trainable parameters)."""
    if variant == "peft-lora":
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                      task_type="CAUSAL_LM"))
        loss_fn = lambda step: peft_model(**batch).loss  # noqa: E731  (what a PEFT user writes)
        params = [p for p in peft_model.parameters() if p.requires_grad]
    elif variant.startswith(("moelora", "teamlora")):
        from comlora.methods.moelora import MoeLoraConfig, MoeLoraModel
        from comlora.methods.teamlora import TeamLoraConfig, TeamLoraModel

        if variant.startswith("moelora"):
            wrapper = MoeLoraModel(model, MoeLoraConfig(num_experts=4, r=8, target_modules=TARGETS))
        else:
            wrapper = TeamLoraModel(model, TeamLoraConfig(num_experts=4, r=8, target_modules=TARGETS))
        loss_fn = lambda step: wrapper.training_loss(**batch, step=step, total_steps=100)[0]  # noqa: E731
        params = [p for p in wrapper.parameters() if p.requires_grad]
    else:
        k = int(variant.split("-")[1][1:])
        options = {}
        if variant.endswith("noselector"):
            options = dict(use_selector=False, align_loss=False, pairwise_loss=False)
        if variant.endswith("lowmem"):
            options = dict(competition="low_memory")
        cm = comlora(model, k, **options)
        if variant.endswith("checkpointing"):
            cm.gradient_checkpointing_enable()
        if variant.endswith("decided"):
            cm.decided = 0                              # after an early decision (decide_at): the winner trains alone
        if variant.endswith("sequential"):
            loss_fn = lambda step: sequential_step(cm, batch, step, 100)  # noqa: E731
        else:
            loss_fn = lambda step: cm.competition_step(**batch, step=step, total_steps=100).loss  # noqa: E731
        params = [p for p in cm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(i: int) -> None:
        loss_fn(i).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def inference_model(variant: str, model, tmp: Path):
    """The model whose generation and scoring are timed."""
    if variant in ("base", "base-again"):
        return model
    if variant == "moelora-k4":
        from comlora.methods.moelora import MoeLoraConfig, MoeLoraModel

        return MoeLoraModel(model, MoeLoraConfig(num_experts=4, r=8, target_modules=TARGETS))
    pristine = copy.deepcopy(model)                     # the PEFT adapter goes on an untouched base
    cm = comlora(model, 2)
    with torch.no_grad():                               # a trained-looking winner: non-zero B
        for layer in cm.adapted.values():
            layer.lora_B.normal_(0, 0.01)
    if variant == "comlora-merged":
        return cm.merge(0, inplace=True)
    from peft import PeftModel

    cm.export_adapter(tmp / "adapter", 0)
    return PeftModel.from_pretrained(pristine, tmp / "adapter")


def worker(variant: str, mode: str, steps: int) -> dict:
    """One variant in this fresh process. Every variant runs as ``comlora train`` does on a CPU (freed memory
    kept for reuse, ``cpu_memory.retain_freed_memory``) except ``*-system-malloc``, which keeps glibc's defaults."""
    if not variant.endswith("system-malloc"):
        retain_freed_memory()
    torch.manual_seed(0)
    model = load_base(mode)
    batch = make_batch(mode, model.config.vocab_size)
    tokens = int(batch["attention_mask"].sum())
    kind, name = variant.split(":", 1)
    result = {"variant": variant}
    if kind == "train":
        model.train()
        step = training_step_fn(name, model, batch)
        with torch.no_grad():                          # page in the weights (loaded lazily from the file)
            for p in model.parameters():
                p.sum()
        result["resident_before_steps_mb"] = proc_status_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current resident size
        step(0)                                        # warm-up, not timed
        times = []
        for i in range(1, steps + 1):
            started = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - started)
        result.update(seconds=times, tokens=tokens, peak_rss_during_steps_mb=proc_status_mb("VmHWM"))
    else:
        import tempfile

        m = inference_model(name, model, Path(tempfile.mkdtemp())).eval()
        new = SIZES[mode]["new_tokens"]
        prompt = {k: v[:, : SIZES[mode]["length"] // 2] for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            m(**batch_inputs(batch))                  # warm-up
            score, gen = [], []
            for _ in range(2 * steps):                 # calls are short: twice as many
                started = time.perf_counter()
                m(**batch_inputs(batch))
                score.append(time.perf_counter() - started)
                started = time.perf_counter()
                m.generate(**prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
                gen.append(time.perf_counter() - started)
        result.update(score_seconds=score, generate_seconds=gen, score_tokens=tokens,
                      generated_tokens=new * prompt["input_ids"].shape[0])
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def proc_status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak since start or the last clear_refs reset) in MB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}: the benchmark's memory figures need Linux")


def batch_inputs(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def summarize(results: list[dict]) -> dict:
    """Median over rounds of each variant's per-step time, its throughput and its peak memory."""
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    table = {}
    for variant, runs in by_variant.items():
        if variant.startswith("train:"):
            seconds = statistics.median(s for r in runs for s in r["seconds"])
            table[variant] = {"seconds_per_step": seconds, "tokens_per_s": runs[0]["tokens"] / seconds,
                              "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                              "step_rss_mb": max(r["peak_rss_during_steps_mb"] - r["resident_before_steps_mb"]
                                                 for r in runs)}
        else:
            score = statistics.median(s for r in runs for s in r["score_seconds"])
            gen = statistics.median(s for r in runs for s in r["generate_seconds"])
            table[variant] = {"score_seconds": score, "score_tokens_per_s": runs[0]["score_tokens"] / score,
                              "generate_seconds": gen, "generate_tokens_per_s": runs[0]["generated_tokens"] / gen,
                              "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
    return table


def ratios(t: dict) -> list[tuple[str, float, str]]:
    """(what, measured ratio, target) for every target of the performance issue that the run covers
    (a ratio whose variants did not run, see --variants, is left out)."""
    s = lambda v: t[f"train:{v}"]["seconds_per_step"]  # noqa: E731
    m = lambda v: max(t[f"train:{v}"]["step_rss_mb"], 1e-9)  # noqa: E731
    g = lambda v: t[f"infer:{v}"]["generate_seconds"] / t["infer:base"]["generate_seconds"]  # noqa: E731
    c = lambda v: t[f"infer:{v}"]["score_seconds"] / t["infer:base"]["score_seconds"]  # noqa: E731
    wanted = [("comlora K=1 / PEFT LoRA step", lambda: s("comlora-k1") / s("peft-lora"), "<= 1.00"),
              ("comlora K=2 / (2 x K=1) step", lambda: s("comlora-k2") / (2 * s("comlora-k1")), "<= 1.05"),
              ("comlora K=4 / (4 x K=1) step", lambda: s("comlora-k4") / (4 * s("comlora-k1")), "<= 1.05"),
              ("batched K=2 / sequential K=2 step", lambda: s("comlora-k2") / s("comlora-k2-sequential"), "< 1"),
              ("batched K=4 / sequential K=4 step", lambda: s("comlora-k4") / s("comlora-k4-sequential"), "<= 0.95"),
              ("selector share of the K=2 step", lambda: 1 - s("comlora-k2-noselector") / s("comlora-k2"), "(report)"),
              ("low-memory K=4 / batched K=4 step", lambda: s("comlora-k4-lowmem") / s("comlora-k4"), "(report)"),
              ("K=4 step, freed memory kept / glibc default", lambda: s("comlora-k4") / s("comlora-k4-system-malloc"),
               "(report)"),
              ("low-memory K=4 / batched K=4 step memory", lambda: m("comlora-k4-lowmem") / m("comlora-k4"),
               "(report)"),
              ("batched K=4 / (4 x PEFT LoRA) step memory", lambda: m("comlora-k4") / (4 * m("peft-lora")), "<= 1"),
              ("checkpointed K=2 / K=2 step", lambda: s("comlora-k2-checkpointing") / s("comlora-k2"), "<= 1.4"),
              ("checkpointed K=2 / K=2 step memory", lambda: m("comlora-k2-checkpointing") / m("comlora-k2"), "<= 0.5"),
              ("decided K=2 / K=2 step (decide_at)", lambda: s("comlora-k2-decided") / s("comlora-k2"), "(report)"),
              ("decided K=2 / PEFT LoRA step", lambda: s("comlora-k2-decided") / s("peft-lora"), "(report)"),
              ("MoE of LoRA K=4 / PEFT LoRA step", lambda: s("moelora-k4") / s("peft-lora"), "(report)"),
              ("TeamLoRA K=4 / PEFT LoRA step", lambda: s("teamlora-k4") / s("peft-lora"), "(report)")]
    for v in ("base-again", "comlora-merged", "peft-unmerged", "moelora-k4"):
        target = {"base-again": "(noise floor)", "comlora-merged": "<= 1.02"}.get(v, "(report)")
        wanted += [(f"{v} / base generation time", lambda v=v: g(v), target),
                   (f"{v} / base scoring time", lambda v=v: c(v), target)]
    rows = []
    for what, value, target in wanted:
        try:
            rows.append((what, value(), target))
        except KeyError:                # a variant of this ratio was not run
            pass
    return rows


def markdown(table: dict, rows: list, command: str, machine: dict) -> str:
    lines = [f"Command: `{command}`", "", f"Machine: {machine}", "",
             "| variant | s/step or s/call | tokens/s | peak RSS MB | step RSS MB |", "|---|---|---|---|---|"]
    for variant, v in table.items():
        if variant.startswith("train:"):
            lines.append(f"| {variant} | {v['seconds_per_step']:.3f} | {v['tokens_per_s']:.0f} | "
                         f"{v['peak_rss_mb']:.0f} | {v['step_rss_mb']:.0f} |")
        else:
            lines.append(f"| {variant} score | {v['score_seconds']:.3f} | {v['score_tokens_per_s']:.0f} | "
                         f"{v['peak_rss_mb']:.0f} | |")
            lines.append(f"| {variant} generate | {v['generate_seconds']:.3f} | {v['generate_tokens_per_s']:.1f} | | |")
    lines += ["", "| ratio | measured | target |", "|---|---|---|"]
    lines += [f"| {what} | {value:.3f} | {target} |" for what, value, target in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=list(SIZES), default="quick")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds (each variant once per round).")
    parser.add_argument("--steps", type=int, default=3,
                        help="Timed training steps per variant per round (inference: twice as many calls).")
    parser.add_argument("--across-runs", action="store_true",
                        help="Only table the ratios of every recorded run of --mode (bench/results) side by side.")
    parser.add_argument("--variants", type=lambda v: v.split(","),
                        help="Only these variants (comma-separated, e.g. "
                             "train:comlora-k2,train:comlora-k2-checkpointing): a partial run, recorded as "
                             "bench/results/*-MODE-partial.json, never written into the doc.")
    parser.add_argument("--no-doc", action="store_true",
                        help="Record the run in bench/results but leave docs/performance.md as it is "
                             "(e.g. on a busy machine).")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.mode, args.steps)))
        return
    if args.across_runs:
        report = across_runs(args.mode)
        print(report)
        update_doc(Path(__file__).parent.parent / "docs" / "performance.md", f"{args.mode}-runs", report, None)
        return
    variants = [f"train:{v}" for v in TRAIN_VARIANTS] + [f"infer:{v}" for v in INFER_VARIANTS]
    command = f"python bench/bench.py --mode {args.mode} --rounds {args.rounds} --steps {args.steps}"
    if args.variants:
        unknown = sorted(set(args.variants) - set(variants))
        if unknown:
            parser.error(f"unknown variant(s) {unknown}; known: {', '.join(variants)}")
        variants = [v for v in variants if v in args.variants]
        command += f" --variants {','.join(variants)}"
    results = []
    for round_index in range(args.rounds):
        order = variants[round_index % len(variants):] + variants[: round_index % len(variants)]
        for variant in order:
            print(f"round {round_index + 1}/{args.rounds}: {variant}", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, "--mode", args.mode, "--steps", str(args.steps),
                                  "--worker", variant], check=True, capture_output=True, text=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    table = summarize(results)
    rows = ratios(table)
    machine = {"host": socket.gethostname(), "cpus": torch.get_num_threads(), "torch": torch.__version__,
               "platform": platform.platform(), "processor": platform.processor() or platform.machine()}
    report = markdown(table, rows, command, machine)
    print(report)
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    suffix = "-partial" if args.variants else ""
    path = out_dir / (f"{time.strftime('%Y-%m-%d-%H%M')}-{platform.machine()}-{torch.get_num_threads()}cpu-"
                      f"{args.mode}{suffix}.json")
    path.write_text(json.dumps({"command": command, "machine": machine, "summary": table,
                                "ratios": [{"what": w, "value": v, "target": t} for w, v, t in rows],
                                "raw": results, "markdown": report}, indent=2) + "\n")
    if args.variants or args.no_doc:
        print(f"written: {path} (docs/performance.md left as it is)")
        return
    update_doc(Path(__file__).parent.parent / "docs" / "performance.md", args.mode, report, path)
    print(f"written: {path} and docs/performance.md ({args.mode} section)")


def across_runs(mode: str) -> str:
    """Markdown: one column per recorded run of ``mode``, one row per ratio (how much the machine's noise moves
    them)."""
    files = sorted((Path(__file__).parent / "results").glob(f"*-{mode}.json"))
    runs = [json.loads(f.read_text()) for f in files]
    names = [f.name.split("-x86")[0].split("-aarch")[0] for f in files]
    lines = [f"Command: `python bench/bench.py --mode {mode} --across-runs` over "
             f"{', '.join(f'`{f.name}`' for f in files)}",
             "", "| ratio | target | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(runs)]
    for row in runs[-1]["ratios"]:
        measured = [{r["what"]: r["value"] for r in run["ratios"]}.get(row["what"]) for run in runs]
        # earlier runs measured step memory in a way retained memory invalidates
        if row["what"].endswith("step memory"):
            measured = [v if any("resident_before_steps_mb" in r for r in run["raw"]) else None
                        for v, run in zip(measured, runs)]
        values = ["-" if v is None else f"{v:.3f}" for v in measured]
        lines.append(f"| {row['what']} | {row['target']} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def update_doc(doc: Path, mode: str, report: str, result_file: Path | None) -> None:
    """Replace the text between the ``<!-- bench:MODE -->`` markers of docs/performance.md with this run's tables."""
    start, end = f"<!-- bench:{mode} -->", f"<!-- /bench:{mode} -->"
    text = doc.read_text() if doc.exists() else ""
    source = f"Result file: `{result_file.relative_to(doc.parent.parent)}`\n\n" if result_file else ""
    block = f"{start}\n{source}{report}{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text += f"\n## Benchmark ({mode})\n{block}\n"
    doc.write_text(text)


if __name__ == "__main__":
    main()
