"""The workflow configuration: schema validation with closed sections and start-up messages.

``metsflow/schemas/config.schema.yaml`` (linked as ``config/schemas/``) types the keys users
set; every section is closed (``additionalProperties: false``), so a typo such as
``train.learing_rate`` stops the run at start-up, naming the key, the section and the nearest
valid name, instead of being silently ignored for a night of cluster time.

A section whose knobs are a settings dataclass of ``metsflow.core.settings`` (model, preprocess,
register, train, train.stage2) names it in ``x-keys-from``; its fields are the section's keys, so the
dataclass stays the one owner of the knobs and their defaults (the modules' ``DEFAULTS`` dicts
derive from it). ``metsflow.core.settings`` imports nothing heavy: reading ``metsflow.models.train`` itself
would pull in torch and MONAI, 5.6 s added to every dry run on the 2-core test machine
(``metsflow.imaging.preprocess``: 2.8 s, ANTs). ``x-keys-from`` may also name another section
(``#/properties/model``): the re-segmentation model takes any model or training key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import os
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

# The package's schema folder (data, not code): every schema is read from here.
SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"
SCHEMA_PATH = SCHEMA_DIR / "config.schema.yaml"


class ConfigError(ValueError):
    """Every problem of a workflow configuration; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        listing = "\n".join(f"  - {problem}" for problem in self.problems)
        what = f"configuration {source}" if source else "configuration"
        super().__init__(f"{what}: {len(self.problems)} problem(s):\n{listing}")


# JSON-schema types of the annotations of settings fields (``from __future__ import
# annotations`` keeps them as text); a field typed ``Any`` is left untyped.
_JSON_TYPES = {
    "float": "number",
    "int": "integer",
    "str": "string",
    "bool": "boolean",
    "list": "array",
    "tuple": "array",
    "dict": "object",
    "None": "null",
}


def _field_schema(f: dataclasses.Field) -> dict:
    """A settings field's schema: its annotation's type with the constraints of its
    ``metsflow.core.settings.setting`` metadata."""
    kinds = []
    for part in str(f.type).split("|"):
        kind = _JSON_TYPES.get(part.strip().split("[")[0])
        if kind is None:  # Any, or a type with no JSON counterpart
            return dict(f.metadata.get("schema", {}))
        kinds.append(kind)
    if "number" in kinds and "integer" in kinds:
        kinds.remove("integer")
    return {"type": kinds[0] if len(kinds) == 1 else kinds, **f.metadata.get("schema", {})}


def _settings_fields(module: str, name: str) -> dict[str, dict]:
    """Field name -> schema of the settings dataclass ``name`` of ``module``
    (``metsflow.core.settings``, which imports nothing heavy)."""
    cls = getattr(importlib.import_module(module), name)
    return {f.name: _field_schema(f) for f in dataclasses.fields(cls)}


