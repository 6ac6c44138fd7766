"""The `attncc` command: build, explain, tune."""
from __future__ import annotations

import argparse
import glob
import os
import shlex
import sys

from attncc.console import exit_quietly_on_broken_pipe
from attncc.core.files import spec_file
from attncc.core.text import printable
from attncc.core.version import VERSION

OUT_DEFAULT = "generated"


def _default_specs():
    return sorted(glob.glob("specs/*.toml"))


def cmd_build(args) -> int:
    from attncc.codegen import build, extra, gluon_file, stale
    from attncc.spec import SpecError

    if not args.out:  # `--out "$OUT"` with OUT unset: not the current folder without a word
        print("attncc build: --out is empty (give a folder; --out . for the current one)", file=sys.stderr)
        return 2
    if os.path.lexists(args.out) and not os.path.isdir(args.out):  # was "cannot write OUT: File exists"
        print(f"attncc build: cannot write {printable(args.out)}: --out is not a folder (a file, or a link to none): "
              f"give a folder, which build makes if it is missing", file=sys.stderr)
        return 2
    specs = [str(spec_file(s)) for s in args.specs] or _default_specs()
    if not specs:
        print("attncc build: no spec given and no specs/*.toml here", file=sys.stderr)
        return 2
    try:
        if args.check:
            old = stale(specs, args.out)
            rebuild = " ".join(["attncc build", *map(shlex.quote, args.specs)]
                               + ([] if args.out == OUT_DEFAULT else ["--out", shlex.quote(args.out)]))
            for path in old:  # (the command named no --out: it rebuilt generated/, not the folder checked)
                print(f"stale: {path} (run `{printable(rebuild)}`)", file=sys.stderr)
            # the whole spec set (no spec arguments): the folder's generated files of specs gone since
            gone = [] if args.specs else extra(specs, args.out)
            for path in gone:
                print(f"extra: {path} (written by attncc build from a spec that is no longer in specs/: delete it)",
                      file=sys.stderr)
            if not old and not gone:
                print(f"attncc build --check: {len(specs)} generated file(s) up to date in {args.out}/")
            return 1 if old or gone else 0
        for path in build(specs, args.out):
            print(f"wrote {path}")
            if gluon_file(path).is_file():
                print(f"wrote {gluon_file(path)}")
    except (SpecError, NotImplementedError) as e:  # NotImplementedError: a form the code generator lacks
        print(f"attncc build: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout's reader went away (`attncc build | head`): not the output folder
        raise
    except OSError as e:  # an output folder that cannot be written
        print(f"attncc build: cannot write {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    return exit_quietly_on_broken_pipe(_main, argv)


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "explain":
        from attncc.explain import main_explain

        return main_explain(argv[1:])
    if argv and argv[0] == "tune":
        from attncc.tune import main_tune

        return main_tune(argv[1:])
    parser = argparse.ArgumentParser(prog="attncc", description="Compile attention-pattern specs to Triton kernels.")
    parser.add_argument("--version", action="version", version=f"attncc {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="generate DIR/<name>.py for each spec")
    b.add_argument("specs", nargs="*", help="spec files, or names of specs/<name>.toml (default: specs/*.toml)")
    b.add_argument("--out", default=OUT_DEFAULT, help=f"output folder (default: {OUT_DEFAULT})")
    b.add_argument("--check", action="store_true", help="fail when the generated files are stale")
    sub.add_parser("explain", help="what the analysis found for a spec (attncc explain SPEC --n N ...)")
    sub.add_parser("tune", help="tune tile configs for this GPU (attncc tune SPEC... --n N,... | --show | --clear)")
    args = parser.parse_args(argv)
    if args.command == "build":
        return cmd_build(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
