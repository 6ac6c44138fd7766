"""Probe 21 (what attncc reads from and writes to disk and the command line, as an attacker):
a regression test per defect found.

Probed:

- the tune cache (attncc/runtime/tuning.py) as the runtime reads it (``pick_config`` on the GPU
  path, the interpreter's kernels run with the tuned tiles: fake device via
  ``TRITON_INTERPRET=0`` after binding, or the launch module's presets switched off): schema-valid
  records of every block size 16-256, 1-32 warps, 1-8 stages, filed under this call's entry but
  keyed for another spec, hash, kernel, dtype, head dim or length (200 seeded cases), files of
  another GPU or Triton version under this GPU's file name, ``ms`` of 0, hostile text (newlines,
  terminal escapes) in the file's ``gpu`` and in key fields, named pipes and folders in place of
  cache files, an ``ATTNCC_CACHE_DIR`` naming a file or a folder of other JSON; ``attncc tune
  --show`` of all of these;
- ``attncc tune`` arguments (head dims, dtypes, lengths) and ``attncc explain`` arguments (19
  refusals, all clean);
- ``attncc build`` / ``attncc.compile``: a payload (string-closing quotes, newlines, backslash
  continuations, jinja markup, U+2028, NUL, CR) in every string of a spec (name, description,
  param and input names, dims, dtypes, kind, expressions, bias, mod, rope style, feature map,
  heads, head_dim, scale, unknown keys): 171 specs, none ran code or failed to parse as Python;
  the module cache with a named pipe in place of a cached module.

Defects found (each fixed, with a test below that fails on the old code):

1. ``attncc tune --show`` raised TypeError on a record with ``"ms": 0`` (which the schema
   allows) and a default time.
2. A record filed under one entry but keyed for another (spec, kernel, dtype, head dim,
   length) was used for the entry's calls, and ``--show`` listed it as the other key's; key
   fields could hold any text (newlines, terminal escapes) that ``--show`` printed as it was.
3. A cache file written on another GPU or Triton version (copied, or a GPU name that the file
   name spells alike) served this GPU's calls.
4. A named pipe in place of a tune cache file hung the first call of every process (and
   ``attncc tune --show``); one in place of a cached module hung ``attncc.compile``.
5. Spec errors printed the key and the file name as given: a key or file name holding a newline
   or a terminal escape sequence made a multi-line message or drove the terminal.
6. ``attncc tune --head-dim 512`` was accepted (on a GPU: bind's ValueError, a traceback).
7. Tune cache files were written 0600 (mkstemp) whatever the umask: a cache folder shared by a
   team (``ATTNCC_CACHE_DIR``) was unreadable to all but the one who tuned, whose configs then
   served no one else (a warning per process). ``attncc build`` and the module cache wrote 0666
   less the umask; the three atomic writers are now one (attncc.core.files.write_atomic).
8. For data-dependent masks (document), whose backward kernels run at the forward's tile shape and
   warps (only the tuned pipeline depth is used), the tuner timed its dK/dV and dQ candidates at
   their own tile shapes: it recorded times and gains of configs that no call ran.
9. ``ATTNCC_CACHE_DIR="~nosuchuser/x"``, or no home folder (HOME unset, a user id without an
   account, as containers run), raised Python's RuntimeError "Could not determine home directory"
   from ``attncc.compile``, ``attncc tune`` (a traceback) and, on a GPU, every call.
10. ``attncc build SPEC --out DIR --check`` said ``stale: DIR/x.py (run `attncc build SPEC`)``: the
    command it named rebuilt generated/, not DIR, and the check failed again; ``--out FILE`` said
    ``cannot write FILE: File exists``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import threading

import pytest
import torch

import attncc
from attncc import module_cache
from attncc.cli import main as cli_main
from attncc.runtime import KernelConfig, bind, pick_config, tuning
from attncc.runtime.launch import default_config
from attncc.spec import SpecError, load_spec, parse_spec
from cases import module

GOOD_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}
TUNED = KernelConfig(64, 32, 8, 3)


@pytest.fixture(autouse=True)
def cache(tune_cache):
    return tune_cache


def make_call(N=50, D=32, dtype=torch.float32):
    q = torch.randn(1, 2, N, D, dtype=dtype)
    return bind(module("causal").SPEC, q, q.clone(), q.clone())


def key_fields(key):
    return {f: getattr(key, f) for f in tuning.KEY_FIELDS}


def write_file(key, entries, gpu=None, triton=None):
    """The cache file of ``key``'s GPU holding ``entries`` (entry -> record, as stored)."""
    path = tuning.cache_dir() / key.file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "gpu": key.gpu if gpu is None else gpu,
                                "triton": key.triton if triton is None else triton, "entries": entries}))
    fresh()
    return path


