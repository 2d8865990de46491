"""Fused CPU loops for `log_inhibition`, in C, compiled on first use.

The keras.ops path and eager torch make several passes over (chunk, batch,
n_out) buffers per chunk of inputs. These loops make one pass and keep their
working set in registers and L1/L2:

- forward: for a block of 4 samples x 64 outputs, the running products of
  `chunk` factors stay in 16 vector registers while the loop runs over the
  inputs j; each chunk's product (floored at `pfloor`) is folded into a
  mantissa in [1, 2) and an integer exponent, so there is one log per output,
  not one per chunk, and the result is that of
  `s = sum_chunks log(max(prod_j max(1 - W[j, i] x[b, j], floor), pfloor))`.
- backward: for 4 inputs j at a time, one pass over (sample, output) computes

      q[b, j, i] = u[b, i] / f[b, j, i]     (0 where f <= floor)
      dW[j, i] = -sum_b x[b, j] q,   dx[b, j] = -sum_i W[j, i] q

  with one division per 4 factors: 1/f_k = (product of the other three
  factors) / (product of all four).

Both split the work over `threads` POSIX threads. The mask and floor passes
are skipped when the ranges of x and W rule out a factor at the floor.
Values and gradients match the keras.ops path to float32 rounding (tests).

`load()` compiles the source with the C compiler on PATH (`$CC`, else cc,
gcc or clang) for this CPU (`-march=native`) into a cache directory
(`$KERAS_SYNANN_CACHE`, else ~/.cache/keras_synann), once per source,
compiler and CPU; it returns None when there is no compiler, the platform is
not Linux or macOS, or compilation fails, and callers fall back.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
#define VL 16  /* floats per vector */
#define NV 4   /* vectors of outputs per forward tile */
#define NB 4   /* samples per forward tile */

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf vsplat(float a) { return (vf){0} + a; }
static inline vf vsel(vi m, vf a, vf b) {  /* m ? a : b, lane by lane */
  vi ia, ib, r; vf out;
  memcpy(&ia, &a, sizeof ia); memcpy(&ib, &b, sizeof ib);
  r = (m & ia) | (~m & ib);
  memcpy(&out, &r, sizeof out);
  return out;
}
static inline vf vmax(vf a, vf b) { return vsel(a > b, a, b); }

/* run * p as a mantissa in [1, 2) (returned) and an exponent added to *e. */
static inline vf vfold(vf run, vf p, vi *e) {
  vf r = run * p; vi bits;
  memcpy(&bits, &r, sizeof bits);
  *e += ((bits >> 23) & 0xff) - 127;
  bits = (bits & 0x007fffff) | 0x3f800000;
  memcpy(&r, &bits, sizeof r);
  return r;
}
static inline float sfold(float run, float p, int32_t *e) {
  float r = run * p; int32_t bits;
  memcpy(&bits, &r, sizeof bits);
  *e += ((bits >> 23) & 0xff) - 127;
  bits = (bits & 0x007fffff) | 0x3f800000;
  memcpy(&r, &bits, sizeof r);
  return r;
}

/* log(m * 2^e) for m in [1, 2): m > sqrt(2) is halved, then
   log m = 2 atanh(z), z = (m - 1) / (m + 1), |z| < 0.172, to z^9 (error < 1e-9). */
static inline vf vlog(vf m, vi e) {
  vf big = vsel(m > 1.41421356f, vsplat(1.f), vsplat(0.f));
  vf ef;
  m = m * (1.f - 0.5f * big);
  vf z = (m - 1.f) / (m + 1.f), z2 = z * z;
  vf p = vsplat(1.f / 9.f);
  p = p * z2 + 1.f / 7.f;
  p = p * z2 + 1.f / 5.f;
  p = p * z2 + 1.f / 3.f;
  p = p * z2 + 1.f;
  for (int k = 0; k < VL; k++) ef[k] = (float)e[k];
  return 2.f * z * p + (ef + big) * 0.693147181f;
}
static inline float slog(float m, int32_t e) {
  float big = m > 1.41421356f ? 1.f : 0.f;
  m = m * (1.f - 0.5f * big);
  float z = (m - 1.f) / (m + 1.f), z2 = z * z;
  float p = 1.f / 9.f;
  p = p * z2 + 1.f / 7.f;
  p = p * z2 + 1.f / 5.f;
  p = p * z2 + 1.f / 3.f;
  p = p * z2 + 1.f;
  return 2.f * z * p + ((float)e + big) * 0.693147181f;
}

typedef struct {
  const float *x, *w, *u;
  float *s, *dx, *dw;
  int64_t batch, n_in, n_out, chunk;
  float floor_, pfloor;
  int may_floor;
} args_t;

/* Forward for samples [b, b + nb) and outputs [i0, i0 + nv * VL). */
static void fwd_tile(const args_t *a, int64_t b, int nb, int64_t i0, int nv) {
  vf run[NB][NV], flo = vsplat(a->floor_), pfl = vsplat(a->pfloor);
  vi ex[NB][NV];
  for (int r = 0; r < NB; r++)
    for (int k = 0; k < NV; k++) { run[r][k] = vsplat(1.f); ex[r][k] = (vi){0}; }
  for (int64_t j0 = 0; j0 < a->n_in; j0 += a->chunk) {
    int64_t j1 = j0 + a->chunk < a->n_in ? j0 + a->chunk : a->n_in;
    vf p[NB][NV];
    for (int r = 0; r < NB; r++)
      for (int k = 0; k < NV; k++) p[r][k] = vsplat(1.f);
    for (int64_t j = j0; j < j1; j++) {
      const float *wj = a->w + j * a->n_out + i0;
      vf wv[NV];
      for (int k = 0; k < NV && k < nv; k++) wv[k] = vload(wj + k * VL);
      for (int r = 0; r < NB && r < nb; r++) {
        float xv = a->x[(b + r) * a->n_in + j];
        for (int k = 0; k < NV && k < nv; k++) {
          vf f = 1.f - wv[k] * xv;
          p[r][k] *= a->may_floor ? vmax(f, flo) : f;
        }
      }
    }
    for (int r = 0; r < NB && r < nb; r++)
      for (int k = 0; k < NV && k < nv; k++)
        run[r][k] = vfold(run[r][k], vmax(p[r][k], pfl), &ex[r][k]);
  }
  for (int r = 0; r < NB && r < nb; r++)
    for (int k = 0; k < NV && k < nv; k++)
      vstore(a->s + (b + r) * a->n_out + i0 + k * VL, vlog(run[r][k], ex[r][k]));
}

/* Forward for outputs [lo, hi) (lo a multiple of NV * VL) of every sample. */
static void fwd_range(const args_t *a, int64_t lo, int64_t hi) {
  int64_t whole = lo + (hi - lo) / VL * VL;
  for (int64_t i0 = lo; i0 < whole; i0 += NV * VL) {
    int nv = (whole - i0) / VL < NV ? (int)((whole - i0) / VL) : NV;
    for (int64_t b = 0; b < a->batch; b += NB)
      fwd_tile(a, b, a->batch - b < NB ? (int)(a->batch - b) : NB, i0, nv);
  }
  for (int64_t i = whole; i < hi; i++)  /* outputs past the last whole vector */
    for (int64_t b = 0; b < a->batch; b++) {
      const float *xb = a->x + b * a->n_in;
      float run = 1.f; int32_t e = 0;
      for (int64_t j0 = 0; j0 < a->n_in; j0 += a->chunk) {
        int64_t j1 = j0 + a->chunk < a->n_in ? j0 + a->chunk : a->n_in;
        float p = 1.f;
        for (int64_t j = j0; j < j1; j++) {
          float f = 1.f - a->w[j * a->n_out + i] * xb[j];
          p *= (a->may_floor && !(f > a->floor_)) ? a->floor_ : f;
        }
        run = sfold(run, p > a->pfloor ? p : a->pfloor, &e);
      }
      a->s[b * a->n_out + i] = slog(run, e);
    }
}

/* Backward for inputs [lo, hi) (lo a multiple of 4), four at a time. */
static void bwd_range(const args_t *a, int64_t lo, int64_t hi) {
  const int64_t n_in = a->n_in, n_out = a->n_out;
  const float fl = a->floor_;
  float *scratch = calloc((size_t)(4 * n_out), sizeof(float));
  if (!scratch) return;
  for (int64_t j = lo; j < hi; j += 4) {
    int nj = hi - j < 4 ? (int)(hi - j) : 4;
    const float *wr[4]; float *dr[4];
    for (int k = 0; k < 4; k++) {  /* missing rows: x = 0 (factor 1), rows of scratch */
      wr[k] = k < nj ? a->w + (j + k) * n_out : scratch;
      dr[k] = k < nj ? a->dw + (j + k) * n_out : scratch + k * n_out;
    }
    const float *w0 = wr[0], *w1 = wr[1], *w2 = wr[2], *w3 = wr[3];
    float *d0 = dr[0], *d1 = dr[1], *d2 = dr[2], *d3 = dr[3];
    for (int64_t i = 0; i < n_out; i++) { d0[i] = 0.f; d1[i] = 0.f; d2[i] = 0.f; d3[i] = 0.f; }
    for (int64_t b = 0; b < a->batch; b++) {
      const float *xb = a->x + b * n_in + j, *ub = a->u + b * n_out;
      float x0 = xb[0], x1 = nj > 1 ? xb[1] : 0.f, x2 = nj > 2 ? xb[2] : 0.f,
            x3 = nj > 3 ? xb[3] : 0.f;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
      if (a->may_floor) {
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t i = 0; i < n_out; i++) {
          float f0 = 1.f - w0[i] * x0, f1 = 1.f - w1[i] * x1;
          float f2 = 1.f - w2[i] * x2, f3 = 1.f - w3[i] * x3;
          float g0 = f0 > fl ? f0 : fl, g1 = f1 > fl ? f1 : fl;
          float g2 = f2 > fl ? f2 : fl, g3 = f3 > fl ? f3 : fl;
          float p01 = g0 * g1, p23 = g2 * g3;
          float inv = ub[i] / (p01 * p23);
          float h01 = p23 * inv, h23 = p01 * inv;
          float q0 = f0 > fl ? g1 * h01 : 0.f, q1 = f1 > fl ? g0 * h01 : 0.f;
          float q2 = f2 > fl ? g3 * h23 : 0.f, q3 = f3 > fl ? g2 * h23 : 0.f;
          a0 += w0[i] * q0; a1 += w1[i] * q1; a2 += w2[i] * q2; a3 += w3[i] * q3;
          d0[i] += x0 * q0; d1[i] += x1 * q1; d2[i] += x2 * q2; d3[i] += x3 * q3;
        }
      } else {
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t i = 0; i < n_out; i++) {
          float f0 = 1.f - w0[i] * x0, f1 = 1.f - w1[i] * x1;
          float f2 = 1.f - w2[i] * x2, f3 = 1.f - w3[i] * x3;
          float p01 = f0 * f1, p23 = f2 * f3;
          float inv = ub[i] / (p01 * p23);
          float h01 = p23 * inv, h23 = p01 * inv;
          float q0 = f1 * h01, q1 = f0 * h01, q2 = f3 * h23, q3 = f2 * h23;
          a0 += w0[i] * q0; a1 += w1[i] * q1; a2 += w2[i] * q2; a3 += w3[i] * q3;
          d0[i] += x0 * q0; d1[i] += x1 * q1; d2[i] += x2 * q2; d3[i] += x3 * q3;
        }
      }
      float *dxb = a->dx + b * n_in + j, acc[4] = {a0, a1, a2, a3};
      for (int k = 0; k < nj; k++) dxb[k] = -acc[k];
    }
    for (int k = 0; k < nj; k++)
      for (int64_t i = 0; i < n_out; i++) dr[k][i] = -dr[k][i];
  }
  free(scratch);
}

/* Whether some factor 1 - w x can reach the floor (or the ranges are not finite). */
static int may_floor(const float *x, const float *w, int64_t nx, int64_t nw, float fl) {
  float x_lo = x[0], x_hi = x[0], w_lo = w[0], w_hi = w[0];
  for (int64_t k = 1; k < nx; k++) { x_lo = x[k] < x_lo ? x[k] : x_lo; x_hi = x[k] > x_hi ? x[k] : x_hi; }
  for (int64_t k = 1; k < nw; k++) { w_lo = w[k] < w_lo ? w[k] : w_lo; w_hi = w[k] > w_hi ? w[k] : w_hi; }
  double c[4] = {(double)x_lo * w_lo, (double)x_lo * w_hi, (double)x_hi * w_lo, (double)x_hi * w_hi};
  double top = c[0];
  for (int k = 1; k < 4; k++) top = c[k] > top ? c[k] : top;
  /* product of finite floats: finite; NaN or inf fails the test below */
  return !(top < 1.0 - 4.0 * (double)fl);
}

typedef struct {
  const args_t *a;
  void (*fn)(const args_t *, int64_t, int64_t);
  int64_t lo, hi;
} task_t;

static void *run_task(void *p) {
  task_t *t = p;
  t->fn(t->a, t->lo, t->hi);
  return NULL;
}

/* fn over [0, n) in `threads` pieces whose starts are multiples of `unit`. */
static void parallel(const args_t *a, void (*fn)(const args_t *, int64_t, int64_t),
                     int64_t n, int64_t unit, int threads) {
  int64_t units = (n + unit - 1) / unit;
  if (threads > units) threads = (int)units;
  if (threads < 1) threads = 1;
  task_t tasks[64];
  pthread_t ids[64];
  int started[64] = {0};
  if (threads > 64) threads = 64;
  for (int t = 0; t < threads; t++) {
    tasks[t].a = a; tasks[t].fn = fn;
    tasks[t].lo = units * t / threads * unit;
    tasks[t].hi = t + 1 == threads ? n : units * (t + 1) / threads * unit;
  }
  for (int t = 1; t < threads; t++)
    started[t] = pthread_create(&ids[t], NULL, run_task, &tasks[t]) == 0;
  run_task(&tasks[0]);
  for (int t = 1; t < threads; t++) {
    if (started[t]) pthread_join(ids[t], NULL);
    else run_task(&tasks[t]);
  }
}

void synann_forward(const float *x, const float *w, float *s, int64_t batch,
                    int64_t n_in, int64_t n_out, int64_t chunk, float floor_,
                    float pfloor, int threads) {
  args_t a = {x, w, NULL, s, NULL, NULL, batch, n_in, n_out, chunk, floor_, pfloor, 1};
  if (batch == 0 || n_out == 0) return;
  if (n_in == 0) { memset(s, 0, sizeof(float) * (size_t)(batch * n_out)); return; }
  a.may_floor = may_floor(x, w, batch * n_in, n_in * n_out, floor_);
  parallel(&a, fwd_range, n_out, NV * VL, threads);
}

void synann_backward(const float *x, const float *w, const float *u, float *dx,
                     float *dw, int64_t batch, int64_t n_in, int64_t n_out,
                     float floor_, int threads) {
  args_t a = {x, w, u, NULL, dx, dw, batch, n_in, n_out, 1, floor_, 0.f, 1};
  if (n_in == 0) return;
  if (batch == 0 || n_out == 0) {
    memset(dw, 0, sizeof(float) * (size_t)(n_in * n_out));
    memset(dx, 0, sizeof(float) * (size_t)(batch * n_in));
    return;
  }
  a.may_floor = may_floor(x, w, batch * n_in, n_in * n_out, floor_);
  parallel(&a, bwd_range, n_in, 4, threads);
}
"""

