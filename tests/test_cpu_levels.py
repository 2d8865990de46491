"""The C loops per instruction-set level, and the chain that finds them.

- Every level this CPU runs (x86-64, x86-64-v3, x86-64-v4 on an AVX-512 x86
  CPU), and `native`, compiled once per session with -Wall -Wextra -Werror,
  against float64 NumPy for the forward, the adjoint and every contraction,
  on shapes whose edges each tile size meets. FMA contraction is left on
  (as the packaged builds have it): the tolerances cover its last bits.
- armv8-a cross-compiled and run under qemu-user where both are installed.
- The level choice (CPU features, `KERAS_SYNANN_CPU_LEVEL`) and the chain
  packaged library -> first-use compile -> the reasons, each step's reason
  in the message.

The loops do not depend on the Keras backend: the per-level checks run
under jax only (the chain's checks run under every backend).
"""

import concurrent.futures
import ctypes
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_synann.kernels import cpu_build, cpu_compile, cpu_levels
from keras_synann.kernels._numerics import FACTOR_FLOOR, PRODUCT_FLOOR

BACKEND = keras.backend.backend()
VARIANT = "xla_ffi" if BACKEND == "jax" else "pthreads"
STRICT = ("-Wall", "-Wextra", "-Werror")
#: Bytes per vector each level's build uses.
VECTOR_BYTES = {"x86-64": 16, "x86-64-v3": 32, "x86-64-v4": 64, "armv8-a": 16}

loops_only = pytest.mark.skipif(
    BACKEND != "jax", reason="the loops do not depend on the backend: jax runs them"
)


# --- float64 references -------------------------------------------------------


def _factors(x, w):
    return 1.0 - x.astype(np.float64)[:, :, None] * w.astype(np.float64)[None]


def forward64(x, w, chunk):
    g = np.maximum(_factors(x, w), FACTOR_FLOOR)
    s = 0.0
    for j in range(0, x.shape[1], chunk):
        s = s + np.log(np.maximum(np.prod(g[:, j : j + chunk], axis=1), PRODUCT_FLOOR))
    return s


def backward64(x, w, u):
    f = _factors(x, w)
    q = np.where(f > FACTOR_FLOOR, u[:, None, :] / np.where(f > 0, f, 1.0), 0.0)
    dw = -np.einsum("bj,bji->ji", x.astype(np.float64), q)
    dx = -np.einsum("ji,bji->bj", w.astype(np.float64), q)
    return dx, dw


def contract64(slot, power, a, b, c, x, w):
    f = _factors(x, w)
    r = np.where(f > FACTOR_FLOOR, 1.0 / np.where(f > 0, f, 1.0) ** power, 0.0)
    if slot == 0:
        return np.einsum("ji,bi,bji->bj", b, c, r)
    if slot == 1:
        return np.einsum("bj,bi,bji->ji", a, c, r)
    return np.einsum("bj,ji,bji->bi", a, b, r)


# --- calling a library ----------------------------------------------------------


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def _run(lib, x, w, u, chunk, threads, operands):
    """(s, dx, dW, contractions) by the library."""
    batch, n_in = x.shape
    n_out = w.shape[1]
    s = np.empty((batch, n_out), np.float32)
    lib.synann_forward(
        _ptr(x), _ptr(w), _ptr(s), batch, n_in, n_out, chunk,
        ctypes.c_float(FACTOR_FLOOR), ctypes.c_float(PRODUCT_FLOOR), threads,
    )  # fmt: skip
    dx, dw = np.empty_like(x), np.empty_like(w)
    lib.synann_backward(
        _ptr(x), _ptr(w), _ptr(u), _ptr(dx), _ptr(dw), batch, n_in, n_out,
        ctypes.c_float(FACTOR_FLOOR), threads,
    )  # fmt: skip
    contractions = {}
    shapes = ((batch, n_in), (n_in, n_out), (batch, n_out))
    for slot in range(3):
        for power in (1, 2):
            given = [None if k == slot else operands[k] for k in range(3)]
            out = np.empty(shapes[slot], np.float32)
            lib.synann_contract(
                slot, power, *(None if a is None else _ptr(a) for a in given),
                _ptr(x), _ptr(w), _ptr(out), batch, n_in, n_out,
                ctypes.c_float(FACTOR_FLOOR), threads,
            )  # fmt: skip
            contractions[slot, power] = out
    return s, dx, dw, contractions


def _declare(lib):
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.synann_forward.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, f32, f32, i32]
    lib.synann_backward.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, f32, i32]
    lib.synann_contract.argtypes = [i32, i32, *[ptr] * 6, i64, i64, i64, f32, i32]
    return lib


