"""Training: ``config`` (TrainConfig), ``loop`` (the training loop), ``data``, ``batches``, ``run_checkpoints``,
``safe_run_dir`` (the run directory's lock and atomic writes), ``finished_run`` (a finished run reloaded),
``processes`` and ``distributed`` (several processes, FSDP), ``tracking``, and the ``transformers.Trainer`` / TRL
integrations (``hf_trainer``, ``trl_trainer``). Imports no evaluation module."""
