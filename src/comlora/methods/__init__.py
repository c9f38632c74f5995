"""Training methods: one module each (``lora``, ``moelora``, ``teamlora``, ``loratrf``; ComLoRA in ``comlora/``), all
built on ``base`` (AdapterConfig, AdapterModel), registered by name in ``registry``."""