#: (batch, n_in, n_out, chunk, case): tails of every tile (batch not a
#: multiple of 4 or 2, n_out not a multiple of any tile's outputs), several
#: chunks per log, factors at the floor, factors above 1.
CASES = [
    (7, 37, 53, 6, "floored"),
    (9, 70, 150, 16, "small"),
    (5, 40, 67, 40, "negative"),
    (3, 100, 33, 7, "large"),
]


def _inputs(batch, n_in, n_out, case, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.01, 0.99, (batch, n_in)).astype("float32")
    beta = {"small": 0.05, "large": 0.999}.get(case, 0.9)
    w = rng.uniform(0.0, beta, (n_in, n_out)).astype("float32")
    if case == "floored":
        x[0, :3] = 1.0
        w[:2, :] = 1.0
    if case == "negative":
        w -= 0.03
    u = rng.normal(size=(batch, n_out)).astype("float32")
    operands = (
        rng.normal(size=(batch, n_in)).astype("float32"),
        rng.normal(size=(n_in, n_out)).astype("float32"),
        rng.normal(size=(batch, n_out)).astype("float32"),
    )
    return x, w, u, operands


#: Enough factors (2^21) for the loops to start two threads.
THREADED = [(64, 256, 128, 16, "small")]


def _check(lib, threads=2, cases=CASES):
    for batch, n_in, n_out, chunk, case in cases:
        x, w, u, operands = _inputs(batch, n_in, n_out, case)
        s, dx, dw, contractions = _run(lib, x, w, u, chunk, threads, operands)
        _close(s, forward64(x, w, chunk), f"forward {case}")
        want_dx, want_dw = backward64(x, w, u)
        _close(dx, want_dx, f"dx {case}")
        _close(dw, want_dw, f"dW {case}")
        for (slot, power), got in contractions.items():
            want = contract64(slot, power, *operands, x, w)
            _close(got, want, f"contract slot {slot} power {power} {case}")


def _close(got, want, what):
    """float32 loops against float64: relative to the largest value (sums of
    tens of terms of either sign), 1e-5."""
    scale = max(float(np.max(np.abs(want))), 1e-30)
    err = float(np.max(np.abs(got - want))) / scale
    assert err < 1e-5, f"{what}: max error {err:.2e} of the largest value {scale:.3g}"


# --- every level this CPU runs --------------------------------------------------


@pytest.fixture(scope="session")
def level_libraries(tmp_path_factory):
    """{level: loaded library} for every level this CPU runs, and native, built
    once per session (about a second each, two at a time) with warnings as
    errors."""
    cc = cpu_compile.compiler()
    assert cc is not None, cpu_compile.NO_COMPILER
    directory = tmp_path_factory.mktemp("levels")
    levels = (*cpu_levels.supported(), cpu_levels.NATIVE)

    def build(level):
        flags = ("-march=native",)
        if level != cpu_levels.NATIVE:
            flags = cpu_levels.LEVELS[level].flags
        out = directory / f"{level}.so"
        error = cpu_compile.compile_library([cc], "loops", (*flags, *STRICT), out)
        assert not error, f"{level}: {error}"
        return _declare(ctypes.CDLL(str(out)))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(zip(levels, pool.map(build, levels), strict=True))


@loops_only
def test_every_level_matches_float64(level_libraries):
    assert set(cpu_levels.supported()) <= set(level_libraries)
    for level, lib in level_libraries.items():
        info = (ctypes.c_int32 * 4)()
        lib.synann_build_info(info)
        if level in VECTOR_BYTES:
            assert info[0] == VECTOR_BYTES[level], (level, list(info))
        for threads in (1, 3):
            try:
                _check(lib, threads)
            except AssertionError as e:
                raise AssertionError(f"level {level}, {threads} threads: {e}") from e


#: GOMP_parallel's signature: fn(data) on each of `threads` threads.
TEAM = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint
)
MEMBER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


@loops_only
def test_the_loops_share_their_pieces_with_a_team_they_are_given(level_libraries):
    """A team (as torch's OpenMP runtime gives) receives every parallel region;
    this one runs its members one after the other on the calling thread."""
    lib, calls = level_libraries["native"], []

    def team(member, data, threads, flags):
        calls.append(threads)
        for _ in range(threads):  # the first member claims every piece
            MEMBER(member)(data)

    lib.synann_set_team.argtypes = [ctypes.c_void_p]
    keep = TEAM(team)
    lib.synann_set_team(ctypes.cast(keep, ctypes.c_void_p))
    try:
        _check(lib, threads=2, cases=THREADED)
    finally:
        lib.synann_set_team(None)
    assert calls and set(calls) == {2}, calls


