"""The jinja environment of the templates (templates/, or the installed attncc/templates): one
place, below every codegen module that renders a template."""
from __future__ import annotations

import functools

import jinja2

from attncc.codegen.text import escaped, py_str
from attncc.core.resources import templates_dir

TEMPLATES = templates_dir()  # installed package data, or templates/ of a source checkout


@functools.lru_cache(maxsize=None)
def environment() -> jinja2.Environment:
    """The templates' jinja environment, one per process: compiling the templates was most of the
    time of rendering a module when each render made its own. Jinja checks a template's file at
    each load and compiles it again when it changed. Callers do not change it: one that wants
    other templates in front takes an ``overlay`` of it."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    # Text the compiler did not write (paths, printed expressions, notes) goes through these two
    # (attncc.codegen.text); jinja's tojson is not a Python literal (astral characters, escapes).
    env.filters["escaped"] = escaped
    env.filters["py_str"] = py_str
    # kernel signatures and calls without unread parameters (attncc.codegen.params)
    env.filters["signature"] = jinja2.pass_context(lambda context, text: context["sig"].define(text))
    env.filters["kernel_call"] = jinja2.pass_context(lambda context, text: context["sig"].call(text))
    return env
