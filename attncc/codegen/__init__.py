"""Stage 3: Plan -> generated/<name>.py (and generated/<name>_gluon.py, the Gluon sm90 kernels'
fragments, for the patterns that take rendered ones: attncc.codegen.gluon). Public entry points:
``render``, ``render_files``, ``build``, ``stale``, ``extra``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, List

import jinja2

from attncc.codegen.names import param_var
from attncc.codegen.params import Signatures, kernel_reads, undefined_names
from attncc.codegen.templating import TEMPLATES, environment  # noqa: F401  (TEMPLATES: public)
from attncc.core.files import write_atomic
from attncc.core.version import VERSION
from attncc.spec import Pattern, SpecError, load_spec

_environment = environment  # the one render() takes (tests put a changed template in front)


def _render_read_back(template: jinja2.Template, variables: dict) -> str:
    """The template rendered with every kernel parameter, read back, and rendered again with
    only the parameters each kernel reads (attncc.codegen.params)."""
    first = template.render(**variables, sig=Signatures())
    text = template.render(**variables, sig=Signatures(kernel_reads(first)))
    undefined = undefined_names(text)
    if undefined:  # a template statement that feeds only a left-out parameter is not guarded by sig.reads
        raise RuntimeError(f"attncc (internal): {template.name} left names undefined in {variables['name']}: "
                           + "; ".join(f"{fn}: {', '.join(sorted(names))}" for fn, names in undefined.items()))
    return text


def pattern_lines(pattern: Pattern) -> List[str]:
    """The Pattern as comment lines for the generated file's header."""
    lines = [f"kind: {pattern.kind}"]
    if pattern.heads_q or pattern.heads_kv:
        lines.append(f"heads: q={pattern.heads_q} kv={pattern.heads_kv}")
    for p in pattern.params:
        lines.append(f"param {p.name} = {p.value!r} ({p.kind})")
    for d in pattern.inputs:
        lines.append(f"input {d.name}[{', '.join(map(str, d.dims))}]: {d.dtype}" + (" (grad)" if d.grad else ""))
    for label, value in (("mask", pattern.mask), ("bias", pattern.bias), ("mod", pattern.mod)):
        if value is not None:
            lines.append(f"{label}: {value}")
    for label, value in (("scale", pattern.scale), ("softcap", pattern.softcap), ("rope", pattern.rope),
                         ("feature_map", pattern.feature_map)):
        if value is not None:
            lines.append(f"{label}: {value}")
    return lines


MODULE, GLUON = ".py", "_gluon.py"  # the suffixes of a spec's generated files (after its name)


def render(pattern: Pattern) -> str:
    """The source of the generated module for ``pattern``."""
    return render_files(pattern)[MODULE]


def render_gluon(pattern: Pattern):
    """The source of ``pattern``'s Gluon fragments file alone, or None when its forward takes
    none (:func:`render_files` renders it beside the module)."""
    from attncc.analysis import analyze
    from attncc.analysis.score import canonical_score
    from attncc.codegen.gluon import gluon_context
    from attncc.codegen.printer import NotGluon

    if pattern.kind != "softmax":
        return None
    common = _common(pattern)  # the spec as written, as render_files has it
    pattern = canonical_score(pattern)
    try:
        fragments = gluon_context(pattern, analyze(pattern))
    except NotGluon:  # as render_files: the tl kernels only
        return None
    return None if fragments is None else _environment().get_template("gluon.py.j2").render(**common, **fragments)


def _common(pattern: Pattern) -> dict:
    """The template variables every generated file of ``pattern`` has (its header)."""
    return dict(version=VERSION, source=pattern.source, spec_hash=pattern.source_hash,
                name=pattern.name, pattern_lines=pattern_lines(pattern), head_dims=tuple(pattern.head_dims),
                value_dim=pattern.value_dim, dtypes=tuple(pattern.dtypes), heads_q=pattern.heads_q,
                heads_kv=pattern.heads_kv, params=pattern.params, inputs=pattern.inputs,
                input_positions={d.name: axes if any(axes) else () for d in pattern.inputs
                                 for axes in [pattern.position_axes(d.name)]},
                scale=pattern.scale, dropout=pattern.dropout, softcap=pattern.softcap)