def fresh():
    """This process as a new one: nothing of the cache read, no config kept with a call signature."""
    tuning._LOADED.clear()
    tuning._STORES[0] += 1


def on_gpu_path(monkeypatch):
    """pick_config as on a GPU (the call was bound under the interpreter, on the CPU)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


# -- 1. --show of a record of 0 ms ---------------------------------------------------------------------------

def test_show_lists_a_record_of_zero_ms(capsys):
    key = tuning.key_for(make_call())
    write_file(key, {key.entry: {"config": GOOD_CONFIG, "ms": 0, "default_ms": 1.0, "key": key_fields(key)}})
    assert cli_main(["tune", "--show"]) == 0
    out = capsys.readouterr().out
    assert "(1 entry in 1 file(s))" in out and "0.000 ms (default 1.000 ms)" in out


# -- 2. records filed under another key ----------------------------------------------------------------------

OTHER_VALUES = {"spec": ["sliding_window", "causal2"], "spec_hash": ["0123456789abcdef"], "kernel": ["dkdv", "dq"],
                "dtype": ["bfloat16", "float16"], "head_dim": [16, 64, 128], "value_dim": [16, 64],
                "n_q": [32, 128, 4096], "n_k": [32, 128, 4096]}


def test_a_record_keyed_for_another_call_is_not_used(monkeypatch, caplog):
    """The entry name alone decided: a record whose own key said dkdv, bfloat16, head dim 128 or
    N 4096 (a hand edit, an entry copied over another) served this call's forward as if tuned for
    it (seeded: random fields changed, random schema-valid configs)."""
    rng = random.Random(21)
    call = make_call()
    key = tuning.key_for(call)
    on_gpu_path(monkeypatch)
    for case in range(200):
        fields = key_fields(key)
        for name in rng.sample(sorted(OTHER_VALUES), rng.randint(1, 3)):
            fields[name] = rng.choice(OTHER_VALUES[name])
        cfg = {"BLOCK_M": rng.choice((16, 32, 64, 128)), "BLOCK_N": rng.choice((16, 32, 64, 128)),
               "num_warps": rng.choice((1, 2, 4, 8)), "num_stages": rng.randint(1, 4)}
        write_file(key, {key.entry: {"config": cfg, "ms": 1.0, "key": fields}})
        assert pick_config(call) == default_config(call), (case, fields, cfg)
        assert tuning.lookup(key) is None
    assert "filed under another key than its own" in caplog.text
    write_file(key, {key.entry: {"config": GOOD_CONFIG, "ms": 1.0, "key": key_fields(key)}})
    assert pick_config(call) == TUNED  # filed under its own key: used


@pytest.mark.parametrize("field, value", [("spec", "causal\n  SPOOFED entry"), ("spec", "x\x1b[2J"),
                                          ("spec_hash", "ab\ncd"), ("dtype", "int8"), ("dtype", "float64"),
                                          ("head_dim", 0), ("value_dim", 1000), ("n_q", 100), ("n_k", 0)])
def test_key_fields_that_name_no_call_are_ignored_and_show_prints_one_line_each(field, value, capsys):
    key = tuning.key_for(make_call())
    fields = {**key_fields(key), field: value}
    entry = tuning.TuneKey(key.gpu, key.triton, **fields).entry  # consistent with its key: a deliberate file
    write_file(key, {entry: {"config": GOOD_CONFIG, "ms": 1.0, "key": fields}}, gpu="GPU \x1b[31mred\nline")
    assert cli_main(["tune", "--show"]) == 0
    out = capsys.readouterr().out
    assert f"key.{field} is not" in out and "\x1b" not in out
    assert len(out.splitlines()) == 3  # the head line, the file's, the ignored entry's


# -- 3. a file of another GPU or Triton version --------------------------------------------------------------

@pytest.mark.parametrize("gpu, triton", [("NVIDIA A100-SXM4-80GB", None), (None, "3.0.0"), (5, None)])
def test_a_file_tuned_on_another_gpu_is_not_used(gpu, triton, monkeypatch, caplog):
    call = make_call()
    key = tuning.key_for(call)
    write_file(key, {key.entry: {"config": GOOD_CONFIG, "ms": 1.0, "key": key_fields(key)}}, gpu=gpu, triton=triton)
    on_gpu_path(monkeypatch)
    assert pick_config(call) == default_config(call)
    assert "tuned on" in caplog.text
    assert "1 entry in 1 file" in __import__("attncc.tune").tune.show()  # --show lists every file as it is
    # a store replaces it with this GPU's file
    tuning.store(key, {"config": GOOD_CONFIG, "ms": 1.0})
    fresh()
    assert pick_config(call) == TUNED


# -- 4. named pipes in the caches ------------------------------------------------------------------------------

def finishes(fn, seconds=30):
    """fn() in a thread: its result, or pytest.fail when it has not returned in ``seconds`` (the
    thread, blocked on a pipe, is left behind as a daemon)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{fn} hung")
    return result[0]


