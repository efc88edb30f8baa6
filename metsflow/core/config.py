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

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        listing = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"configuration: {len(self.problems)} problem(s):\n{listing}")


def _settings_fields(module: str, name: str) -> list[str]:
    """Field names of the settings dataclass ``name`` of ``module`` (``metsflow.core.settings``,
    which imports nothing heavy)."""
    return [f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))]


def _derived_keys(spec: str, root: dict) -> list[str]:
    if spec.startswith("#/"):
        section = root
        for part in spec[2:].split("/"):
            section = section[part]
        return list(section.get("properties", {}))
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
            for key in _derived_keys(spec, schema):
                properties.setdefault(key, {})
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


def problems(config: Mapping) -> list[str]:
    """Every problem of ``config`` against the schema, one line each; fills in defaults."""
    validator = _with_defaults(jsonschema.Draft202012Validator)(_schema())
    found = []
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    for error in errors:
        if error.validator == "additionalProperties" and error.schema.get("properties"):
            found += _unknown_keys(error)
        else:
            where = _where(error.absolute_path) or "config"
            found.append(f"{where}: {error.message}")
    return found


def validate(config: dict) -> dict:
    """Validate ``config`` in place (defaults filled in); raise ``ConfigError`` listing every
    problem."""
    found = problems(config)
    if found:
        raise ConfigError(found)
    return config