def section_problems(section: Any, where: str) -> list[str]:
    """The values of the settings dataclass instance ``section`` that break their own
    ``setting(...)`` schema (type, range, enum), one line each, keys named ``where.key``: the
    workflow's schema checks a config's sections at parse time, this checks settings built
    elsewhere (a checkpoint's, a benchmark's) against the same one owner of the bounds."""
    from metsflow.core.io import plain  # numpy and nibabel: not on every dry run's path

    errors = _section_validator(type(section)).iter_errors(plain(section))
    return sorted(f"{where}.{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


@cache
def _section_validator(cls: type) -> jsonschema.Draft202012Validator:
    fields = dataclasses.fields(cls)
    schema = {"type": "object", "properties": {f.name: _field_schema(f) for f in fields}}
    return jsonschema.Draft202012Validator(schema)


def _derived_keys(spec: str, root: dict) -> dict[str, dict]:
    if spec.startswith("#/"):
        section = root
        for part in spec[2:].split("/"):
            section = section[part]
        # The keys of another section with their schemas; its sub-sections stay its own.
        return {
            key: copy.deepcopy(sub)
            for key, sub in section.get("properties", {}).items()
            if "properties" not in sub
        }
    module, name = spec.split(":")
    return _settings_fields(module, name)


def _subschemas(schema: Any) -> Iterator[dict]:
    if isinstance(schema, dict):
        yield schema
        for value in schema.values():
            yield from _subschemas(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _subschemas(value)


@cache
def _schema() -> dict:
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    # Sections named by another section (#/...) are completed after the module-backed ones.
    pending = [s for s in _subschemas(schema) if "x-keys-from" in s]
    pending.sort(key=lambda s: any(spec.startswith("#/") for spec in s["x-keys-from"]))
    for section in pending:
        properties = section.setdefault("properties", {})
        for spec in section["x-keys-from"]:
            for key, derived in _derived_keys(spec, schema).items():
                # What the schema file says about a key wins over what the field implies.
                properties[key] = {**derived, **properties.get(key, {})}
    return schema


def schema() -> dict:
    """The effective schema (module knobs added to their sections); a copy."""
    return copy.deepcopy(_schema())


def _with_defaults(validator_class):
    """A validator that fills in schema defaults while validating (as snakemake.utils.validate
    does with ``set_default=True``)."""
    check_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema:
                    instance.setdefault(name, copy.deepcopy(subschema["default"]))
        yield from check_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _where(path) -> str:
    return ".".join(str(part) for part in path)


def _unknown_keys(error: jsonschema.ValidationError) -> list[str]:
    section = _where(error.absolute_path)
    known = sorted(error.schema.get("properties", {}))
    unknown = [key for key in error.instance if key not in known]
    where = f"section {section!r}" if section else "the top level"
    lines = []
    for key in unknown:
        near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        full = f"{section}.{key}" if section else str(key)
        lines.append(
            f"unknown key {full!r} in {where}{hint} (valid: {', '.join(known)})"
            if not near
            else f"unknown key {full!r} in {where}{hint}"
        )
    return lines


def problems(config: Mapping, partial: bool = False) -> list[str]:
    """Every problem of ``config`` against the schema, one line each; fills in defaults.

    ``partial``: ``config`` overlays the workflow's default config (a ``--configfile`` of a CLI
    command, e.g. config/cohort.yaml): required keys may be missing and nothing is filled in;
    every key it has is checked as the workflow checks it."""
    if partial:
        config = copy.deepcopy(config)
    validator = _with_defaults(jsonschema.Draft202012Validator)(_schema())
    found = []
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if partial:
        errors = [e for e in errors if e.validator != "required"]
    for error in errors:
        if error.validator == "additionalProperties" and error.schema.get("properties"):
            found += _unknown_keys(error)
        else:
            where = _where(error.absolute_path) or "config"
            # "is not valid under any of the given schemas" says nothing: name what is valid.
            if error.validator in ("anyOf", "oneOf") and "description" in error.schema:
                found.append(f"{where}: {error.instance!r} is not {error.schema['description']}")
            else:
                found.append(f"{where}: {error.message}")
    if not found:
        # What no JSON schema says (per-level lists of one length, the patch size against
        # the network's stride): needs typed values, so only once the schema holds.
        from metsflow.core.settings import config_problems

        found += config_problems(config)
    return found


def validate(config: dict) -> dict:
    """Validate ``config`` in place (defaults filled in); raise ``ConfigError`` listing every
    problem."""
    found = problems(config)
    if found:
        raise ConfigError(found)
    return config


def read(path: str | os.PathLike) -> dict:
    """One YAML config file; an unreadable file or one that is not a mapping raises
    ``ConfigError`` naming it."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([f"cannot read it: {exc}"], source=str(path)) from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(
            [f"expected a mapping of settings (key: value), got a YAML {type(config).__name__}"],
            str(path),
        )
    return config


def load(path: str | os.PathLike) -> dict:
    """The ``--configfile`` of a CLI command: read and checked with the workflow's schema, closed
    sections and nearest-name hints (a typo such as ``label_stroe`` is refused, not silently
    replaced by the default folder); an overlay of the default config, as Snakemake's
    ``--configfile``, so required keys may be missing. Returns it as written (no defaults)."""
    config = read(path)
    found = problems(config, partial=True)
    if found:
        raise ConfigError(found, source=str(path))
    return config
