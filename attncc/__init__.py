"""attncc: a compiler from declarative attention-pattern specs to Triton kernels.

    module = attncc.compile(spec)      # TOML text, a dict of spec keys or a path -> generated module
    o = module.attention(q, k, v)

Importing ``attncc`` (or ``attncc.runtime``, which generated kernels import) pulls in
no sympy, networkx or jinja2; the compiler stages load when first used.
"""
from attncc.core.version import VERSION as __version__


def __getattr__(name):
    if name == "compile":
        from attncc.module_cache import compile

        return compile
    if name == "reference":
        from attncc._reference import reference

        return reference
    if name in ("load_spec", "parse_spec"):
        from attncc import spec

        return getattr(spec, name)
    raise AttributeError(f"module 'attncc' has no attribute {name!r}")
