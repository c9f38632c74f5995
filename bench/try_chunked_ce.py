"""Would a chunked, fused LM-head cross-entropy speed up the step? (Measured; not kept.)

The target-only LM head (``losses.sequence_losses``) still builds ``[K*N, vocab]`` logits, their
log-softmax and its gradient. The chunked form below computes, chunk by chunk of rows, the NLL and
its input gradient ``(softmax - onehot) W`` in the forward pass, so no ``[K*N, vocab]`` tensor
exists. Timed against the plain form on SmolLM2's head shape (vocab 49,152, d 576), first with
glibc's default malloc, then after ``retain_freed_memory`` (what ``comlora train`` uses on a CPU).

    python bench/try_chunked_ce.py
"""

import time

import torch
import torch.nn.functional as F

from comlora.cpu_memory import retain_freed_memory

VOCAB, DIM = 49152, 576


class ChunkedTargetNLL(torch.autograd.Function):
    """nll[n] = -log softmax(h_n W^T)[t_n]; d nll[n] / d h_n = (softmax(h_n W^T) - onehot(t_n)) W, formed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows):
        nll = torch.empty(len(hidden))
        grad = torch.empty_like(hidden)
        for start in range(0, len(hidden), rows):
            t = targets[start:start + rows]
            log_probs = F.log_softmax(F.linear(hidden[start:start + rows], weight), -1)
            nll[start:start + rows] = -log_probs.gather(1, t[:, None]).squeeze(1)
            probs = log_probs.exp_()
            probs[torch.arange(len(t)), t] -= 1
            grad[start:start + rows] = probs @ weight
        ctx.save_for_backward(grad)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        (grad,) = ctx.saved_tensors
        return grad * grad_nll[:, None], None, None, None


def measure(weight: torch.Tensor, rows: int) -> tuple[float, dict[str, float]]:
    """(max |grad - plain grad|, median seconds of forward + backward per variant), variants interleaved."""
    hidden, targets, upstream = torch.randn(rows, DIM), torch.randint(0, VOCAB, (rows,)), torch.rand(rows)

    def plain():
        h = hidden.clone().requires_grad_()
        (F.cross_entropy(F.linear(h, weight), targets, reduction="none") * upstream).sum().backward()
        return h.grad

    def chunked(chunk):
        h = hidden.clone().requires_grad_()
        (ChunkedTargetNLL.apply(h, weight, targets, chunk) * upstream).sum().backward()
        return h.grad

    variants = {"plain": plain, **{f"chunks of {c}": (lambda c=c: chunked(c)) for c in (128, 256, 512)}}
    error = max((fn() - plain()).abs().max().item() for fn in variants.values())
    times = {name: [] for name in variants}
    for _ in range(5):
        for name, fn in variants.items():
            fn()
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return error, {name: sorted(values)[2] for name, values in times.items()}


def main() -> None:
    torch.manual_seed(0)
    weight = torch.randn(VOCAB, DIM) * 0.02
    for allocator in ("glibc default", "freed memory kept"):
        if allocator == "freed memory kept":
            retain_freed_memory()
        for rows in (256, 1024):          # target tokens of K=1 and K=4 in the benchmark's batch
            error, medians = measure(weight, rows)
            print(f"{allocator}, {rows} target tokens (max |grad - plain grad| {error:.1e}):")
            for name, median in medians.items():
                print(f"  {name:14s} {median * 1000:7.1f} ms  ratio to plain {median / medians['plain']:.3f}")


if __name__ == "__main__":
    main()
