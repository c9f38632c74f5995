"""Does torch.compile speed up a ComLoRA K=2 training step on SmolLM2? Eager vs compiled, same batch.

    python bench/try_compile.py eager; python bench/try_compile.py compile
"""
import sys, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from bench import comlora, load_base, make_batch
mode = sys.argv[1]
model = load_base("full").train()
batch = make_batch("full", model.config.vocab_size)
cm = comlora(model, 2)
if mode == "compile":
    cm.model.model = torch.compile(cm.model.model, dynamic=False)
params = [p for p in cm.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
def step(i):
    cm.competition_step(**batch, step=i, total_steps=10).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
t = time.perf_counter(); step(0); print(mode, "first step (incl. compile)", round(time.perf_counter() - t, 1), flush=True)
ts = []
for i in range(1, 5):
    t = time.perf_counter(); step(i); ts.append(time.perf_counter() - t)
print(mode, "steps", [round(x, 2) for x in ts], "median", sorted(ts)[len(ts)//2])
