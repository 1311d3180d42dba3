"""The config dataclasses as a JSON Schema (for editors and validators) and as reference rows.

One source: the types, defaults and bounds come from the dataclass fields, each key's
description from its docstring (the string literal written under the field).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from typing import Any, Iterator, Literal, NamedTuple

from rnnkit.config.core import Config, TrainConfig, describe_range
from rnnkit.config.tasks import TASKS

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


@functools.lru_cache(maxsize=None)
def _own_docs(cls: type) -> dict[str, str]:
    """The docstrings of the fields ``cls`` itself declares."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Every field's description, inherited ones included (a subclass's own text wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_docs(klass))
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:   # type: ignore[misc]
        value = f.default_factory()                      # type: ignore[misc]
        return None if dataclasses.is_dataclass(value) else value
    return None


def _type_schema(tp: Any) -> dict[str, Any]:
    if tp is Any:
        return {"type": "object"}
    origin = typing.get_origin(tp)
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        schema = _type_schema(inner)
        if "enum" in schema:
            return {"enum": schema["enum"] + [None]}
        return {**schema, "type": [schema["type"], "null"]}
    if origin is list:
        return {"type": "array", "items": _type_schema(typing.get_args(tp)[0])}
    return {"type": {int: "integer", float: "number", bool: "boolean", str: "string"}[tp]}


def _bounds(f: dataclasses.Field) -> dict[str, Any]:
    rng = f.metadata.get("range")
    if not rng:
        return {}
    lo, hi, lo_open, hi_open = rng
    out = {}
    if lo is not None:
        out["exclusiveMinimum" if lo_open else "minimum"] = lo
    if hi is not None:
        out["exclusiveMaximum" if hi_open else "maximum"] = hi
    return out


def _def_name(cls: type) -> str:
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def _section(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    """The schema of one dataclass section; nested sections go into ``defs`` and are referenced."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    props = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            name = _def_name(tp)
            if name not in defs:
                defs[name] = {}
                defs[name] = _section(tp, defs)
            props[f.name] = {"$ref": f"#/$defs/{name}", "description": docs.get(f.name, "")}
            continue
        prop = {"description": docs.get(f.name, ""), **_type_schema(tp), **_bounds(f)}
        if "pattern" in f.metadata:
            prop["pattern"] = f.metadata["pattern"]
        prop["default"] = _default(f)
        props[f.name] = prop
    return {"type": "object", "description": (cls.__doc__ or "").strip(), "properties": props,
            "additionalProperties": False}


def json_schema() -> dict[str, Any]:
    """One JSON Schema for every config file: the shared keys, and per ``task`` its sections."""
    defs: dict[str, Any] = {}
    top = _section(Config, defs)
    top["properties"]["task"]["enum"] = list(TASKS)
    top["properties"]["data"] = {"type": "object", "description": "The task's data section (see its task)."}
    top["properties"]["model"] = {"type": "object", "description": "The task's model section (see its task)."}
    branches = []
    for name, schema in TASKS.items():
        data, model = _def_name(schema.data), _def_name(schema.model)
        defs.setdefault(data, _section(schema.data, defs))
        defs.setdefault(model, _section(schema.model, defs))
        chosen: dict[str, Any] = {"properties": {"task": {"const": name}}, "required": ["task"]}
        if name == Config.task:
            chosen = {"anyOf": [chosen, {"not": {"required": ["task"]}}]}
        branches.append({"if": chosen, "then": {"properties": {
            "data": {"$ref": f"#/$defs/{data}"}, "model": {"$ref": f"#/$defs/{model}"},
            "train": {"properties": {"metric": {"enum": list(schema.metrics)}}}}}})
    return {"$schema": SCHEMA_DIALECT, "title": "rnnkit run config",
            "description": "A run of rnnkit train: task, run_dir, seed, and the data, model and train sections.",
            **{k: v for k, v in top.items() if k != "description"}, "allOf": branches,
            "$defs": dict(sorted(defs.items()))}


# --------------------------------------------------------------------------- reference rows
class KeyRow(NamedTuple):
    key: str          # dotted, from the section's root
    type: str
    default: Any
    allowed: str      # choices or bounds
    description: str


def _type_words(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "choice"
    if tp is Any:
        return "section"
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_words(inner)} or null"
    if origin is list:
        return f"list of {_type_words(typing.get_args(tp)[0])}"
    return {int: "integer", float: "number", bool: "boolean", str: "text"}[tp]


def _allowed(tp: Any, f: dataclasses.Field) -> str:
    inner = [a for a in typing.get_args(tp) if a is not type(None)] \
        if typing.get_origin(tp) in (typing.Union, types.UnionType) else [tp]
    if typing.get_origin(inner[0]) is Literal:
        return ", ".join(f"`{a}`" for a in typing.get_args(inner[0]))
    rng = f.metadata.get("range")
    return describe_range(*rng) if rng else ""


def key_rows(cls: type, prefix: str = "") -> Iterator[KeyRow]:
    """Every key of a section, nested sections flattened to dotted keys, in declaration order."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from key_rows(tp, key + ".")
        elif f.name not in ("data", "model") or cls is not Config:
            yield KeyRow(key, _type_words(tp), _default(f), _allowed(tp, f), docs.get(f.name, ""))


def sections() -> Iterator[tuple[str, str, list[KeyRow]]]:
    """(title, prefix, rows) of every section the reference shows: the shared ones, then each task's."""
    top = [r for r in key_rows(Config) if not r.key.startswith("train.")]
    yield "Top level", "", top
    yield "train (every task)", "train.", list(key_rows(TrainConfig, "train."))
    for name, schema in TASKS.items():
        yield f"task: {name}, data", "data.", list(key_rows(schema.data, "data."))
        yield f"task: {name}, model", "model.", list(key_rows(schema.model, "model."))