def _unblock(path):
    """Open the pipe for writing and close it, so that a blocked reader (the old code) ends."""
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK) if os.path.exists(path) else None
    if fd is not None:
        os.close(fd)


def test_a_named_pipe_for_a_tune_cache_file_hangs_nothing(cache, monkeypatch, caplog):
    call = make_call()
    key = tuning.key_for(call)
    cache.mkdir(parents=True)
    pipe = cache / key.file_name
    os.mkfifo(pipe)
    on_gpu_path(monkeypatch)
    try:
        assert finishes(lambda: pick_config(call)) == default_config(call)
        assert "not a regular file" in caplog.text
        assert "not a regular file" in finishes(lambda: __import__("attncc.tune").tune.show())
    finally:
        with pytest.raises(OSError):  # no reader waits on it any more (ENXIO)
            _unblock(pipe)
    tuning.store(key, {"config": GOOD_CONFIG, "ms": 1.0})  # replaced by a file
    fresh()
    assert pick_config(call) == TUNED


def test_a_named_pipe_for_a_cached_module_hangs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "c"))
    text = 'name = "piped21"\nhead_dim = 16\n[mask]\nwhere = "j <= i"\n'
    key = module_cache.cache_key(text, module_cache.TEXT_LABEL)
    module_cache._LOADED.pop(key, None)
    folder = module_cache.modules_dir()
    folder.mkdir(parents=True)
    pipe = folder / f"piped21_{key}.py"
    os.mkfifo(pipe)
    try:
        with pytest.warns(RuntimeWarning, match="not a regular file"):
            mod = finishes(lambda: attncc.compile(text))
    finally:
        if pipe.exists() and not pipe.is_file():
            _unblock(pipe)
    assert mod.SPEC.name == "piped21" and pipe.is_file()  # rendered again, over the pipe


# -- 5. spec errors: keys and file names as one line of text ------------------------------------------------

@pytest.mark.parametrize("text, shown", [
    ('"a\\nb" = 1\n', "a\\nb: unknown key"),
    ('[params]\n"w\\u001b[2J" = 3\n', "[params].w\\x1b[2J: expected a Python identifier"),
    ('[inputs]\n"x\\ry" = { dims = ["b"] }\n', "[inputs].x\\ry: expected a Python identifier"),
    ('[mask]\n"\\u2028" = "causal"\n', "[mask].\\u2028: unknown key"),
])
def test_spec_errors_show_hostile_keys_on_one_line(text, shown):
    with pytest.raises(SpecError) as e:
        parse_spec(text, "spec.toml")
    message = str(e.value)
    assert message.isprintable() and f"spec.toml: {shown}" in message
    assert "\\" not in e.value.key or "\\" in text  # the key itself is kept as given


def test_spec_errors_show_hostile_file_names_on_one_line(tmp_path):
    path = tmp_path / "a\nb\x1b[31m.toml"
    with pytest.raises(SpecError) as e:
        load_spec(path)  # no such file
    assert str(e.value).isprintable() and "a\\nb\\x1b[31m.toml" in str(e.value)
    path.write_text('name = "x"\nhead_dim = 0\n')
    with pytest.raises(SpecError, match="head_dim: expected head dims") as e:
        load_spec(path)
    assert str(e.value).isprintable() and e.value.file == str(path)


# -- 6. attncc tune --head-dim ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dims", ["512", "64,257", "0"])
def test_tune_refuses_head_dims_no_kernel_takes(dims, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["tune", "spec.toml", "--head-dim", dims])
    assert e.value.code == 2 and "--head-dim" in capsys.readouterr().err


