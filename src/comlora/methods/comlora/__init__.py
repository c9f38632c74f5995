"""ComLoRA: ``config`` (every switch), ``layer`` (K components per linear layer), ``selector``, ``losses`` (alignment,
pairwise, annealing), ``model`` (the competition step, winner selection), ``export`` (a component as PEFT LoRA or
merged)."""