#: Compiler flags tried in order; the first set that compiles is kept.
_FLAG_SETS = (
    ("-O3", "-march=native", "-mprefer-vector-width=512"),
    ("-O3", "-march=native"),
    ("-O3",),
)
_COMMON_FLAGS = ("-fopenmp-simd", "-fPIC", "-shared", "-pthread")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    """What the compiled code depends on: the CPU model and its features."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [
            line
            for line in text.splitlines()
            if line.startswith(("model name", "flags", "Features", "CPU part"))
        ]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("KERAS_SYNANN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
        "keras_synann",
    )
    return Path(root)


def _build(compiler: str) -> Path | None:
    """The compiled library (built now unless cached), or None if it cannot be built."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    for flags in _FLAG_SETS:
        key = hashlib.sha256(
            "\0".join([SOURCE, compiler, version, _cpu_id(), *flags]).encode()
        ).hexdigest()[:20]
        target = _cache_dir() / f"synann_cpu_{key}.so"
        if target.exists():
            return target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src, out = Path(tmp) / "synann_cpu.c", Path(tmp) / "out.so"
                src.write_text(SOURCE)
                result = subprocess.run(
                    [compiler, *flags, *_COMMON_FLAGS, str(src), "-o", str(out)],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if result.returncode == 0:
                    os.replace(out, target)  # atomic: concurrent builders agree
                    return target
        except OSError:
            return None
    return None


@functools.cache
def load():
    """The compiled kernels as a ctypes library, or None where they are unavailable."""
    if sys.platform not in ("linux", "darwin") or os.environ.get(
        "KERAS_SYNANN_NO_CPU_KERNEL"
    ):
        return None
    compiler = _compiler()
    path = _build(compiler) if compiler else None
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.synann_forward.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, f32, f32, i32]
    lib.synann_forward.restype = None
    lib.synann_backward.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, f32, i32]
    lib.synann_backward.restype = None
    return lib


def forward(lib, x, w, s, shape, chunk, floor, product_floor, threads):
    """s = log inhibition of x (batch, n_in) and w (n_in, n_out); raw pointers."""
    batch, n_in, n_out = shape
    lib.synann_forward(
        x, w, s, batch, n_in, n_out, chunk, floor, product_floor, threads
    )


def backward(lib, x, w, u, dx, dw, shape, floor, threads):
    """(dx, dw) of sum(u * s); raw pointers to contiguous float32 arrays."""
    batch, n_in, n_out = shape
    lib.synann_backward(x, w, u, dx, dw, batch, n_in, n_out, floor, threads)