@pytest.mark.skipif(BACKEND != "torch", reason="torch's OpenMP threads")
def test_under_torch_the_loops_run_on_torchs_openmp_threads():
    import torch

    from keras_synann.kernels.torch import cpu as torch_cpu

    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("this torch's parallel backend is not OpenMP")
    assert torch_cpu.torch_team() is not None, torch_cpu._loaded_openmp_runtimes()
    torch_cpu.forward(torch.ones(1, 1), torch.zeros(1, 1), 16)  # binds the team
    for threads in (1, 2, 3):
        _check(cpu_build.load("pthreads"), threads, CASES + THREADED)


def test_a_failing_compiler_gives_its_error_and_leaves_no_library(tmp_path):
    failing = shutil.which("false")
    if failing is None:
        pytest.skip("no `false` command")
    error = cpu_compile.compile_library([failing], "loops", (), tmp_path / "a.so")
    assert error == "failed"
    assert not list(tmp_path.rglob("*.so"))


# --- armv8-a under qemu-user ----------------------------------------------------

#: Reads (batch, n_in, n_out, chunk) and x, w, u, a, b, c as float32 from
#: stdin; writes s, dx, dW and the six contractions (slots 0-2, powers 1-2).
_DRIVER = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
void synann_forward(const float *, const float *, float *, int64_t, int64_t, int64_t,
                    int64_t, float, float, int);
void synann_backward(const float *, const float *, const float *, float *, float *,
                     int64_t, int64_t, int64_t, float, int);
void synann_contract(int, int, const float *, const float *, const float *,
                     const float *, const float *, float *, int64_t, int64_t, int64_t,
                     float, int);
