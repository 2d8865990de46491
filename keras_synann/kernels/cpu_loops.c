/* Fused CPU loops for keras_synann's log inhibition (float32).

   The keras.ops path and eager torch make several passes over (chunk, batch,
   n_out) buffers per chunk of inputs. These loops make one pass each way and
   keep their working set in registers and L1/L2:

   - forward: for a tile of 4 samples x 64 outputs, the products of `chunk`
     factors stay in 16 vector registers while the loop runs over the inputs j
     (each row of W is loaded once per 4 samples); each chunk's product,
     floored at `pfloor`, is folded into a mantissa in [1, 2) and an integer
     exponent, so there is one log per output instead of one per chunk:

       s[b, i] = sum_chunks log(max(prod_j max(1 - W[j, i] x[b, j], floor), pfloor))

   - backward: for 4 inputs j and 2 samples at a time, one pass over the
     outputs i computes

       q[b, j, i] = u[b, i] / f[b, j, i]     (0 where f <= floor)
       dW[j, i] = -sum_b x[b, j] q,   dx[b, j] = -sum_i W[j, i] q

     with one reciprocal per 4 factors (1/f_k = the product of the other
     three over the product of all four), refined by Newton steps to float32
     rounding.

   The floor's compare-and-select is skipped when the ranges of x and W rule
   out a factor at the floor (the usual case). Work is split over `threads`
   threads: an OpenMP team where built with -fopenmp (the torch glue: torch's
   own libgomp, so one pool of threads), POSIX threads otherwise.

   - contract: one partial derivative of T_p = sum A[b,j] B[j,i] C[b,i] R_p,
     R_p = 1 / f^p (0 where f is floored), with respect to the operand left
     out: the family every higher derivative is made of (kernels/rules.py).
     Plain loops over contiguous rows of W, which the compiler vectorises.

   Entry points: synann_forward, synann_backward, synann_contract (row-major
   float32 arrays).
   keras_synann/kernels/cpu_build.py compiles this file; cpu_ffi.c wraps the
   entry points as XLA FFI handlers for jax. */

#include <pthread.h>
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__)
/* Without AVX-512, GCC notes that passing 64-byte vectors by value differs
   between compilers' ABIs; every such function here is static, so no ABI
   boundary is crossed. */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

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
  /* synann_contract: the operands a (batch, n_in), b (n_in, n_out),
     c (batch, n_out), the one left out NULL; the output; the power p. */
  const float *pa, *pb, *pc;
  float *out;
  int power;
} args_t;

/* Forward for samples [b, b + nb) and outputs [i0, i0 + nv * VL): the
   products stay in nb * nv registers (callers pass constants, see fwd_block). */
static inline __attribute__((always_inline)) void fwd_tile(
    const args_t *a, int64_t b, const int nb, int64_t i0, const int nv, const int may_floor) {
  const float *x = a->x, *w = a->w;
  const int64_t n_in = a->n_in, n_out = a->n_out, chunk = a->chunk;
  const vf flo = vsplat(a->floor_), pfl = vsplat(a->pfloor);
  vf run[NB][NV];
  vi ex[NB][NV];
  for (int r = 0; r < nb; r++)
    for (int k = 0; k < nv; k++) { run[r][k] = vsplat(1.f); ex[r][k] = (vi){0}; }
  for (int64_t j0 = 0; j0 < n_in; j0 += chunk) {
    int64_t j1 = j0 + chunk < n_in ? j0 + chunk : n_in;
    vf p[NB][NV];
    for (int r = 0; r < nb; r++)
      for (int k = 0; k < nv; k++) p[r][k] = vsplat(1.f);
    for (int64_t j = j0; j < j1; j++) {
      const float *wj = w + j * n_out + i0;
      vf wv[NV];
      for (int k = 0; k < nv; k++) wv[k] = vload(wj + k * VL);
      for (int r = 0; r < nb; r++) {
        float xv = x[(b + r) * n_in + j];
        for (int k = 0; k < nv; k++) {
          vf f = 1.f - wv[k] * xv;
          p[r][k] *= may_floor ? vmax(f, flo) : f;
        }
      }
    }
    for (int r = 0; r < nb; r++)
      for (int k = 0; k < nv; k++) run[r][k] = vfold(run[r][k], vmax(p[r][k], pfl), &ex[r][k]);
  }
  for (int r = 0; r < nb; r++)
    for (int k = 0; k < nv; k++)
      vstore(a->s + (b + r) * n_out + i0 + k * VL, vlog(run[r][k], ex[r][k]));
}

