"""Recipes: a name -> an ordered list of passes, derived from the pass registry (passes/base.register).

A new recipe is a new pass file with `@register(recipe=...)`, never an entry here or a branch in the pipeline.
Passes compose in a fixed order: structural passes (pruning, low-rank), enabled by their knobs, first; then the
recipe's pass for the model's task. The knobs (RecipeOptions) are the option fields of the registered pass configs
(passes/options.py): the CLI flags, this module's validation and `edgecompress recipes` all read them there.

Layering: imports passes (base, options) only; never pipeline, search or cli.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from edgecompress.errors import ConfigError
from edgecompress.passes.base import Pass, TaskTraits, WeightBytes, registered
from edgecompress.passes.options import Option, field_options
from edgecompress.tasknames import DECODER_TASKS, ENCODER_TASKS

FP32_DESCRIPTION = "export only: the FP32 ONNX model, verified against PyTorch"


@dataclass(frozen=True)
class RecipeSpec:
    """A recipe: its pass per task (none for fp32), and what the search and the kernel check need to know."""

    name: str
    description: str
    variants: Mapping[str, type[Pass[Any]]] = field(default_factory=dict)  # task -> the pass
    quantizing: bool = False
    tasks: tuple[str, ...] = ENCODER_TASKS
    refusals: Mapping[str, str] = field(default_factory=dict)  # task -> why the recipe refuses it
    search: tuple[dict[str, Any], ...] = ({},)
    weight_bytes: Any = None  # WeightBytes | knobs -> WeightBytes

    def pass_for(self, task: str | None) -> type[Pass[Any]] | None:
        if not self.variants:
            return None
        return self.variants.get(task or ENCODER_TASKS[0]) or self.variants.get(ENCODER_TASKS[0])

    def bytes_for(self, knobs: Mapping[str, Any]) -> WeightBytes | None:
        return self.weight_bytes(knobs) if callable(self.weight_bytes) else self.weight_bytes

    def requires(self, target: Any, info: Any = None) -> str | None:
        """Why this recipe cannot help on the target (its pass's `requires`), or None."""
        cls = self.pass_for(getattr(info, "task", None))
        return (cls.refuses(info) or cls.requires(target, info)) if cls is not None else None


@cache
def _catalog() -> tuple[dict[str, RecipeSpec], tuple[type[Pass[Any]], ...], dict[str, Option]]:
    """(recipes, structural passes, knobs) from the registry; computed once."""
    recipes: dict[str, RecipeSpec] = {
        "fp32": RecipeSpec("fp32", FP32_DESCRIPTION, tasks=(*ENCODER_TASKS, *DECODER_TASKS),
                           weight_bytes=WeightBytes(4.0, 4.0, "fp32"))}
    structural: list[type[Pass[Any]]] = []
    knobs: dict[str, Option] = {}
    for cls in registered():
        reg = cls.registration
        assert reg is not None
        for _, (opt, _default) in field_options(cls.config_class).items():
            if knobs.setdefault(opt.name, opt) != opt:
                raise TypeError(f"knob {opt.name} is declared twice with different facts ({cls.__name__}): "
                                "share one Option object")
        if reg.structural:
            structural.append(cls)
            continue
        spec = recipes.get(reg.recipe)
        if spec is None:
            recipes[reg.recipe] = RecipeSpec(reg.recipe, reg.description, {t: cls for t in reg.tasks}, reg.quantizes,
                                             reg.tasks, dict(reg.refusals), reg.search or ({},), reg.weight_bytes)
        else:  # another task's variant of a recipe (e.g. the decoder's int4)
            recipes[reg.recipe] = RecipeSpec(
                spec.name, spec.description or reg.description, {**spec.variants, **{t: cls for t in reg.tasks}},
                spec.quantizing or reg.quantizes, (*spec.tasks, *reg.tasks),
                {k: v for k, v in spec.refusals.items() if k not in reg.tasks},
                spec.search + tuple(s for s in reg.search if s not in spec.search), spec.weight_bytes)
    return recipes, tuple(structural), knobs


class _Recipes(Mapping[str, RecipeSpec]):
    """RECIPES, read from the registry on first use (importing every pass module is not free)."""

    def __getitem__(self, name: str) -> RecipeSpec:
        return _catalog()[0][name]

    def __iter__(self) -> Iterator[str]:
        return iter(_catalog()[0])

    def __len__(self) -> int:
        return len(_catalog()[0])


RECIPES: Mapping[str, RecipeSpec] = _Recipes()


def structural_classes() -> tuple[type[Pass[Any]], ...]:
    return _catalog()[1]


def knobs() -> dict[str, Option]:
    """Every recipe knob by name (API argument), in registration order."""
    return dict(_catalog()[2])


def knob_default(name: str) -> Any:
    """A knob's default: its declared one, else the default of the first config field that is this knob."""
    opt = knobs()[name]
    if opt.default is not None:
        return opt.default
    for cls in registered():
        for _, (o, default) in field_options(cls.config_class).items():
            if o.name == name:
                return None if o.enables and default else default
    return None


class RecipeOptions:
    """The recipe knobs given (API arguments or CLI flags), each validated by its declaration on construction, so a
    bad value is a one-line ConfigError (exit 2) before any work starts. Unset knobs read as their defaults.

    `source` says how errors name a knob: "api" (codebook_bits) or "cli" (--codebook-bits).
    """

    __slots__ = ("_values", "source")

    def __init__(self, _source: str = "api", **values: Any) -> None:
        table = knobs()
        checked: dict[str, Any] = {}
        for name, value in values.items():
            opt = table.get(name)
            if opt is None:
                close = difflib.get_close_matches(name, list(table), n=2)
                shown = name if _source == "api" else "--" + name.replace("_", "-")
                raise ConfigError(f"unknown recipe option '{shown}'",
                                  hint=f"did you mean {' or '.join(close)}?" if close
                                  else f"options: {', '.join(table)}")
            checked[name] = opt.validate(value, opt.label(_source))
        object.__setattr__(self, "_values", checked)
        object.__setattr__(self, "source", _source)

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> RecipeOptions:
        """From the CLI: flags left out (None) are not given."""
        return cls("cli", **{k: v for k, v in flags.items() if v is not None})

    @property
    def given(self) -> dict[str, Any]:
        return dict(self._values)

    def label(self, name: str) -> str:
        return knobs()[name].label(self.source)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._values:
            return self._values[name]
        if name in knobs():
            return knob_default(name)
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("RecipeOptions is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecipeOptions) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values.items())))

    def __repr__(self) -> str:
        return f"RecipeOptions({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    def __reduce__(self) -> Any:  # picklable for sweep workers
        return (_restore, (self.source, self._values))


def _restore(source: str, values: dict[str, Any]) -> RecipeOptions:
    return RecipeOptions(source, **values)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    passes: tuple[Pass[Any], ...]
    quantizing: bool

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "description": self.description,
                "passes": [p.describe() for p in self.passes]}


def _enabled(cls: type[Pass[Any]], values: Mapping[str, Any]) -> bool:
    return any(values.get(opt.name) for _, (opt, _) in field_options(cls.config_class).items() if opt.enables)


def structural_passes(options: RecipeOptions, task: str | None = None) -> list[Pass[Any]]:
    """Passes that change the graph's shape, run before any recipe's own passes (prune, then low-rank), each when
    one of its enabling knobs is set. They compose with every recipe (e.g. `--recipe int8-dynamic --prune-ffn 0.3`)."""
    values = options.given
    traits = task_traits(task)
    return [cls(cls.configure(values, traits)) for cls in structural_classes() if _enabled(cls, values)]


def task_traits(task: str | None) -> TaskTraits:
    """What passes may read about `task` when configured, from its adapter's facts (tasks/)."""
    from edgecompress.tasks import registered_tasks

    facts = registered_tasks().get(task) if task is not None else None
    return TaskTraits(task, aligns_to_weight_block=facts is not None and facts.aligns_to_weight_block)


def recipe_knobs(spec: RecipeSpec) -> list[Option]:
    """The knobs a recipe's own passes read (any task), in declaration order."""
    seen: dict[str, Option] = {}
    for cls in spec.variants.values():
        for _, (opt, _) in field_options(cls.config_class).items():
            seen.setdefault(opt.name, opt)
    return list(seen.values())


def structural_knobs() -> list[Option]:
    """The knobs of the structural passes, which compose with every recipe."""
    seen: dict[str, Option] = {}
    for cls in structural_classes():
        for _, (opt, _) in field_options(cls.config_class).items():
            seen.setdefault(opt.name, opt)
    return list(seen.values())


def default_recipe(target_default: str, task: str) -> str:
    """The target's default recipe, or for a task it refuses (a decoder on an int8 target) the edge default int4."""
    spec = RECIPES.get(target_default)
    if spec is None or task in spec.tasks:
        return target_default
    return "int4" if task in RECIPES["int4"].tasks else "fp32"


def _check_applicable(name: str, task: str | None, classes: list[type[Pass[Any]]], options: RecipeOptions) -> None:
    """A knob that nothing in this recipe reads is an error (it used to be ignored silently)."""
    read = {opt.name for cls in classes for _, (opt, _) in field_options(cls.config_class).items()}
    enabling = {opt.name for cls in structural_classes() for _, (opt, _) in field_options(cls.config_class).items()
                if opt.enables}
    for knob in options.given:
        need = knobs()[knob].only_with
        if need is not None and options.given.get(need[0]) != need[1]:
            wanted = f"{options.label(need[0])}{'=' if options.source == 'api' else ' '}{need[1]}"
            raise ConfigError(f"{options.label(knob)} does nothing without {wanted}",
                              hint=f"give {wanted}, or leave {options.label(knob)} out")
        if knob in read or knob in enabling:
            continue
        owners = [cls for cls in structural_classes()
                  if knob in {o.name for _, (o, _) in field_options(cls.config_class).items()}]
        if owners:  # a structural pass's knob without the knob that turns it on
            ons = [knobs()[o.name].label(options.source) for _, (o, _) in field_options(owners[0].config_class).items()
                   if o.enables]
            raise ConfigError(f"{options.label(knob)} does nothing without {' or '.join(ons)}",
                              hint=f"give {' or '.join(ons)}, or leave {options.label(knob)} out")
        users = [r.name for r in RECIPES.values()
                 if any(knob in {o.name for _, (o, _) in field_options(c.config_class).items()}
                        for c in r.variants.values())]
        for_task = f" for {task} models" if task and name in users else ""  # another task's variant reads it
        raise ConfigError(f"{options.label(knob)} does not apply to recipe '{name}'{for_task}",
                          hint=f"it applies to {', '.join(users)}; leave it out" if users else "leave it out")


def make_recipe(name: str, options: RecipeOptions | None = None, task: str | None = None) -> Recipe:
    spec = RECIPES.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, list(RECIPES), n=2)
        hint = f"did you mean {' or '.join(close)}?" if close else f"recipes: {', '.join(RECIPES)}"
        raise ConfigError(f"unknown recipe '{name}'", hint=hint)
    if task is not None and task not in spec.tasks:
        why = spec.refusals.get(task, "")
        raise ConfigError(f"recipe '{name}' does not apply to {task} models" + (f": {why}" if why else ""),
                          hint=f"it supports {', '.join(spec.tasks)}")
    options = options or RecipeOptions()
    values = options.given
    classes = [cls for cls in structural_classes() if _enabled(cls, values)]
    own = spec.pass_for(task)
    if own is not None:
        classes.append(own)
    _check_applicable(name, task, classes, options)
    traits = task_traits(task)
    return Recipe(name=spec.name, description=spec.description,
                  passes=tuple(cls(cls.configure(values, traits)) for cls in classes), quantizing=spec.quantizing)


__all__ = ["RECIPES", "Recipe", "RecipeOptions", "RecipeSpec", "default_recipe", "knobs",
           "make_recipe", "structural_passes"]
