"""Jinja for strings that come from recipes, flags and the project's launch files: jinja2's immutable sandbox
(a template cannot reach Python internals such as `cycler.__init__.__globals__`, nor change the values it is
given) with undefined names as errors, never as empty text."""

from __future__ import annotations

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


def environment(**options) -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, **options)