def render_files(pattern: Pattern) -> Dict[str, str]:
    """The generated files of ``pattern`` by the suffix of their name: :data:`MODULE` always, and
    :data:`GLUON` (the Gluon sm90 forward's fragments, attncc.codegen.gluon) when its forward takes
    rendered fragments; the module reads that file only on the Gluon path."""
    env = _environment()
    common = _common(pattern)
    if pattern.kind == "linear":
        from attncc.codegen.linear import linear_context

        return {MODULE: _render_read_back(env.get_template("linear.py.j2"), dict(**common, **linear_context(pattern)))}
    from attncc.analysis import analyze
    from attncc.codegen.backward import backward_context
    from attncc.codegen.bounds import arithmetic_functions, check_divisors
    from attncc.codegen.decode import decode_context
    from attncc.codegen.gluon import gluon_context
    from attncc.codegen.printer import NotGluon, printed_integers
    from attncc.codegen.softmax import softmax_context

    from attncc.analysis.residue import ColumnSplit, ResidueSplit, split_of
    from attncc.analysis.score import canonical_score

    pattern = canonical_score(pattern)  # mod = "c * tanh(s / c)" renders as the built-in softcap
    spec_pattern = pattern  # (the kernels' pattern may be a split's rewrite of it: errors name the spec's)
    check_divisors(pattern)
    plan = analyze(pattern)
    split = split_of(pattern)
    columns = split if isinstance(split, ColumnSplit) else None
    split = split if isinstance(split, ResidueSplit) else None
    if split is not None:  # the kernels' positions go through the hidden params (attncc.analysis.residue)
        pattern, plan = split.pattern, analyze(split.pattern)
        common = dict(common, params=pattern.params, residue=split.modulus,
                      pattern_lines=common["pattern_lines"] + [f"residue classes modulo {split.modulus}: positions "
                                                               f"i -> _rs_step*i + _rs_cq, j -> _rs_step*j + _rs_ck"])
    elif columns is not None:  # the summary columns apart (attncc.analysis.residue.ColumnSplit)
        pattern, plan = columns.pattern, analyze(columns.pattern)
        common = dict(common, params=pattern.params, columns=(columns.modulus, *columns.terms),
                      pattern_lines=common["pattern_lines"] + [
                          f"summary columns j % {columns.modulus} == {columns.residue} apart: _cs_part 0 the rest, "
                          f"1 the columns at j -> _cs_sk*j + _cs_ck, 2 the whole mask"])
    pattern = plan.kernel_pattern  # the bias's lowered dots as tile products (attncc.analysis.tile_dot)
    with printed_integers() as printed:  # the integer arithmetic of every kernel, for the host's guard
        ctx = softmax_context(pattern, plan, split=split is not None or columns is not None)
        backward = backward_context(pattern, plan, ctx)
        decode = decode_context(pattern, plan, ctx)
        try:
            fragments = gluon_context(pattern, plan)  # its walk's steps bound the integers of the module too
        except NotGluon as e:  # what the analysis let through and Gluon cannot print: the tl kernels only
            fragments = None
            ctx.update(gluon=None, gluon_reason=f"its Gluon fragments cannot be printed ({e})")
    files = {MODULE: _render_read_back(env.get_template("softmax.py.j2"), dict(
        **common, **ctx, backward=backward, decode=decode,
        int_arithmetic=arithmetic_functions(pattern, printed, spec_pattern),
        wide_params=[param_var(p.name) for p in pattern.params if p.kind == "int"]))}
    if fragments is not None:
        files[GLUON] = env.get_template("gluon.py.j2").render(**common, **fragments)
    return files


def _targets(specs: Iterable, out_dir) -> List[tuple]:
    """(pattern, output path) of every spec, all parsed first; two specs with one name are refused
    (one would overwrite the other's module), and so is ``<x>_gluon`` beside ``x`` (it would be
    x's Gluon fragments file)."""
    out = Path(out_dir)
    targets, seen, folded = [], {}, {}
    for spec in specs:
        pattern = load_spec(spec)
        if pattern.name in seen:
            if _same_file(spec, seen[pattern.name]):
                raise SpecError(str(spec), "", f"is given twice (as {seen[pattern.name]} too): give each spec once")
            raise SpecError(str(spec), "name", f"'{pattern.name}' is also the name of {seen[pattern.name]}: each spec "
                                               f"of a build needs its own name (generated/<name>.py)")
        # Foo.py and foo.py are one file where file names ignore case (macOS, Windows): the second
        # spec's module would replace the first's
        other = folded.get(pattern.name.casefold())
        if other is not None:
            raise SpecError(str(spec), "name", f"'{pattern.name}' differs only in case from '{other}', the name of "
                                               f"{seen[other]}: their files would be one on file systems that ignore "
                                               f"case (rename one of them)")
        seen[pattern.name] = str(spec)
        folded[pattern.name.casefold()] = pattern.name
        targets.append((pattern, out / f"{pattern.name}.py"))
    for pattern, _ in targets:
        base = pattern.name[:-len("_gluon")] if pattern.name.lower().endswith("_gluon") else None
        base = None if base is None else folded.get(base.casefold())
        if base is not None:
            raise SpecError(seen[pattern.name], "name", f"'{pattern.name}' would be the file of the Gluon fragments of "
                                                        f"{seen[base]} (generated/{base}_gluon.py): rename one of them")
    return targets


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _paths(path: Path) -> Dict[str, Path]:
    """A spec's generated files by suffix, from its module's path."""
    return {suffix: path.with_name(path.stem + suffix) for suffix in (MODULE, GLUON)}


