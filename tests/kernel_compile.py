"""Compiling the kernels that attncc's host code launches, for sm90, without a GPU.

Triton's whole pipeline (front end, TTIR, TTGIR, LLVM IR, PTX, and ptxas) runs on any machine; only
loading the cubin needs a GPU. :func:`recorded_launches` replaces ``JITFunction.run`` by a hook that
records each launch (the kernel, the signature Triton would specialize it to, its constexprs and
options) instead of running it; :func:`compile_launch` then compiles a recorded launch up to a stage.

The kernels must be ``JITFunction`` s, so the modules that define them are imported with
TRITON_INTERPRET unset (under it ``triton.jit`` makes interpreter objects, Triton's own helpers
such as ``tl.sum`` included). Used by tests/test_int64_offsets.py (TTIR) and
tests/test_sm90_compile.py (PTX), in child processes.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Tuple

STAGES = ("ttir", "ttgir", "llir", "ptx", "cubin")


@dataclass(frozen=True)
class Launch:
    """One kernel launch as Triton specializes it on a GPU: ``signature`` maps every parameter to
    its type ("constexpr" for constexprs, None arguments and ints equal to 1), ``constexprs`` holds
    their values and ``attrs`` the divisibility hints (16-byte aligned pointers, ints divisible by
    16), both by path (``(index,)``, or ``(index, member)`` inside a tuple argument); ``options``
    are the compile options the launch passed."""
    fn: object = field(compare=False, repr=False)  # the JITFunction
    signature: Tuple[Tuple[str, str], ...]
    constexprs: Tuple[Tuple[int, object], ...]
    attrs: Tuple[Tuple[int, str], ...]
    options: Tuple[Tuple[str, object], ...]

    @property
    def name(self) -> str:
        return self.fn.__name__

    @property
    def module(self) -> str:
        return Path(self.fn.fn.__code__.co_filename).stem

    def constexpr(self, name: str, default=None):
        """The value of a constexpr parameter (``default`` when ``name`` is not one)."""
        names = [p.name for p in self.fn.params]
        return dict(self.constexprs).get((names.index(name),), default) if name in names else default

    def label(self, *names: str) -> str:
        """``kernel (dtype, module, NAME=value, ...)``: the first pointer's element type, and those of
        ``names`` (constexprs, options) the launch has."""
        values = dict(self.options)
        values.update((n, self.constexpr(n)) for n in names if self.constexpr(n, self) is not self)
        dtype = [kind[1:] for _, kind in self.signature if isinstance(kind, str) and kind.startswith("*")][:1]
        return f"{self.name} ({', '.join(dtype + [self.module] + [f'{n}={values[n]}' for n in names if n in values])})"

    @property
    def source_hash(self) -> str:
        """The kernel's source and that of every @triton.jit function it reaches through its
        module's globals (and the constexpr globals it reads): two modules that define the same
        code, launched alike, make one compilation."""
        return hashlib.sha256("\n".join(_sources(self.fn, set())).encode()).hexdigest()

    @property
    def key(self):
        return (self.source_hash, self.signature, repr(self.constexprs), self.attrs, repr(self.options))


def _sources(fn, seen) -> List[str]:
    from triton.runtime.jit import JITFunction

    if id(fn) in seen:
        return []
    seen.add(id(fn))
    out = [fn.src]
    globals_ = fn.fn.__globals__
    for name in sorted(fn.fn.__code__.co_names):  # the global names the kernel's code reads
        value = globals_.get(name)
        if isinstance(value, JITFunction):
            out += _sources(value, seen)
        elif type(value).__name__ == "constexpr":  # module-level tl.constexpr flags (_SQRT64_PTX)
            out.append(f"{name} = {value!r}")
    return out


def launch_of(fn, args, kwargs, capability: int = 90) -> Launch:
    """The :class:`Launch` of ``fn[grid](*args, **kwargs)`` on an sm_<capability> GPU: Triton's
    own argument specialization (the binder ``JITFunction.run`` uses; it needs no GPU), applied to
    the host's arguments (CPU tensors are as aligned as CUDA ones: torch allocates both on >= 64
    bytes, and views keep their offsets)."""
    backend = _backend(capability)
    binder = _BINDERS.get(id(fn))
    if binder is None or binder[0] is not fn:
        from triton.runtime.jit import create_function_from_signature

        binder = _BINDERS[id(fn)] = (fn, create_function_from_signature(fn.signature, fn.params, backend))
    from triton._utils import find_paths_if, get_iterable_path

    bound, specialization, options = binder[1](*args, **kwargs)
    # A launch option that is also a parameter (a Gluon kernel's `num_warps: constexpr`) binds to the
    # parameter above; JITFunction.run still takes it as the option too (`backend.parse_options(kwargs)`).
    fields = backend.parse_options({}).__dict__
    options = {**options, **{k: v for k, v in kwargs.items() if k in fields and k in bound}}
    names = list(bound)
    signature = tuple((name, kind) for name, (kind, _) in zip(names, specialization))
    # as JITFunction._pack_args finds them: by path, so that a tuple argument's members count too
    # (an int 1 inside a tuple is a constexpr like a top-level one)
    kinds, values = [kind for kind, _ in specialization], list(bound.values())
    constexprs = tuple((path, get_iterable_path(values, path))
                       for path in find_paths_if(kinds, lambda _, kind: kind == "constexpr"))
    hints = [value for _, value in specialization]
    attrs = tuple((path, get_iterable_path(hints, path))
                  for path in find_paths_if(hints, lambda _, x: isinstance(x, str) and x))
    # as JITFunction._pack_args parses them: from every keyword, one that is also a parameter's
    # name (a kernel taking num_warps as a constexpr) included
    known = vars(backend.parse_options({}))
    options = {**{k: v for k, v in kwargs.items() if k in known}, **options}
    return Launch(fn, signature, constexprs, attrs, tuple(sorted(options.items())))


_BINDERS = {}  # id(JITFunction) -> (the function, its binder)


@functools.lru_cache(maxsize=None)
def _backend(capability: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    return make_backend(GPUTarget("cuda", capability, 32))


class Recorded(list):
    """The distinct launches (a list of :class:`Launch`), and ``modules[launch.key]``: the modules
    (file stems) whose kernels made it (several when their sources are the same)."""

    def __init__(self):
        super().__init__()
        self.modules = {}


@contextlib.contextmanager
def recorded_launches() -> Iterator[Recorded]:
    """Within the block, launching a ``@triton.jit`` kernel records it (once per :attr:`Launch.key`)
    and runs nothing: outputs stay as the host allocated them."""
    from triton.runtime.jit import JITFunction

    recorded = Recorded()

    def record(self, *args, grid, warmup, **kwargs):
        launch = launch_of(self, args, kwargs)
        modules = recorded.modules.setdefault(launch.key, [])
        if not modules:
            recorded.append(launch)
        if launch.module not in modules:
            modules.append(launch.module)

    run = JITFunction.run
    JITFunction.run = record
    try:
        yield recorded
    finally:
        JITFunction.run = run


@dataclass
class Compiled:
    """What :func:`compile_launch` made: each stage's output (str, or bytes for the cubin), the
    seconds each stage took, and Triton's metadata (``shared``: bytes of shared memory, from the
    TTGIR stage on: :func:`allocated_shared`)."""
    stages: dict
    seconds: dict
    metadata: dict


def compile_launch(launch: Launch, last="cubin", capability: int = 90) -> Compiled:
    """Compile ``launch`` (a ``@triton.jit`` or ``@gluon.jit`` kernel's) for ``sm_<capability>`` through
    Triton's stages up to ``last``: one of :data:`STAGES`, or a function of the TTIR text that names it
    (``tl`` kernels: Gluon's have no TTIR stage); raises what Triton raises."""
    from triton._C.libtriton import ir
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction

    backend = _backend(capability)
    options = backend.parse_options(dict(launch.options))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    source = GluonASTSource if isinstance(launch.fn, GluonJITFunction) else ASTSource  # Gluon starts at TTGIR
    src = source(launch.fn, dict(launch.signature), constexprs=dict(launch.constexprs),
                 attrs={path: backend.parse_attr(v) for path, v in launch.attrs})
    stages = {}
    backend.add_stages(stages, options, src.language)
    metadata = {"target": backend.target, **options.__dict__}
    outputs, seconds = {}, {}
    start = time.perf_counter()
    module = src.make_ir(backend.target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         context)
    seconds["ast"] = time.perf_counter() - start
    for stage in (s for s in STAGES if s in stages):
        start = time.perf_counter()
        module = stages[stage](module, metadata)
        seconds[stage] = time.perf_counter() - start
        outputs[stage] = module if isinstance(module, (str, bytes)) else str(module)
        if stage == "ttir" and callable(last):
            last = last(outputs["ttir"])
        if stage == last:
            break
    if last == "ttgir" and "ttgir" in outputs:
        start = time.perf_counter()
        metadata["shared"] = allocated_shared(module, context, options, capability)
        seconds["shared"] = time.perf_counter() - start
    return Compiled(outputs, seconds, {k: v for k, v in metadata.items() if isinstance(v, (int, str, float))})


def allocated_shared(module, context, options, capability: int = 90) -> int:
    """Bytes of shared memory Triton allocates for a TTGIR module (``metadata["shared"]``, which
    the nvidia backend sets in its TTGIR -> LLVM IR stage): that stage's passes up to and including
    the shared-memory allocation, without the lowering to LLVM that follows it (the bulk of the
    stage's time). Changes ``module``. tests/test_sm90_compile.py checks that the number is the
    backend's own on the launches it lowers further."""
    from triton._C.libtriton import ir, nvidia, passes
    from triton.backends.nvidia.compiler import get_ptx_version_from_options

    pm = ir.pass_manager(context)
    passes.ttgpuir.add_combine_tensor_select_and_if(pm)
    passes.ttgpuir.add_allocate_warp_groups(pm)
    passes.convert.add_scf_to_cf(pm)
    passes.gluon.add_inliner(pm)
    nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(pm, capability, get_ptx_version_from_options(options, capability))
    pm.run(module, "allocated_shared")
    return module.get_int_attr("ttg.shared")


def shared_of_ttgir(text: str, options, capability: int = 90) -> int:
    """:func:`allocated_shared` of a TTGIR module's text (a stage output of :func:`compile_launch`)."""
    import tempfile

    from triton._C.libtriton import ir

    backend = _backend(capability)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    with tempfile.NamedTemporaryFile("w", suffix=".ttgir") as f:
        f.write(text)
        f.flush()
        module = ir.parse_mlir_module(f.name, context)
    return allocated_shared(module, context, backend.parse_options(dict(options)), capability)


def without_interpreter() -> dict:
    """The environment of a child process that imports kernels as JITFunctions (see the module doc)."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env
