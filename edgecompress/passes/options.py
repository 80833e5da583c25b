"""A recipe knob, declared once on the pass config field it sets.

`option(default, OPT)` is a dataclasses.field whose metadata carries the knob's facts (its flag, allowed values,
help). The CLI flags (cli.py), the API's validation (recipes.RecipeOptions), `edgecompress recipes` and the search
grid all read them from the registered pass configs (passes/base.py), so a new knob is one field. Several passes may
share a knob (--block-size is int4's and the decoder codebooks'): they then share one `Option` object.

Layering: imports nothing internal but errors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgecompress.errors import ConfigError

# field metadata key
OPTION = "edgecompress.option"


@dataclass(frozen=True)
class Option:
    """One recipe knob. `name` is the API argument (codebook_bits); the flag is derived (--codebook-bits)."""

    name: str
    help: str
    type: type = str  # int | float | str
    choices: tuple[str, ...] = ()
    # inclusive bounds unless the *_open flag says otherwise; None: unbounded
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    # an extra rule: value -> (what is wrong, hint) or None
    check: Callable[[Any], tuple[str, str | None] | None] | None = None
    hint: str | None = None
    # a structural pass (prune, low-rank) runs when one of its enabling knobs is given a truthy value
    enables: bool = False
    # the knob's default where a field's own default means something else (int4's calibration_samples=0: all)
    default: Any = None
    # (knob, value): this knob does something only when that knob is given that value (--distill-steps needs
    # --prune-recovery distill); giving it otherwise is an error, as for a knob the recipe does not read
    only_with: tuple[str, Any] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def label(self, source: str) -> str:
        """How an error names the knob: the flag from the CLI, the argument from the API."""
        return self.flag if source == "cli" else self.name

    def validate(self, value: Any, label: str) -> Any:
        """The value converted to the knob's type; ConfigError (one line, exit 2) when it is not allowed."""
        if self.type is not str:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    (self.type is int and isinstance(value, float) and not value.is_integer()):
                raise ConfigError(f"{label} must be a{'n integer' if self.type is int else ' number'}, got {value!r}")
            value = self.type(value)
            if not math.isfinite(value):
                raise ConfigError(f"{label} must be a finite number, got {value}")
        if self.choices and value not in self.choices:
            raise ConfigError(f"unknown {label} '{value}'", hint=f"use {'|'.join(self.choices)}")
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            raise ConfigError(f"{label} must be {self.range_text()}, got {value}", hint=self.hint)
        if self.check is not None and (bad := self.check(value)) is not None:
            raise ConfigError(f"{label} {bad[0]}, got {value}", hint=bad[1])
        return value

    def range_text(self) -> str:
        if self.low is not None and self.high is not None:
            if not self.low_open and not self.high_open and self.type is int:
                return f"between {self.low:g} and {self.high:g}"
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"

    def help_text(self, default: Any) -> str:
        allowed = "|".join(self.choices) if self.choices else ""
        shown = "off" if default is None else default
        return f"{self.help} [{allowed + ', ' if allowed else ''}default: {shown}]"


def option(default: Any, opt: Option) -> Any:
    """A config field that is also the recipe knob `opt`."""
    return dataclasses.field(default=default, metadata={OPTION: opt})


def field_options(config_class: type) -> dict[str, tuple[Option, Any]]:
    """config field name -> (its knob, the field's default), for the fields that are knobs."""
    out: dict[str, tuple[Option, Any]] = {}
    for f in dataclasses.fields(config_class):
        opt = f.metadata.get(OPTION)
        if opt is not None:
            out[f.name] = (opt, f.default)
    return out


def validate_config(config: Any, owner: str) -> None:
    """Check a config's knob fields against their declarations (the same facts as the CLI and the API), naming
    them as `<pass> <field>`: a config built by hand is held to the same rules."""
    for name, (opt, _) in field_options(type(config)).items():
        value = getattr(config, name)
        if value is not None:
            opt.validate(value, f"{owner} {name}")


def _power_of_two(v: int) -> tuple[str, str | None] | None:
    return None if v & (v - 1) == 0 else ("must be a power of two >= 16", "use 16, 32, 64 or 128")


# Knobs more than one pass family reads live here; the others live beside their pass.
CALIBRATION_SAMPLES = Option("calibration_samples", "Calibration texts to use, a seeded choice.", int, low=1,
                             default=256)
BLOCK_SIZE = Option("block_size", "int4 (and decoder codebooks): weights per quantization block, a power of two "
                    ">= 16.", int, low=16, check=_power_of_two, hint="use 16, 32, 64 or 128", default=32)
