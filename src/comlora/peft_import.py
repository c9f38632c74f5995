"""``peft``, imported without bitsandbytes (``from comlora.peft_import import peft``), and ``peft_quietly``.

peft imports bitsandbytes whenever it is installed: on its own import (``peft/helpers.py``, for a helper comlora does
not use) and whenever it puts LoRA layers on a model (to check them against bitsandbytes' layers). That import costs
seconds and, on CPUs with AVX512-BF16, bitsandbytes tries to fetch a kernel from the Hub and logs "Failed to load CPU
gemm_4bit_forward from kernels-community" on every command. Inside ``peft_quietly``, ``import bitsandbytes`` fails
(a None entry in ``sys.modules``), which peft takes as "not installed". A 4-bit or 8-bit base needs none of this:
transformers imports bitsandbytes when it loads one (``quantization.bnb_quantization_config``), and from then on
nothing is hidden.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from contextlib import contextmanager

# Cached "is bitsandbytes installed?" answers that a call inside peft_quietly would leave at False.
AVAILABILITY_CHECKS = (("peft.import_utils", "is_bnb_available"), ("peft.import_utils", "is_bnb_4bit_available"),
                       ("transformers.utils.import_utils", "is_bitsandbytes_available"))


@contextmanager
def peft_quietly():
    """Inside, ``import bitsandbytes`` raises ImportError, unless it was imported before (on leaving, the libraries'
    cached availability checks are cleared, so that a quantized model later in the process finds it), and
    transformers' FutureWarning on ``is_gradient_checkpointing``, which ``PeftModel`` reads, is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        if "bitsandbytes" in sys.modules:
            yield
            return
        sys.modules["bitsandbytes"] = None
        try:
            yield
        finally:
            del sys.modules["bitsandbytes"]
            for module, name in AVAILABILITY_CHECKS:
                check = getattr(sys.modules.get(module), name, None)
                if hasattr(check, "cache_clear"):
                    check.cache_clear()


with peft_quietly():
    peft = importlib.import_module("peft")