INIT_TEXT = '"""Kernels generated by `attncc build`; each module is one spec."""\n'


def build(specs: Iterable, out_dir="generated") -> List[Path]:
    """Render every spec into ``out_dir``; returns the written modules' paths (a module whose forward
    takes rendered Gluon fragments has them beside it: :func:`gluon_file`).

    Every spec is rendered before anything is written (a spec that fails leaves ``out_dir`` as it
    was), and each file is replaced whole (:func:`attncc.core.files.write_atomic`): never truncated, never written through
    a symlink."""
    rendered = [(path, render_files(pattern)) for pattern, path in _targets(specs, out_dir)]
    for path, _ in rendered:
        _check_not_another_specs(path)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    init = Path(out_dir) / "__init__.py"
    if init.is_symlink() or not init.exists():
        write_atomic(init, INIT_TEXT)
    for path, files in rendered:
        paths = _paths(path)
        # the fragments first: a module that names them never meets a folder without them
        for suffix in (GLUON, MODULE):
            if suffix in files:
                write_atomic(paths[suffix], files[suffix])
            elif paths[suffix].is_symlink() or paths[suffix].is_file():
                paths[suffix].unlink()  # an earlier build's fragments of a spec that has none now
    return [path for path, _ in rendered]


FRAGMENTS_MARK = "# The Gluon sm90 kernels' fragments of pattern "  # a line of every fragments file's header


def _check_not_another_specs(path: Path) -> None:
    """Refuse a build whose files would replace or remove another spec's: ``<x>_gluon.py`` is the
    Gluon fragments file of spec ``x`` and the module of a spec named ``x_gluon``. Within one build
    :func:`_targets` refuses the pair; across builds into one folder, the file already there says
    which it is (its header), and a build must not overwrite or delete it as the other."""
    paths = _paths(path)
    for file in paths.values():  # a file attncc build did not write (a module of the user's) is never replaced
        if not file.is_symlink() and file.exists() and not _generated(file):
            raise SpecError(str(file), "name", f"{file} is not a file attncc build wrote (its first line is not "
                            f"'{GENERATED_MARK.strip()} ...'): building '{path.stem}' there would replace it; "
                            f"rename the spec or build into another folder")
    module, fragments = _current(paths[MODULE]), _current(paths[GLUON])
    if module is not None and "\n" + FRAGMENTS_MARK in module[:2000]:
        raise SpecError(str(paths[MODULE]), "name", f"{paths[MODULE]} holds the Gluon fragments of spec "
                        f"'{path.stem[:-len('_gluon')]}' built there before: rename this spec (names ending in "
                        f"_gluon meet the fragments files of other specs) or build it into another folder")
    if fragments is not None and "\n" + FRAGMENTS_MARK not in fragments[:2000]:
        raise SpecError(str(paths[GLUON]), "name", f"{paths[GLUON]} is not a Gluon fragments file (the module of a "
                        f"spec named '{path.stem}_gluon', or a file of yours): building '{path.stem}' there would "
                        f"replace or remove it; rename one of the specs or build into another folder")


def gluon_file(module: Path) -> Path:
    """Where a generated module's Gluon fragments are (when its pattern has rendered ones)."""
    return _paths(Path(module))[GLUON]


def stale(specs: Iterable, out_dir="generated") -> List[Path]:
    """The generated files that differ from what ``build`` would write now (one that build would
    remove included)."""
    out = []
    for pattern, path in _targets(specs, out_dir):
        files = render_files(pattern)
        for suffix, file in _paths(path).items():
            if _current(file) != files.get(suffix) and not (suffix not in files and not file.is_symlink()
                                                             and not file.exists()):
                out.append(file)
    return out


GENERATED_MARK = "# Generated by attncc "  # the first line of every file build writes but __init__.py


def _generated(path: Path) -> bool:
    """Whether the file at ``path`` was written by ``attncc build`` (its first line says so)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(GENERATED_MARK)) == GENERATED_MARK.encode()
    except OSError:
        return False


def extra(specs: Iterable, out_dir="generated") -> List[Path]:
    """The files in ``out_dir`` that ``attncc build`` wrote (their first line says so) and that
    none of ``specs`` generates: modules and fragments of specs deleted or renamed since. Only
    meaningful for the whole set of specs built into the folder (``attncc build --check`` without
    spec arguments); other files of the folder are not looked at."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    made = {p for _, path in _targets(specs, out_dir) for p in _paths(path).values()}
    found = []
    for path in sorted(out.glob("*.py")):
        if path in made or path.name == "__init__.py" or path.is_symlink() or not path.is_file():
            continue
        if _generated(path):
            found.append(path)
    return found


def _current(path: Path):
    """The text of a generated file as build wrote it; None when there is none (or a symlink,
    which build would replace)."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
