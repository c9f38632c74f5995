"""Training methods: one module each (``lora``, ``moelora``, ``teamlora``, ``loratrf``; ComLoRA in ``comlora/``), all
built on ``adapter_config.AdapterConfig`` and ``base.AdapterModel``, registered by name in ``registry``."""
