"""The JSON schema of spec format v1, its mask part built from the primitive registry."""

from __future__ import annotations

from typing import Any

from attncc.ir import masks as M
from attncc.spec.models import Spec


def _obj(key: str, arg: dict, description: str) -> dict:
    return {
        "type": "object",
        "description": description,
        "properties": {key: arg},
        "required": [key],
        "additionalProperties": False,
    }


def mask_defs() -> dict[str, dict]:
    """``$defs/Mask``: a bare name (a primitive without argument, or a named mask) or a mapping
    with one registered primitive key."""
    bare = [p.key for p in M.PRIMITIVES.values() if p.bare]
    names = " or ".join(f"'{k}'" for k in bare)
    return {
        "Mask": {
            "description": "A mask: a predicate of (head, q, kv) over token positions. A string is "
            f"{names} or the name of a mask defined earlier under `masks`; a mapping has exactly "
            "one key naming the construct.",
            "anyOf": [
                {
                    "type": "string",
                    "description": ", ".join(f"'{p.key}' ({p.description})" for p in M.PRIMITIVES.values() if p.bare)
                    + " or a named mask",
                },
                *(_obj(p.key, p.schema, p.description) for p in M.PRIMITIVES.values() if p.schema is not None),
            ],
        }
    }


def json_schema() -> dict:
    """The JSON schema of spec format v1, masks described recursively (``$defs/Mask``)."""

    def link(node: Any) -> Any:
        if isinstance(node, dict):
            if node.pop("x-attncc-mask", False):
                node["$ref"] = "#/$defs/Mask"
            return {k: link(v) for k, v in node.items()}
        if isinstance(node, list):
            return [link(v) for v in node]
        return node

    schema = link(Spec.model_json_schema(by_alias=True))
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "attncc spec v1"
    schema.setdefault("$defs", {}).update(mask_defs())
    return schema