# -- 7. the tune cache file's mode ----------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_tune_cache_files_take_the_umask_as_other_files(umask):
    key = tuning.key_for(make_call())
    old = os.umask(umask)
    try:
        path = tuning.store(key, {"config": GOOD_CONFIG, "ms": 1.0})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, path.with_suffix(".lock").name])


# -- 8. the tuner times the backward of a data-dependent mask as it runs ----------------------------------------

@pytest.mark.parametrize("kernel", ["dkdv", "dq"])
def test_a_trial_of_a_shared_tile_backward_runs_what_its_cache_entry_would(kernel, monkeypatch):
    """Each candidate the tuner may time for a kernel of document's backward (shared tiles), timed
    (inside ``trying``) at the config its cache entry then gives calls."""
    from attncc.runtime.launch import backward_configs

    from cases import inputs_for, pattern
    gen = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(1, 2, 50, 32, generator=gen) for _ in range(3))
    call = bind(module("document").SPEC, q, k, v, kwargs=inputs_for(pattern("document"), 1, 2, 50, gen))
    on_gpu_path(monkeypatch)
    index = {"dkdv": 1, "dq": 2}[kernel]
    for cfg in tuning.candidates(call, kernel, exhaustive=True):
        with tuning.trying(kernel, cfg):
            timed = backward_configs(call, shared=True)[index]
        tuning.keep_in_process(tuning.key_for(call, kernel), {"config": dataclasses.asdict(cfg), "ms": 1.0})
        assert backward_configs(call, shared=True)[index] == timed, cfg
    monkeypatch.setenv("ATTNCC_CONFIG_DQ", "BLOCK_M=16,BLOCK_N=16,num_warps=2,num_stages=1")
    assert backward_configs(call, shared=True)[2] == KernelConfig(16, 16, 2, 1)  # the environment's: as it is


# -- 9. a cache folder that cannot be known ----------------------------------------------------------------------

def _no_home(monkeypatch):
    import pathlib

    def home(cls):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("ATTNCC_CACHE_DIR")
    monkeypatch.setattr(pathlib.Path, "home", classmethod(home))


@pytest.mark.parametrize("where", ["no such user", "no home"])
def test_a_cache_folder_that_cannot_be_known_is_a_clear_error(where, monkeypatch, capsys):
    if where == "no home":
        _no_home(monkeypatch)
        match = "set ATTNCC_CACHE_DIR"
    else:
        monkeypatch.setenv("ATTNCC_CACHE_DIR", "~nosuchuser21xyz/cache")
        match = "ATTNCC_CACHE_DIR='~nosuchuser21xyz/cache': cannot expand"
    call = make_call()
    with pytest.raises(ValueError, match=match):
        attncc.compile('name = "nohome21"\nhead_dim = 16\n[mask]\nwhere = "j <= i"\n')
    fresh()
    on_gpu_path(monkeypatch)
    with pytest.raises(ValueError, match=match):
        pick_config(call)
    for argv in (["--show"], ["--clear"], ["spec.toml"]):
        assert cli_main(["tune", *argv]) == 2
        err = capsys.readouterr().err
        assert "attncc tune: " in err and "Traceback" not in err and ("ATTNCC_CACHE_DIR" in err)


# -- 10. build --check names the command that makes the folder it checked ----------------------------------------

@pytest.mark.parametrize("out", ["gen", "my gen", "generated"])
def test_check_names_the_build_that_fixes_what_it_found(out, tmp_path, monkeypatch, capsys):
    import shlex

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.toml").write_text('head_dim = 16\n[mask]\nwhere = "j <= i"\n')
    assert cli_main(["build", "a.toml", "--out", out, "--check"]) == 1
    err = capsys.readouterr().err
    command = err.split("(run `")[1].split("`)")[0]
    assert cli_main(shlex.split(command)[1:]) == 0  # what it says to run
    assert cli_main(["build", "a.toml", "--out", out, "--check"]) == 0


def test_an_out_that_is_a_file_is_named_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.toml").write_text('head_dim = 16\n[mask]\nwhere = "j <= i"\n')
    (tmp_path / "out").write_text("mine\n")
    os.symlink(tmp_path / "out", tmp_path / "link")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    for out in ("out", "link", "dangling"):
        for check in ([], ["--check"]):
            assert cli_main(["build", "a.toml", "--out", out, *check]) == 2
            assert f"cannot write {out}: --out is not a folder" in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == "mine\n" and not (tmp_path / "nowhere").exists()
