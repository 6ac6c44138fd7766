"""The jinja environment of the templates (templates/, or the installed attncc/templates): one
place, below every codegen module that renders a template."""
from __future__ import annotations

import jinja2

from attncc.codegen.text import escaped, py_str
from attncc.core.resources import templates_dir

TEMPLATES = templates_dir()  # installed package data, or templates/ of a source checkout


def environment() -> jinja2.Environment:
    """The templates' jinja environment."""
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
