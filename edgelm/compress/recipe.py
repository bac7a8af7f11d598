"""Compression recipes: an ordered list of typed steps, each applied to a model in turn.

    recipe = [RTN(bits=4, group_size=64)]
    model = compress(model, recipe)

Steps are frozen dataclasses. Parsing from YAML/JSON-like dicts is strict: an unknown step, an unknown
field or a value of the wrong type is a RecipeError naming it (with the closest valid name), never ignored.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import sys
import types
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, ClassVar

from torch import nn

from edgelm.errors import RecipeError

STEPS: dict[str, type[Step]] = {}


@dataclass(frozen=True)
class Step:
    """Base of all recipe steps. Subclasses set `name` and implement `apply`."""

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False  # data-aware steps observe activations of calibration text
    needs_reference: ClassVar[bool] = False  # steps that compare with the uncompressed model (distillation)
    changes_reference: ClassVar[bool] = False  # steps that re-express the reference too (AWQ's scale folding)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            STEPS[cls.name] = cls

    def check(self, model: nn.Module) -> None:
        """Refuse a model this step cannot work on (RecipeError), before anything slow such as calibration."""

    def apply(self, model: nn.Module, calibration: Any = None) -> nn.Module:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {self.name: {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Step:
        known = {f.name: f for f in fields(cls)}
        hints = typing.get_type_hints(cls)
        for key in values:
            if key not in known:
                raise RecipeError(f"step '{cls.name}' has no field '{key}'{_suggest(key, known)}; "
                                  f"valid fields: {', '.join(known)}")
        kwargs = {}
        for key, value in values.items():
            kwargs[key] = _coerce(cls.name, key, value, hints[key])
        missing = [f.name for f in known.values()
                   if f.name not in kwargs and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise RecipeError(f"step '{cls.name}' needs field(s) {', '.join(missing)}")
        try:
            return cls(**kwargs)
        except ValueError as exc:
            raise RecipeError(f"step '{cls.name}': {exc}") from None


def parse_recipe(data: Any) -> list[Step]:
    """[{"rtn": {"bits": 4}}, {"gptq": {...}}] (the YAML form) -> typed steps."""
    if isinstance(data, dict) and "steps" in data:
        data = data["steps"]
    if not isinstance(data, list) or not data:
        raise RecipeError("a recipe is a non-empty list of steps, e.g. [{rtn: {bits: 4, group_size: 64}}]")
    steps = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise RecipeError(f"recipe step {i + 1} must be a mapping with one key (the method), got {item!r}")
        (method, values), = item.items()
        if method not in STEPS:
            raise RecipeError(f"unknown compression method '{method}'{_suggest(method, STEPS)}; "
                              f"available: {', '.join(sorted(STEPS))}")
        if values is not None and not isinstance(values, dict):
            raise RecipeError(f"recipe step {i + 1} ({method}): its fields must be a mapping, e.g. "
                              f"{{{method}: {{bits: 4}}}}, got {values!r}")
        steps.append(STEPS[method].from_dict(values or {}))
    return steps


def compress(model: nn.Module, recipe: list[Step] | Step, calibration: Any = None,
             reference: nn.Module | None = None, device: str | None = None) -> nn.Module:
    """Apply each step of the recipe to the model in order; returns the model. Most steps work in place, but
    some build a new one (structured pruning makes a smaller model): always use the returned model.

    Steps that need the uncompressed model (needs_reference) find it as `model.compression_reference` while
    the recipe runs: `reference` when given (distilling a model that is already compressed), otherwise a
    copy taken before the first step.

    `device` (e.g. "cuda") is where the training steps (distill, distill_weights, distill_blackbox, qat) run
    their optimisation loop, model and teacher moved there for the loop and back; the other steps and the
    returned model stay on the CPU.
    """
    steps = [recipe] if isinstance(recipe, Step) else list(recipe)
    if device is not None:
        from edgelm.runtime.device import resolve_device

        device = resolve_device(device)
    if any(step.needs_reference for step in steps):
        # Set past nn.Module.__setattr__ so the copy is not registered as a submodule (its parameters
        # must not count as the model's). An already-compressed model is given its teacher explicitly; a
        # step that re-expresses the reference works on a copy of it, never on the caller's model.
        if reference is None or any(step.changes_reference for step in steps):
            reference = copy.deepcopy(model if reference is None else reference)
        object.__setattr__(model, "compression_reference", reference.eval())
    if device is not None:
        model.__dict__["compression_device"] = device
    given = model
    try:
        for step in steps:
            step.check(model)
            model = step.apply(model, calibration)
    finally:
        for holder in (given, model):  # a step that builds a new model hands these on to it
            holder.__dict__.pop("compression_reference", None)
            holder.__dict__.pop("compression_device", None)
    return model


def reference_model(model: nn.Module, step: str) -> nn.Module:
    reference = getattr(model, "compression_reference", None)
    if reference is None:
        raise RecipeError(f"{step} compares with the uncompressed model: run it through compress() with the "
                          "quantization steps in the same recipe, e.g. [rtn, {step}]")
    return reference


# -- shared by the steps ------------------------------------------------------------------------------------
def progress(items, desc: str, unit: str):
    """A progress bar on stderr over the items of a long compression step (stdout stays for results)."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, file=sys.stderr)


# -- module selection, shared by the steps -----------------------------------------------------------------
def target_modules(model: nn.Module, *, embedding: bool, ignore: tuple[str, ...] = ()) -> list[tuple[str, nn.Module]]:
    """Linear layers (and the token embedding when asked) by name, minus names matching `ignore` globs."""
    picked = []
    for name, module in model.named_modules():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in ignore):
            continue
        if isinstance(module, nn.Linear) or (embedding and isinstance(module, nn.Embedding)):
            picked.append((name, module))
    return picked


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(step: str, key: str, value: Any, hint: Any) -> Any:
    """Check a recipe value against its annotation; tuples accept lists (YAML has no tuples)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(step, key, value, option)
            except RecipeError:
                continue
        raise RecipeError(f"step '{step}': field '{key}' = {value!r} does not fit {hint}")
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)) or not all(type(v) is item for v in value):
            kind = {str: "strings", int: "integers"}.get(item, item.__name__)
            raise RecipeError(f"step '{step}': field '{key}' must be a list of {kind}, got {value!r}")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise RecipeError(f"step '{step}': field '{key}' must be {hint.__name__}, got {value!r}")
    return value
