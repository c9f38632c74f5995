"""The export formats of ``comlora export --format``: name -> exporter, named as ``module:function`` and imported
when first used (listing the formats, the command line's choices, loads no model code).

An exporter is called under the run's lock as ``exporter(run, out, component, merge, outtype)`` and returns the
line ``comlora export`` prints; it checks its own arguments and writes ``out`` whole or not at all. A new format is
one module under ``export/`` plus one line in ``FORMATS`` (docs/extending.md).
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ExportFormat:
    exporter: str           # module:function
    description: str        # the --format help

    @property
    def export(self) -> Callable[..., str]:
        return pkgutil.resolve_name(self.exporter)


FORMATS: dict[str, ExportFormat] = {
    "peft": ExportFormat("comlora.export.run:export_folder",
                         "a PEFT adapter folder (with --merge a transformers folder)"),
    "gguf": ExportFormat("comlora.export.gguf:export_run_gguf",
                         "one llama.cpp GGUF file (LoRA adapter for the base GGUF, or merged)"),
}


def get_format(name: str) -> ExportFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown export format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]
