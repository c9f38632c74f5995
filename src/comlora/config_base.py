"""ConfigDict: what every config dataclass shares (method configs, TrainConfig): to_dict / from_dict / from_json
and validation with one error message per problem."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields
from pathlib import Path


class ConfigDict:
    """``to_dict`` / ``from_dict`` / ``from_json`` for a config dataclass; an unknown field is an error naming it."""

    def to_dict(self) -> dict:
        return asdict(self)

    def integer_checks(self, names, minimum: int) -> list[tuple[bool, str]]:
        """Each named field is an integer (not a bool) >= ``minimum``."""
        return [(isinstance(getattr(self, n), int) and not isinstance(getattr(self, n), bool)
                 and getattr(self, n) >= minimum,
                 f"{n} must be an integer >= {minimum}, got {getattr(self, n)!r}") for n in names]

    def finite_checks(self) -> list[tuple[bool, str]]:
        """Every float field holds a finite number (None where the field allows it): no NaN, no inf."""
        checks = []
        for f in fields(self):
            value = getattr(self, f.name)
            if str(f.type).startswith("float") and not (value is None and "None" in str(f.type)):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                checks.append((ok, f"{f.name} must be a finite number, got {value!r}"))
        return checks

    def validate(self, checks: list[tuple[bool, str]]) -> None:
        """Raise ``ValueError("<Config>: <message>")`` for the first ``(ok, message)`` that is not ok, after
        ``finite_checks`` (which every config gets)."""
        for ok, message in self.finite_checks() + checks:
            if not ok:
                raise ValueError(f"{type(self).__name__}: {message}")

    @classmethod
    def from_dict(cls, values: dict):
        """Build from a mapping (YAML, JSON, --set); numbers written as strings ('3e-4') are converted."""
        types = {f.name: str(f.type) for f in fields(cls)}
        unknown = sorted(set(values) - set(types))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(types)}")
        values = dict(values)
        for name, value in values.items():
            if isinstance(value, bool) and not types[name].startswith("bool"):
                raise ValueError(f"{cls.__name__}: {name} must be a number, got {value!r}")
            if types[name] == "bool" and not isinstance(value, bool):
                raise ValueError(f"{cls.__name__}: {name} must be true or false, got {value!r}")
            if isinstance(value, str) and types[name].split(" ")[0] in ("float", "int"):
                try:
                    values[name] = float(value) if types[name].startswith("float") else int(value)
                except ValueError:
                    raise ValueError(f"{cls.__name__}: {name} must be a number, got {value!r}") from None
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path):
        return cls.from_dict(json.loads(Path(path).read_text()))