static float *get(size_t n) {
  float *p = malloc(4 * n);
  if (fread(p, 4, n, stdin) != n) exit(2);
  return p;
}
int main(void) {
  int64_t d[4];
  if (fread(d, 8, 4, stdin) != 4) return 2;
  int64_t B = d[0], I = d[1], O = d[2], chunk = d[3];
  float *x = get(B * I), *w = get(I * O), *u = get(B * O);
  float *ops[3] = {get(B * I), get(I * O), get(B * O)};
  int64_t sizes[3] = {B * I, I * O, B * O};
  float *s = malloc(4 * B * O), *dx = malloc(4 * B * I), *dw = malloc(4 * I * O);
  synann_forward(x, w, s, B, I, O, chunk, FLOOR, PFLOOR, 2);
  synann_backward(x, w, u, dx, dw, B, I, O, FLOOR, 2);
  fwrite(s, 4, B * O, stdout); fwrite(dx, 4, B * I, stdout); fwrite(dw, 4, I * O, stdout);
  for (int slot = 0; slot < 3; slot++)
    for (int power = 1; power <= 2; power++) {
      const float *given[3];
      for (int k = 0; k < 3; k++) given[k] = k == slot ? NULL : ops[k];
      float *out = malloc(4 * sizes[slot]);
      synann_contract(slot, power, given[0], given[1], given[2], x, w, out, B, I, O,
                      FLOOR, 2);
      fwrite(out, 4, sizes[slot], stdout);
    }
  return 0;
}
"""


def _aarch64_tools():
    """(compiler command, qemu) for aarch64, or None."""
    qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    if qemu is None:
        return None
    if shutil.which("aarch64-linux-gnu-gcc"):
        return ["aarch64-linux-gnu-gcc", "-static"], qemu
    try:
        import ziglang  # noqa: F401
    except ImportError:
        return None
    return [
        sys.executable,
        "-m",
        "ziglang",
        "cc",
        "-target",
        "aarch64-linux-musl",
    ], qemu


@loops_only
def test_armv8_a_under_qemu(tmp_path):
    tools = _aarch64_tools()
    if tools is None:
        pytest.skip("needs qemu-aarch64 and an aarch64 compiler (Debian's "
                    "qemu-user-static and gcc-aarch64-linux-gnu, or ziglang)")  # fmt: skip
    cc, qemu = tools
    (tmp_path / "driver.c").write_text(textwrap.dedent(_DRIVER))
    (tmp_path / "cpu_loops.c").write_text(cpu_compile.source("cpu_loops.c"))
    subprocess.run(
        [*cc, *cpu_compile.OPTIMIZE, *cpu_levels.LEVELS["armv8-a"].flags, *STRICT,
         f"-DFLOOR={FACTOR_FLOOR!r}f", f"-DPFLOOR={PRODUCT_FLOOR!r}f", "-pthread",
         "driver.c", "cpu_loops.c", "-o", "driver", "-lm"],
        cwd=tmp_path, check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    for batch, n_in, n_out, chunk, case in CASES:
        x, w, u, operands = _inputs(batch, n_in, n_out, case)
        given = np.array([batch, n_in, n_out, chunk], np.int64).tobytes() + b"".join(
            a.tobytes() for a in (x, w, u, *operands)
        )
        result = subprocess.run(
            [qemu, str(tmp_path / "driver")], input=given, capture_output=True,
            check=True, timeout=300,
        )  # fmt: skip
        out = np.frombuffer(result.stdout, np.float32)
        slots = (batch * n_in, n_in * n_out, batch * n_out)
        sizes = [batch * n_out, batch * n_in, n_in * n_out]
        sizes += [size for size in slots for _ in (1, 2)]
        got, at = [], 0
        for size in sizes:
            got.append(out[at : at + size])
            at += size
        assert at == out.size
        _close(got[0], forward64(x, w, chunk).ravel(), f"arm forward {case}")
        want_dx, want_dw = backward64(x, w, u)
        _close(got[1], want_dx.ravel(), f"arm dx {case}")
        _close(got[2], want_dw.ravel(), f"arm dW {case}")
        k = 3
        for slot in range(3):
            for power in (1, 2):
                want = contract64(slot, power, *operands, x, w).ravel()
                _close(got[k], want, f"arm contract {slot} {power} {case}")
                k += 1


# --- the level this CPU takes -----------------------------------------------------


_V4 = frozenset(cpu_levels.LEVELS["x86-64-v4"].features)
_V3 = frozenset(cpu_levels.LEVELS["x86-64-v3"].features)


@pytest.fixture
def x86(monkeypatch):
    monkeypatch.setattr(cpu_levels, "machine", lambda: "x86_64")


def test_the_best_level_the_cpu_supports(x86):
    assert cpu_levels.choose({}, _V4) == ("x86-64-v4", None)
    assert cpu_levels.choose({}, _V3) == ("x86-64-v3", None)
    assert cpu_levels.choose({}, _V4 - {"avx512bw"}) == ("x86-64-v3", None)
    assert cpu_levels.choose({}, frozenset({"sse2"})) == ("x86-64", None)
    assert cpu_levels.choose({cpu_levels.ENV: "auto"}, _V3) == ("x86-64-v3", None)


def test_an_environment_variable_names_the_level(x86):
    env = cpu_levels.ENV
    assert cpu_levels.choose({env: "x86-64"}, _V4) == ("x86-64", None)
    assert cpu_levels.choose({env: "native"}, _V3) == ("native", None)
    assert cpu_levels.choose({env: "x86-64-v4"}, _V3 - {"fma"}) == (
        None,
        "KERAS_SYNANN_CPU_LEVEL=x86-64-v4 does not run here: this CPU lacks fma, "
        "avx512f, avx512bw, avx512cd, avx512dq, avx512vl",
    )
    assert cpu_levels.choose({env: "armv8-a"}, _V4) == (
        None,
        "KERAS_SYNANN_CPU_LEVEL=armv8-a does not run here: it is for aarch64, "
        "this machine is x86_64",
    )
    with pytest.raises(
        ValueError,
        match=r"^KERAS_SYNANN_CPU_LEVEL must be one of auto, native, x86-64, "
        r"x86-64-v3, x86-64-v4\. Received: KERAS_SYNANN_CPU_LEVEL='v3'$",
    ):
        cpu_levels.choose({env: "v3"}, _V4)


def test_a_machine_without_packaged_levels_compiles_native(monkeypatch):
    monkeypatch.setattr(cpu_levels, "machine", lambda: "riscv64")
    assert cpu_levels.choose({}, frozenset()) == ("native", None)


# --- the chain: packaged, first-use compile, reasons ---------------------------------


@pytest.fixture(scope="session")
def packaged_build(tmp_path_factory):
    """The library a binary wheel carries for this CPU's lowest level (for jax,
    with its XLA FFI handlers), built once per session with warnings as
    errors: (level, path)."""
    runs = cpu_levels.supported()
    if not runs:
        pytest.skip(f"no packaged level for {cpu_levels.machine()}")
    cc = cpu_compile.compiler()
    assert cc is not None, cpu_compile.NO_COMPILER
    library = cpu_build.VARIANTS[VARIANT]
    out = tmp_path_factory.mktemp("packaged") / cpu_levels.LEVELS[runs[0]].library
    flags = (*cpu_levels.LEVELS[runs[0]].flags, *STRICT)
    error = cpu_compile.compile_library(
        [cc], library, flags, out, cpu_build._include(library)
    )
    assert not error, error
    return runs[0], out


@pytest.fixture
def chain(monkeypatch, tmp_path, packaged_build):
    """cpu_build's choice cleared before and after (it is made once per
    process); the packaged directory and the cache are empty directories of
    this test; the level is the session build's. Returns that level."""
    monkeypatch.setattr(cpu_build, "PACKAGED", tmp_path / "packaged")
    monkeypatch.setenv("KERAS_SYNANN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KERAS_SYNANN_NO_CPU_KERNEL", raising=False)
    monkeypatch.setenv(cpu_levels.ENV, packaged_build[0])
    cpu_build._load.cache_clear()
    yield packaged_build[0]
    cpu_build._load.cache_clear()