/* fwd_tile with nb and nv as compile-time constants. */
#define FWD_CASES(nb, mf)                                        \
  switch (nv) {                                                  \
    case 4: fwd_tile(a, b, nb, i0, 4, mf); break;                \
    case 3: fwd_tile(a, b, nb, i0, 3, mf); break;                \
    case 2: fwd_tile(a, b, nb, i0, 2, mf); break;                \
    default: fwd_tile(a, b, nb, i0, 1, mf); break;               \
  }
static void fwd_block(const args_t *a, int64_t b, int nb, int64_t i0, int nv) {
  if (a->may_floor) {
    if (nb == NB) { FWD_CASES(NB, 1) } else { FWD_CASES(1, 1) }
  } else {
    if (nb == NB) { FWD_CASES(NB, 0) } else { FWD_CASES(1, 0) }
  }
}

/* Forward for outputs [lo, hi) (lo a multiple of NV * VL) of every sample. */
static void fwd_range(const args_t *a, int64_t lo, int64_t hi) {
  int64_t whole = lo + (hi - lo) / VL * VL;
  for (int64_t i0 = lo; i0 < whole; i0 += NV * VL) {
    int nv = (whole - i0) / VL < NV ? (int)((whole - i0) / VL) : NV;
    int64_t b = 0;
    for (; b + NB <= a->batch; b += NB) fwd_block(a, b, NB, i0, nv);
    for (; b < a->batch; b++) fwd_block(a, b, 1, i0, nv);
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

/* 1/p to float32 rounding for normal p: a first guess refined by Newton steps
   r <- r (2 - p r), each squaring the relative error. AVX-512 guesses to 2^-14
   (one step); elsewhere the exponent-flip guess is within 5% (three steps). */
static inline vf vrcp(vf p) {
#if defined(__AVX512F__)
  vf r = (vf)_mm512_rcp14_ps((__m512)p);
#else
  vi bits; vf r;
  memcpy(&bits, &p, sizeof bits);
  bits = 0x7EF311C3 - bits;
  memcpy(&r, &bits, sizeof r);
  r = r * (2.f - p * r);
  r = r * (2.f - p * r);
#endif
  return r * (2.f - p * r);
}

static inline float hsum(vf v) {
  float t = 0.f;
  for (int k = 0; k < VL; k++) t += v[k];
  return t;
}

/* q_k for one sample and one vector of outputs: u / f_k = u (product of the other
   three factors) / (product of all four); 0 where f_k is at the floor. */
#define BWD_Q(uv, x0, x1, x2, x3, q0, q1, q2, q3)                                    \
  do {                                                                                \
    vf f0 = 1.f - v0 * (x0), f1 = 1.f - v1 * (x1), f2 = 1.f - v2 * (x2),              \
       f3 = 1.f - v3 * (x3);                                                          \
    vf g0 = f0, g1 = f1, g2 = f2, g3 = f3;                                            \
    if (may_floor) { g0 = vmax(f0, flo); g1 = vmax(f1, flo); g2 = vmax(f2, flo); g3 = vmax(f3, flo); } \
    vf p01 = g0 * g1, p23 = g2 * g3, inv = vrcp(p01 * p23);                           \
    vf h01 = (p23 * (uv)) * inv, h23 = (p01 * (uv)) * inv; /* u / p01, u / p23 */     \
    q0 = g1 * h01; q1 = g0 * h01; q2 = g3 * h23; q3 = g2 * h23;                       \
    if (may_floor) {                                                                  \
      q0 = vsel(f0 > flo, q0, zero); q1 = vsel(f1 > flo, q1, zero);                   \
      q2 = vsel(f2 > flo, q2, zero); q3 = vsel(f3 > flo, q3, zero);                   \
    }                                                                                 \
  } while (0)

/* Backward for inputs j, ..., j + 3 (rows wr, gradient rows dr, x column xc),
   two samples at a time (they share the loads and stores of W and dW). */
static inline __attribute__((always_inline)) void bwd_rows(
    const args_t *a, const float *const wr[4], float *const dr[4], const float *xc,
    int nj, const int may_floor) {
  const int64_t n_in = a->n_in, n_out = a->n_out, whole = n_out / VL * VL;
  const float fl = a->floor_, *u = a->u;
  const vf flo = vsplat(fl), zero = vsplat(0.f);
  const float *w0 = wr[0], *w1 = wr[1], *w2 = wr[2], *w3 = wr[3];
  float *d0 = dr[0], *d1 = dr[1], *d2 = dr[2], *d3 = dr[3];
  for (int64_t b = 0; b < a->batch; b += 2) {
    const int two = b + 1 < a->batch;
    const float *ub = u + b * n_out, *uc = two ? ub + n_out : ub;
    const float *xb = xc + b * n_in, *xd = two ? xb + n_in : xb;
    float xs[2][4];
    for (int k = 0; k < 4; k++) {
      xs[0][k] = k < nj ? xb[k] : 0.f;
      xs[1][k] = k < nj && two ? xd[k] : 0.f;
    }
    const float x0 = xs[0][0], x1 = xs[0][1], x2 = xs[0][2], x3 = xs[0][3];
    const float y0 = xs[1][0], y1 = xs[1][1], y2 = xs[1][2], y3 = xs[1][3];
    vf a0 = zero, a1 = zero, a2 = zero, a3 = zero, c0 = zero, c1 = zero, c2 = zero, c3 = zero;
    for (int64_t i = 0; i < whole; i += VL) {
      const vf v0 = vload(w0 + i), v1 = vload(w1 + i), v2 = vload(w2 + i), v3 = vload(w3 + i);
      vf q0, q1, q2, q3, r0, r1, r2, r3;
      BWD_Q(vload(ub + i), x0, x1, x2, x3, q0, q1, q2, q3);
      BWD_Q(vload(uc + i), y0, y1, y2, y3, r0, r1, r2, r3);
      a0 += v0 * q0; a1 += v1 * q1; a2 += v2 * q2; a3 += v3 * q3;
      c0 += v0 * r0; c1 += v1 * r1; c2 += v2 * r2; c3 += v3 * r3;
      vstore(d0 + i, vload(d0 + i) + x0 * q0 + y0 * r0);
      vstore(d1 + i, vload(d1 + i) + x1 * q1 + y1 * r1);
      vstore(d2 + i, vload(d2 + i) + x2 * q2 + y2 * r2);
      vstore(d3 + i, vload(d3 + i) + x3 * q3 + y3 * r3);
    }
    float t[2][4] = {{hsum(a0), hsum(a1), hsum(a2), hsum(a3)},
                     {hsum(c0), hsum(c1), hsum(c2), hsum(c3)}};
    for (int s = 0; s < 1 + two; s++) {
      const float *us = s ? uc : ub;
      for (int64_t i = whole; i < n_out; i++)  /* outputs past the last whole vector */
        for (int k = 0; k < 4; k++) {
          float f = 1.f - wr[k][i] * xs[s][k];
          float q = f > fl ? us[i] / f : 0.f;
          t[s][k] += wr[k][i] * q;
          dr[k][i] += xs[s][k] * q;
        }
      float *dxb = a->dx + (b + s) * n_in + (xc - a->x);
      for (int k = 0; k < nj; k++) dxb[k] = -t[s][k];
    }
  }
}

/* Backward for inputs [lo, hi) (lo a multiple of 4), four at a time. */
static void bwd_range(const args_t *a, int64_t lo, int64_t hi) {
  const int64_t n_out = a->n_out;
  float *scratch = calloc((size_t)(4 * n_out), sizeof(float));
  if (!scratch) return;
  for (int64_t j = lo; j < hi; j += 4) {
    int nj = hi - j < 4 ? (int)(hi - j) : 4;
    const float *wr[4];
    float *dr[4];
    for (int k = 0; k < 4; k++) {  /* missing rows: x = 0 (factor 1), rows of scratch */
      wr[k] = k < nj ? a->w + (j + k) * n_out : scratch;
      dr[k] = k < nj ? a->dw + (j + k) * n_out : scratch + k * n_out;
    }
    for (int k = 0; k < 4; k++) memset(dr[k], 0, sizeof(float) * (size_t)n_out);
    if (a->may_floor) bwd_rows(a, wr, dr, a->x + j, nj, 1);
    else bwd_rows(a, wr, dr, a->x + j, nj, 0);
    for (int k = 0; k < nj; k++)
      for (int64_t i = 0; i < n_out; i++) dr[k][i] = -dr[k][i];
  }
  free(scratch);
}

/* Smallest and largest of p[0..n) into *lo, *hi; 0 if some value is NaN. */
static int range(const float *p, int64_t n, float *lo, float *hi) {
  vf vlo = vsplat(p[0]), vhi = vlo;
  vi nan = (vi){0};
  int64_t k = 0;
  for (; k + VL <= n; k += VL) {
    vf v = vload(p + k);
    vlo = vsel(v < vlo, v, vlo);
    vhi = vsel(v > vhi, v, vhi);
    nan |= v != v;
  }
  float l = vlo[0], h = vhi[0];
  int ok = 1;
  for (int j = 0; j < VL; j++) {
    l = vlo[j] < l ? vlo[j] : l;
    h = vhi[j] > h ? vhi[j] : h;
    ok &= nan[j] == 0;
  }
  for (; k < n; k++) {
    l = p[k] < l ? p[k] : l;
    h = p[k] > h ? p[k] : h;
    ok &= p[k] == p[k];
  }
  *lo = l; *hi = h;
  return ok;
}

/* Whether some factor 1 - w x can reach the floor (or the ranges are not finite). */
static int may_floor(const float *x, const float *w, int64_t nx, int64_t nw, float fl) {
  float x_lo, x_hi, w_lo, w_hi;
  if (!range(x, nx, &x_lo, &x_hi) || !range(w, nw, &w_lo, &w_hi)) return 1;
  double c[4] = {(double)x_lo * w_lo, (double)x_lo * w_hi, (double)x_hi * w_lo, (double)x_hi * w_hi};
  double top = c[0];
  for (int k = 1; k < 4; k++) top = c[k] > top ? c[k] : top;
  return !(top < 1.0 - 4.0 * (double)fl);  /* also 1 for an infinite range */
}

/* fn over [0, n) in `threads` pieces whose starts are multiples of `unit`: an
   OpenMP team where the library was built with OpenMP (in a torch process, the
   loader gives it torch's libgomp, so the two share one pool of threads),
   else POSIX threads. */
static void piece(int64_t n, int64_t unit, int t, int threads, int64_t *lo, int64_t *hi) {
  int64_t units = (n + unit - 1) / unit;
  *lo = units * t / threads * unit;
  *hi = t + 1 == threads ? n : units * (t + 1) / threads * unit;
}

#if defined(_OPENMP)
#include <omp.h>
static void parallel(const args_t *a, void (*fn)(const args_t *, int64_t, int64_t),
                     int64_t n, int64_t unit, int threads) {
  int64_t units = (n + unit - 1) / unit;
  if (threads > units) threads = (int)units;
  if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
  {
    int64_t lo, hi;
    piece(n, unit, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
    fn(a, lo, hi);
  }
}
#else
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

static void parallel(const args_t *a, void (*fn)(const args_t *, int64_t, int64_t),
                     int64_t n, int64_t unit, int threads) {
  int64_t units = (n + unit - 1) / unit;
  if (threads > units) threads = (int)units;
  if (threads > 64) threads = 64;
  if (threads < 1) threads = 1;
  task_t tasks[64];
  pthread_t ids[64];
  int started[64] = {0};
  for (int t = 0; t < threads; t++) {
    tasks[t].a = a; tasks[t].fn = fn;
    piece(n, unit, t, threads, &tasks[t].lo, &tasks[t].hi);
  }
  for (int t = 1; t < threads; t++)
    started[t] = pthread_create(&ids[t], NULL, run_task, &tasks[t]) == 0;
  run_task(&tasks[0]);
  for (int t = 1; t < threads; t++) {
    if (started[t]) pthread_join(ids[t], NULL);
    else run_task(&tasks[t]);
  }
}
#endif

/* R_p(f): 1 / f^p, 0 where f <= floor (scalar and VL lanes). */
static inline float rpow(float f, float fl, int p) {
  float r = 1.f / (f > fl ? f : 1.f);
  float out = r;
  for (int k = 1; k < p; k++) out *= r;
  return f > fl ? out : 0.f;
}

static inline vf vrpow(vf f, float fl, int p) {
  vi kept = f > vsplat(fl);
  vf r = vsplat(1.f) / vsel(kept, f, vsplat(1.f));
  vf out = r;
  for (int k = 1; k < p; k++) out *= r;
  return vsel(kept, out, vsplat(0.f));
}

/* o[i] += s * v[i] * R_p(1 - xj w[i]) for i < n. */
static inline void axpy_r(float *o, float s, const float *v, float xj, const float *w,
                          int64_t n, float fl, int p) {
  int64_t i = 0;
  for (; i + VL <= n; i += VL) {
    vf f = vsplat(1.f) - vsplat(xj) * vload(w + i);
    vstore(o + i, vload(o + i) + vsplat(s) * vload(v + i) * vrpow(f, fl, p));
  }
  for (; i < n; i++) o[i] += s * v[i] * rpow(1.f - xj * w[i], fl, p);
}

/* out[b, i] = sum_j A[b, j] B[j, i] R_p, for samples [lo, hi). */
static void contract_c(const args_t *a, int64_t lo, int64_t hi) {
  const int64_t ni = a->n_in, no = a->n_out;
  for (int64_t b = lo; b < hi; b++) {
    float *o = a->out + b * no;
    memset(o, 0, sizeof(float) * (size_t)no);
    for (int64_t j = 0; j < ni; j++) {
      const float aj = a->pa[b * ni + j];
      if (aj != 0.f)
        axpy_r(o, aj, a->pb + j * no, a->x[b * ni + j], a->w + j * no, no, a->floor_,
               a->power);
    }
  }
}

/* out[b, j] = sum_i B[j, i] C[b, i] R_p, for samples [lo, hi). */
static void contract_a(const args_t *a, int64_t lo, int64_t hi) {
  const int64_t ni = a->n_in, no = a->n_out;
  const float fl = a->floor_;
  const int p = a->power;
  for (int64_t b = lo; b < hi; b++) {
    const float *cr = a->pc + b * no;
    for (int64_t j = 0; j < ni; j++) {
      const float xj = a->x[b * ni + j];
      const float *wr = a->w + j * no, *br = a->pb + j * no;
      vf acc = vsplat(0.f);
      int64_t i = 0;
      for (; i + VL <= no; i += VL) {
        vf f = vsplat(1.f) - vsplat(xj) * vload(wr + i);
        acc += vload(br + i) * vload(cr + i) * vrpow(f, fl, p);
      }
      float total = hsum(acc);
      for (; i < no; i++) total += br[i] * cr[i] * rpow(1.f - xj * wr[i], fl, p);
      a->out[b * ni + j] = total;
    }
  }
}

/* out[j, i] = sum_b A[b, j] C[b, i] R_p, for inputs [lo, hi). */
static void contract_b(const args_t *a, int64_t lo, int64_t hi) {
  const int64_t ni = a->n_in, no = a->n_out, nb = a->batch;
  for (int64_t j = lo; j < hi; j++) {
    float *o = a->out + j * no;
    memset(o, 0, sizeof(float) * (size_t)no);
    for (int64_t b = 0; b < nb; b++) {
      const float aj = a->pa[b * ni + j];
      if (aj != 0.f)
        axpy_r(o, aj, a->pc + b * no, a->x[b * ni + j], a->w + j * no, no, a->floor_,
               a->power);
    }
  }
}

/* slot: 0 = a, 1 = b, 2 = c, the operand left out (NULL) and so the output's
   shape: (batch, n_in), (n_in, n_out), (batch, n_out). */
void synann_contract(int slot, int power, const float *pa, const float *pb,
                     const float *pc, const float *x, const float *w, float *out,
                     int64_t batch, int64_t n_in, int64_t n_out, float floor_,
                     int threads) {
  args_t a = {x, w, NULL, NULL, NULL, NULL, batch, n_in, n_out, 1, floor_, 0.f, 1,
              pa, pb, pc, out, power};
  if (slot == 1) {
    parallel(&a, contract_b, n_in, 1, threads);
  } else if (batch > 0) {
    parallel(&a, slot == 0 ? contract_a : contract_c, batch, 1, threads);
  }
}

void synann_forward(const float *x, const float *w, float *s, int64_t batch,
                    int64_t n_in, int64_t n_out, int64_t chunk, float floor_,
                    float pfloor, int threads) {
  args_t a = {x, w, NULL, s, NULL, NULL, batch, n_in, n_out, chunk, floor_, pfloor, 1,
              NULL, NULL, NULL, NULL, 1};
  if (batch == 0 || n_out == 0) return;
  if (n_in == 0) { memset(s, 0, sizeof(float) * (size_t)(batch * n_out)); return; }
  a.may_floor = may_floor(x, w, batch * n_in, n_in * n_out, floor_);
  parallel(&a, fwd_range, n_out, NV * VL, threads);
}

void synann_backward(const float *x, const float *w, const float *u, float *dx,
                     float *dw, int64_t batch, int64_t n_in, int64_t n_out,
                     float floor_, int threads) {
  args_t a = {x, w, u, NULL, dx, dw, batch, n_in, n_out, 1, floor_, 0.f, 1,
              NULL, NULL, NULL, NULL, 1};
  if (n_in == 0) return;
  if (batch == 0 || n_out == 0) {
    memset(dw, 0, sizeof(float) * (size_t)(n_in * n_out));
    memset(dx, 0, sizeof(float) * (size_t)(batch * n_in));
    return;
  }
  a.may_floor = may_floor(x, w, batch * n_in, n_in * n_out, floor_);
  parallel(&a, bwd_range, n_in, 4, threads);
}
