"""``attncc.compile(spec)``: a spec (TOML text, a dict of its keys, or a path) -> its generated
module, imported, without the command line.

The generated source is cached on disk, one file per spec: ``<name>_<key>.py`` in
:func:`modules_dir` (``$ATTNCC_CACHE_DIR/modules``, default ``~/.cache/attncc/modules``), where
``key`` hashes the spec text, the label it is known by (its path: it names the module's default
``name`` and shows in the header) and the compiler (:func:`compiler_fingerprint`: the attncc
version and the sources of the core, spec, analysis and codegen stages and the templates, so that a
changed compiler never serves an old file). A process that finds the file only imports it: no
sympy, jinja2 or networkx. Files are written whole (:func:`write_atomic`), so processes that
compile the same spec at once each see either no file or a complete one; each ends with a stamp
(:func:`stamped`: the key and a digest of the text and of the Gluon fragments), and a file whose stamp
does not match (damaged, or not written here) is rendered again, never imported. A cache folder that
cannot be written gives a warning and a temporary folder of the process's own.

A module is imported under the name ``attncc_generated_<name>_<key>`` and registered in
``sys.modules`` (``importlib.import_module`` finds it again; pickle and ``torch.compile`` resolve
its functions), without putting the cache folder on ``sys.path``. File names come from the
validated identifier ``name`` and the hex key only, never from the spec text.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Dict, Optional, Tuple, Union

from attncc.core.files import cache_folder, read_regular_text, write_atomic
from attncc.core.resources import templates_dir
from attncc.core.version import VERSION

SpecLike = Union[str, "os.PathLike[str]", dict]

MODULE_PREFIX = "attncc_generated_"
TEXT_LABEL = "<string>"  # what a spec given as text or as a dict is called in errors (as parse_spec does)

_LOCK = threading.RLock()
_LOADED: Dict[str, ModuleType] = {}  # cache key -> module, for this process
_FINGERPRINT: Optional[str] = None
renders = 0  # sources rendered by this process (a cache hit renders none)


def _refuse_trace() -> None:
    """A call that torch.compile traces breaks the graph here with a message saying what to do: the spec's
    hash and the files are nothing dynamo traces (fullgraph=True failed with "Dynamo does not know how
    to trace the builtin _hashlib.openssl_sha256", naming neither attncc.compile nor the way out)."""
    torch = sys.modules.get("torch")  # (no torch imported: nothing traces)
    if torch is not None and torch.compiler.is_compiling():
        torch._dynamo.graph_break(msg="attncc.compile hashes the spec and reads its cached module: call it outside "
                                      "the function torch.compile traces (m = attncc.compile(spec) once) and call "
                                      "m.attention(...) inside")


def modules_dir() -> Path:
    """Where compiled modules are cached: ``$ATTNCC_CACHE_DIR/modules``, else ``~/.cache/attncc/modules``
    (:func:`attncc.core.files.cache_folder`; the tuning cache: attncc.runtime.tuning.cache_dir)."""
    return cache_folder("modules", "modules")


def compile(spec: SpecLike) -> ModuleType:
    """The generated module of ``spec``, imported (the same object on every call in a process).

    ``spec`` is one of
      * a ``dict`` with the keys of a spec file (``{"mask": {"where": "causal"}}``);
      * a ``pathlib.Path`` (any ``os.PathLike``): the spec file;
      * a ``str``: TOML text if it contains a newline or ``=``, or is blank (every spec with a key
        has an ``=``), else the path of a spec file. Pass a ``Path`` for a file whose name has ``=``.

    Raises the same :class:`attncc.spec.SpecError` as ``attncc build`` for a bad spec (named by
    its path, or ``<string>`` for text and dicts).
    """
    _refuse_trace()
    text, label = spec_source(spec)
    key = cache_key(text, label)
    with _LOCK:
        module = _LOADED.get(key)
        if module is None:
            path = _cached_file(key) or _render_to_cache(text, label, key)
            module = _import(path, MODULE_PREFIX + path.stem)
            _LOADED[key] = module
        return module


def spec_source(spec) -> Tuple[str, str]:
    """(TOML text, label) of what compile() was given."""
    if isinstance(spec, dict):
        return toml_text(spec), TEXT_LABEL
    if isinstance(spec, str) and ("\n" in spec or "=" in spec or not spec.strip()):
        return spec, TEXT_LABEL
    if isinstance(spec, (str, os.PathLike)):
        path = os.fspath(spec)
        if not isinstance(path, str):
            raise TypeError(f"attncc.compile: a spec path must be text, got {type(path).__name__} {path!r}")
        from attncc.core.semantics import MAX_SPEC_BYTES

        try:
            # at most MAX_SPEC_BYTES, UTF-8 whatever the locale, universal newlines: what load_spec reads
            with open(path, "rb") as f:
                data = f.read(MAX_SPEC_BYTES + 1)
            if len(data) <= MAX_SPEC_BYTES:
                text = data.decode("utf-8")
                return text.replace("\r\n", "\n").replace("\r", "\n"), path
        except (OSError, UnicodeDecodeError):
            pass
        from attncc.spec import load_spec

        load_spec(path)  # raises the SpecError the command raises for an unreadable, long or non-UTF-8 file
        raise AssertionError(f"attncc (internal): load_spec read {path!r}, which compile() could not")
    raise TypeError(f"attncc.compile: spec must be TOML text (str), a dict of spec keys or a path, "
                    f"got {type(spec).__name__}")


def cache_key(text: str, label: str) -> str:
    """20 hex digits naming the generated source of ``text`` (known as ``label``) by this compiler."""
    h = hashlib.sha256()
    for part in (compiler_fingerprint(), label, text):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:20]


