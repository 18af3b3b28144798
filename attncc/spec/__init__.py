"""The spec language (format v1): loading with positions, the pydantic models, the mask parser
driven by the primitive registry, the JSON schema, and resolution of a spec for one site
(:func:`plan_for`). Built on :mod:`attncc.ir`; imports nothing above it."""

from attncc.spec.errors import SpecError
from attncc.spec.load import load_spec
from attncc.spec.models import Spec
from attncc.spec.parse import parse_mask
from attncc.spec.resolve import (
    PositionError,
    ResolvedPolicy,
    SiteShape,
    check_executable,
    plan_for,
    resolve,
    runtime_problem,
)
from attncc.spec.schema import json_schema

__all__ = [
    "Spec",
    "SpecError",
    "load_spec",
    "parse_mask",
    "json_schema",
    "SiteShape",
    "PositionError",
    "plan_for",
    "resolve",
    "ResolvedPolicy",
    "check_executable",
    "runtime_problem",
]
