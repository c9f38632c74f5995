"""The order of training items: seeded micro-batches split across processes; validation batches."""

from __future__ import annotations

import torch

from comlora.data.items import collate


def micro_batches(lengths: list[int], per_process: int, num_processes: int, rank: int, seed: int, epoch: int,
                  group_by_length: bool = True):
    """One epoch of micro-batches for process ``rank``.

    A seeded permutation is cut into global micro-batches of ``per_process * num_processes`` items and
    process ``rank`` takes its slice of each, so N processes see what one process with the global batch
    sees. With ``group_by_length`` the permutation is sorted by length inside chunks of 16 global
    batches and the batches are then shuffled, which cuts padding while keeping the order random.
    """
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    global_batch = per_process * num_processes
    if group_by_length:
        chunk = 16 * global_batch
        order = [i for s in range(0, len(order), chunk)
                 for i in sorted(order[s:s + chunk], key=lambda i: -lengths[i])]
    batches = [order[s:s + global_batch] for s in range(0, len(order) - global_batch + 1, global_batch)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    for batch in batches:
        yield batch[rank * per_process: (rank + 1) * per_process]


def validation_batches(examples: list[dict], batch_size: int, pad_token_id: int, device):
    for start in range(0, len(examples), batch_size):
        yield {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_token_id).items()}