def _package(packaged_build):
    """Puts the session's build where a binary wheel puts it."""
    level, path = packaged_build
    cpu_build.PACKAGED.mkdir(parents=True)
    shutil.copy(path, cpu_build.packaged(level))


def _no_compiler(monkeypatch):
    monkeypatch.setattr(cpu_compile, "compiler", lambda: None)


def test_the_packaged_library_needs_no_compiler(
    chain, monkeypatch, tmp_path, packaged_build
):
    _package(packaged_build)
    _no_compiler(monkeypatch)
    assert cpu_build.unavailable(VARIANT) is None
    info = cpu_build.describe(VARIANT)
    assert (info["level"], info["origin"]) == (chain, "packaged")
    assert info["vector_bytes"] == VECTOR_BYTES[chain]
    assert not (tmp_path / "cache").exists()


def test_without_a_packaged_library_the_loops_compile_on_first_use(chain, tmp_path):
    assert cpu_build.unavailable(VARIANT) is None
    info = cpu_build.describe(VARIANT)
    assert (info["level"], info["origin"]) == (chain, "compiled")
    assert info["path"].startswith(str(tmp_path / "cache"))


def test_with_neither_each_step_says_why(chain, monkeypatch):
    _no_compiler(monkeypatch)
    reason = (
        f"this installation carries no C loops for {chain}; "
        "no C compiler found ($CC, cc, gcc, clang)"
    )
    assert cpu_build.unavailable(VARIANT) == reason
    assert cpu_build.describe(VARIANT) == {"unavailable": reason}
    with pytest.raises(RuntimeError, match="carries no C loops"):
        cpu_build.load(VARIANT)


def test_native_compiles_on_first_use_even_beside_a_packaged_library(
    chain, monkeypatch, packaged_build
):
    _package(packaged_build)
    monkeypatch.setenv(cpu_levels.ENV, "native")
    _no_compiler(monkeypatch)
    assert cpu_build.unavailable(VARIANT) == "no C compiler found ($CC, cc, gcc, clang)"


def test_a_level_this_cpu_lacks_is_a_reason_and_a_bad_name_an_error(chain, monkeypatch):
    other = "armv8-a" if cpu_levels.machine() == "x86_64" else "x86-64"
    monkeypatch.setenv(cpu_levels.ENV, other)
    assert cpu_build.unavailable(VARIANT).startswith(
        f"KERAS_SYNANN_CPU_LEVEL={other} does not run here: it is for "
    )
    monkeypatch.setenv(cpu_levels.ENV, "fast")
    cpu_build._load.cache_clear()
    with pytest.raises(ValueError, match="Received: KERAS_SYNANN_CPU_LEVEL='fast'"):
        cpu_build.unavailable(VARIANT)


def test_the_loops_can_be_turned_off(chain, monkeypatch):
    monkeypatch.setenv("KERAS_SYNANN_NO_CPU_KERNEL", "1")
    assert cpu_build.unavailable(VARIANT) == "turned off by $KERAS_SYNANN_NO_CPU_KERNEL"


@pytest.mark.skipif(BACKEND != "jax", reason="XLA FFI handlers")
def test_handlers_jaxlib_would_refuse_are_not_loaded(
    chain, monkeypatch, packaged_build
):
    """A packaged library whose FFI API version is newer than jaxlib's is
    skipped, with the versions named."""
    _package(packaged_build)
    installed = cpu_build._jaxlib_ffi_version()
    assert installed is not None and installed[0] == 0
    monkeypatch.setattr(cpu_build, "_jaxlib_ffi_version", lambda: (0, 0))
    lib, reason = cpu_build._open(cpu_build.packaged(chain), "xla_ffi")
    assert lib is None
    assert reason == (
        "jaxlib's XLA FFI (API version 0.0) does not accept "
        f"{cpu_levels.LEVELS[chain].library}'s handlers (API version "
        f"0.{installed[1]})"
    )