def compiler_fingerprint() -> str:
    """The attncc version and a hash of every source that shapes generated code."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        package = Path(__file__).resolve().parent
        templates = templates_dir()  # attncc.codegen.TEMPLATES, without importing jinja2
        files = sorted([*package.glob("core/*.py"), *package.glob("spec/*.py"), *package.glob("analysis/*.py"),
                        *package.glob("codegen/*.py"), *templates.glob("*.j2")])
        h = hashlib.sha256(VERSION.encode())
        for f in files:
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
        _FINGERPRINT = f"{VERSION}:{h.hexdigest()[:16]}"
    return _FINGERPRINT


# The last line of a cached module: its key and a digest of the key and of every line above it (and
# of its Gluon fragments file, when it has one). A file that does not end so (empty, truncated,
# edited, another entry's module copied over it) is never imported: compile() renders it again.
STAMP = "# attncc module cache: key "


def _digest(key: str, text: str) -> str:
    return hashlib.sha256(f"{key}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()


def stamped(key: str, module: str, fragments: Optional[str]) -> str:
    """The cached file of ``module`` (a generated module's source) under ``key``: the module, then its stamp."""
    module = module if module.endswith("\n") else module + "\n"
    gluon = "none" if fragments is None else _digest(key, fragments)
    return f"{module}{STAMP}{key} sha256 {_digest(key, module)} fragments {gluon}\n"


def _intact(path: Path, key: str) -> Optional[str]:
    """None when ``path`` is the whole cached module of ``key`` (and its fragments file, if it
    names one, is whole), else what is wrong with it."""
    try:
        text = read_regular_text(path)  # (a named pipe there hung compile())
    except (OSError, UnicodeDecodeError) as e:
        return f"unreadable ({e})"
    body, _, last = text[:-1].rpartition("\n")
    fields = last.split(" ")
    if not text.endswith("\n") or not last.startswith(STAMP) or len(fields) != 10:
        return "no complete attncc stamp at its end (empty, truncated or not written by attncc.compile)"
    stamp_key, digest, gluon = fields[5], fields[7], fields[9]
    if stamp_key != key or digest != _digest(key, body + "\n"):
        return "its text is not the module of this spec (changed, or another entry's file)"
    if gluon != "none":
        fragments = path.with_name(path.stem + _GLUON)
        try:
            ok = _digest(key, read_regular_text(fragments)) == gluon
        except (OSError, UnicodeDecodeError):
            ok = False
        if not ok:
            return f"its Gluon fragments file {fragments.name} is missing or changed"
    return None


_GLUON = "_gluon.py"  # attncc.codegen.GLUON, without importing the code generator


def _cached_file(key: str) -> Optional[Path]:
    """The intact cached module of ``key``, or None (warning when a damaged one is there)."""
    problems = []
    try:
        found = sorted(modules_dir().glob(f"*_{key}.py"))
    except OSError:
        found = []
    for path in found:
        if not path.stem[: -len(key) - 1].isidentifier():
            continue
        problem = _intact(path, key)
        if problem is None:
            return path
        problems.append(f"{path}: {problem}")
    if problems:
        import warnings

        warnings.warn(f"attncc.compile: the module cache held a damaged file; rendered again. "
                      f"{'; '.join(problems)}", RuntimeWarning, stacklevel=3)
    return None


def _render_to_cache(text: str, label: str, key: str) -> Path:
    global renders
    from attncc.codegen import GLUON, MODULE, render_files
    from attncc.spec import parse_spec

    pattern = parse_spec(text, label)  # the command's validation and errors
    files = render_files(pattern.replace(source=_printable(label)))
    renders += 1
    assert GLUON == _GLUON
    module = stamped(key, files[MODULE], files.get(GLUON))
    try:
        return _write_entry(modules_dir(), pattern.name, key, module, files.get(GLUON))
    except OSError as e:  # a cache folder that cannot be made or written: one of this process's own
        import warnings

        folder = _private_dir()
        warnings.warn(f"attncc.compile: cannot write the module cache {modules_dir()} ({e.strerror or e}); "
                      f"compiled into {folder}, which this process removes when it exits (set "
                      f"ATTNCC_CACHE_DIR to a writable folder to keep compiled modules)", RuntimeWarning, stacklevel=3)
        return _write_entry(folder, pattern.name, key, module, files.get(GLUON))


def _write_entry(folder: Path, name: str, key: str, module: str, fragments: Optional[str]) -> Path:
    path = Path(folder) / f"{name}_{key}.py"
    if fragments is not None:  # the Gluon fragments beside the module (<name>_<key>_gluon.py), written first
        write_atomic(path.with_name(path.stem + _GLUON), fragments)
    write_atomic(path, module)
    return path


_PRIVATE: Optional[Path] = None


def _private_dir() -> Path:
    """A folder of this process's own for compiled modules, removed at exit."""
    global _PRIVATE
    if _PRIVATE is None:
        import atexit
        import shutil
        import tempfile

        _PRIVATE = Path(tempfile.mkdtemp(prefix="attncc-modules-"))
        atexit.register(shutil.rmtree, _PRIVATE, ignore_errors=True)
    return _PRIVATE


def _printable(label: str) -> str:
    """The label as the generated header and docstring show it: characters that could end a
    comment or a docstring (newlines, quotes, backslashes) become '?'."""
    return "".join(c if c.isprintable() and c not in "\"'\\" else "?" for c in label)


def _import(path: Path, module_name: str) -> ModuleType:
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before running it: its kernels are looked up by module name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


# -- dict -> TOML ---------------------------------------------------------------------------

INT_TEXT_BITS = 4096  # an int of more bits is no spec value (str() refuses past 4300 digits)


def toml_text(data: dict) -> str:
    """A dict of spec keys as TOML text that parses back to the same dict: tables become inline
    tables, so the parser sees exactly the keys and values given (and reports the same errors
    as for a file). Values must be str, int, float, bool, list/tuple or dict."""
    if not isinstance(data, dict):
        raise TypeError(f"attncc.compile: expected a dict, got {type(data).__name__}")
    return "".join(f"{_toml_key(k, '')} = {_toml_value(v, _key_path('', k), 1)}\n" for k, v in data.items())


def _key_path(parent: str, key) -> str:
    """The key as the spec checker names it: ``name``, ``[mask].where``, ``[inputs].doc.dims``."""
    if not parent:
        return str(key)
    return f"[{parent}].{key}" if not parent.startswith("[") else f"{parent}.{key}"


def _toml_key(key, where: str) -> str:
    if not isinstance(key, str):
        _fail(where or str(key), f"keys must be strings, got {type(key).__name__} {key!r}")
    return _toml_string(key)


def _toml_value(value, where: str, depth: int) -> str:
    from attncc.core.semantics import MAX_TOML_NESTING

    if depth > MAX_TOML_NESTING:  # what the parser refuses in a file; here before Python's recursion limit
        _fail(where, f"lists and tables nested more than {MAX_TOML_NESTING} levels deep")
    if isinstance(value, bool):
        return "true" if value else "false"
    if type(value) is int:
        if value.bit_length() > INT_TEXT_BITS:
            _fail(where, f"expected a number that TOML can hold, got an integer of {value.bit_length()} bits")
        return str(value)
    if type(value) is float:
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, where, depth + 1) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{_toml_key(k, where)} = {_toml_value(v, _key_path(where, k), depth + 1)}" for k, v in value.items())
        return "{ " + ", ".join(items) + " }" if value else "{}"
    _fail(where, f"expected a string, integer, float, boolean, list or table, got {type(value).__name__} {value!r}")


def _toml_string(s: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif c < " " or c == "\x7f":
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _fail(key: str, message: str):
    from attncc.spec.errors import SpecError

    raise SpecError(TEXT_LABEL, key, message)
