/* Fused CPU loops for keras_synann's log inhibition (float32).

   The keras.ops path and eager torch make several passes over (chunk, batch,
   n_out) buffers per chunk of inputs. These loops make one pass each way and
   keep their working set in registers and L1/L2:

   - forward: for a tile of NB samples x NV vectors of outputs, the products
     of `chunk` factors stay in vector registers while the loop runs over the
     inputs j (each row of W is loaded once per NB samples); each chunk's
     product, floored at `pfloor`, is folded into a mantissa in [1, 2) and an
     integer exponent, so there is one log per output instead of one per chunk:

       s[b, i] = sum_chunks log(max(prod_j max(1 - W[j, i] x[b, j], floor), pfloor))

   - backward: for 4 inputs j and BS samples at a time, one pass over the
     outputs i computes

       q[b, j, i] = u[b, i] / f[b, j, i]     (0 where f <= floor)
       dW[j, i] = -sum_b x[b, j] q,   dx[b, j] = -sum_i W[j, i] q

     with one reciprocal per 4 factors (1/f_k = the product of the other
     three over the product of all four): the instruction set's estimate and
     a Newton step, to within 2 units in the last place.

   The floor's compare-and-select is skipped when the ranges of x and W rule
   out a factor at the floor (the usual case). Work is shared by `threads`
   POSIX threads, or by the threads of an OpenMP runtime the caller names
   (synann_set_team: torch's).

   - contract: one partial derivative of T_p = sum A[b,j] B[j,i] C[b,i] R_p,
     R_p = 1 / f^p (0 where f is floored), with respect to the operand left
     out: the family every higher derivative is made of (kernels/rules.py).
     Loops over contiguous rows of W, CT samples per pass over W.

   The vector width and the tiles follow the instruction set the file is
   compiled for (-march=x86-64, x86-64-v3, x86-64-v4, armv8-a or native; see
   VBYTES and TILE_* below). Entry points: synann_forward, synann_backward,
   synann_contract (row-major float32 arrays), synann_build_info.
   keras_synann/kernels/cpu_build.py loads or compiles this file; cpu_ffi.c
   wraps the entry points as XLA FFI handlers for jax. */

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

/* One vector is what one register of the instruction-set level the file is
   compiled for holds: 64 bytes with AVX-512 (x86-64-v4), 32 with AVX/AVX2
   (x86-64-v3), 16 with SSE2 (x86-64) and NEON (armv8-a). A wider type than
   the registers would be split into several instructions per operation, and
   the tiles below would no longer fit the register file. */
#if defined(__AVX512F__)
#define VBYTES 64
#elif defined(__AVX__)
#define VBYTES 32
#else
#define VBYTES 16
#endif
typedef float vf __attribute__((vector_size(VBYTES)));
typedef int32_t vi __attribute__((vector_size(VBYTES)));
#define VL (VBYTES / 4) /* floats per vector */

/* Tiles, per register file: the forward keeps NB x NV product accumulators
   and NV vectors of a row of W in registers; the backward runs BS samples per
   pass over the outputs (4 gradient accumulators and 4 factors per sample).
   AVX-512 and NEON have 32 vector registers, AVX2 and SSE2 have 16.
   (-DSYNANN_NV=... -DSYNANN_NB=... -DSYNANN_BS=... override them.) */
#if defined(__AVX512F__) || defined(__aarch64__)
#define TILE_NV 4
#define TILE_NB 4
#define TILE_BS 2
#else
#define TILE_NV 2
#define TILE_NB 4
#define TILE_BS 1
#endif
#ifdef SYNANN_NV
#define NV SYNANN_NV
#else
#define NV TILE_NV /* vectors of outputs per forward tile (1 to 4) */
#endif
#ifdef SYNANN_NB
#define NB SYNANN_NB
#else
#define NB TILE_NB /* samples per forward tile */
#endif
#ifdef SYNANN_BS
#define BS SYNANN_BS
#else
#define BS TILE_BS /* samples per backward pass (1 or 2) */
#endif

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
  ef = __builtin_convertvector(e, vf);
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

/* fwd_tile with nb and nv as compile-time constants (nv <= NV). */
#if NV >= 4
#define FWD_NV4(nb, mf) case 4: fwd_tile(a, b, nb, i0, 4, mf); break;
#else
#define FWD_NV4(nb, mf)
#endif
#if NV >= 3
#define FWD_NV3(nb, mf) case 3: fwd_tile(a, b, nb, i0, 3, mf); break;
#else
#define FWD_NV3(nb, mf)
#endif
#if NV >= 2
#define FWD_NV2(nb, mf) case 2: fwd_tile(a, b, nb, i0, 2, mf); break;
#else
#define FWD_NV2(nb, mf)
#endif
#define FWD_CASES(nb, mf)                                        \
  switch (nv) {                                                  \
    FWD_NV4(nb, mf)                                              \
    FWD_NV3(nb, mf)                                              \
    FWD_NV2(nb, mf)                                              \
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

/* 1/p for normal p, to within 2 units in the last place: the instruction
   set's estimate refined by Newton steps r <- r (2 - p r), each squaring the
   relative error: AVX-512's to 2^-14 and AVX's and SSE's to 2^-12 (one step),
   NEON's to 2^-8 (two); elsewhere the exponent-flip guess within 5% (three). */
static inline vf vrcp(vf p) {
  vf r;
  int steps;
#if defined(__AVX512F__)
  r = (vf)_mm512_rcp14_ps((__m512)p);
  steps = 1;
#elif defined(__AVX__)
  r = (vf)_mm256_rcp_ps((__m256)p);
  steps = 1;
#elif defined(__SSE__)
  r = (vf)_mm_rcp_ps((__m128)p);
  steps = 1;
#elif defined(__aarch64__)
  r = (vf)vrecpeq_f32((float32x4_t)p);
  steps = 2;
#else
  vi bits;
  memcpy(&bits, &p, sizeof bits);
  bits = 0x7EF311C3 - bits;
  memcpy(&r, &bits, sizeof r);
  steps = 3;
#endif
  for (int k = 0; k < steps; k++) r = r * (2.f - p * r);
  return r;
}

static inline float hsum(vf v) {
  float t = 0.f;
  for (int k = 0; k < VL; k++) t += v[k];
  return t;
}

/* q_k for one sample and one vector of outputs: u / f_k = u (product of the other
   three factors) / (product of all four); 0 where f_k is at the floor. */
static inline __attribute__((always_inline)) void bwd_q(
    vf uv, const vf v[4], const float xs[4], vf q[4], vf flo, const int may_floor) {
  vf f[4], g[4];
  for (int k = 0; k < 4; k++) {
    f[k] = 1.f - v[k] * xs[k];
    g[k] = may_floor ? vmax(f[k], flo) : f[k];
  }
  vf p01 = g[0] * g[1], p23 = g[2] * g[3], r = uv * vrcp(p01 * p23);
  vf h01 = p23 * r, h23 = p01 * r; /* u / p01, u / p23 */
  q[0] = g[1] * h01; q[1] = g[0] * h01; q[2] = g[3] * h23; q[3] = g[2] * h23;
  if (may_floor)
    for (int k = 0; k < 4; k++) q[k] = vsel(f[k] > flo, q[k], vsplat(0.f));
}

/* Backward for inputs j, ..., j + 3 (rows wr, gradient rows dr, x column xc),
   BS samples at a time (they share the loads and stores of W and dW). */
static inline __attribute__((always_inline)) void bwd_rows(
    const args_t *a, const float *const wr[4], float *const dr[4], const float *xc,
    int nj, const int may_floor) {
  const int64_t n_in = a->n_in, n_out = a->n_out, whole = n_out / VL * VL;
  const float fl = a->floor_, *u = a->u;
  const vf flo = vsplat(fl);
  for (int64_t b = 0; b < a->batch; b += BS) {
    const int ns = a->batch - b < BS ? (int)(a->batch - b) : BS;
    const float *us[BS];
    float xs[BS][4];
    for (int s = 0; s < BS; s++) {  /* samples past the batch: x = 0, no gradient */
      us[s] = u + (b + (s < ns ? s : 0)) * n_out;
      for (int k = 0; k < 4; k++) xs[s][k] = k < nj && s < ns ? xc[(b + s) * n_in + k] : 0.f;
    }
    vf acc[BS][4];
    for (int s = 0; s < BS; s++)
      for (int k = 0; k < 4; k++) acc[s][k] = vsplat(0.f);
    for (int64_t i = 0; i < whole; i += VL) {
      vf v[4], d[4];
      for (int k = 0; k < 4; k++) { v[k] = vload(wr[k] + i); d[k] = vload(dr[k] + i); }
      for (int s = 0; s < BS; s++) {
        vf q[4];
        bwd_q(vload(us[s] + i), v, xs[s], q, flo, may_floor);
        for (int k = 0; k < 4; k++) { acc[s][k] += v[k] * q[k]; d[k] += xs[s][k] * q[k]; }
      }
      for (int k = 0; k < 4; k++) vstore(dr[k] + i, d[k]);
    }
    for (int s = 0; s < ns; s++) {
      float t[4];
      for (int k = 0; k < 4; k++) t[k] = hsum(acc[s][k]);
      for (int64_t i = whole; i < n_out; i++)  /* outputs past the last whole vector */
        for (int k = 0; k < 4; k++) {
          float f = 1.f - wr[k][i] * xs[s][k];
          float q = f > fl ? us[s][i] / f : 0.f;
          t[k] += wr[k][i] * q;
          dr[k][i] += xs[s][k] * q;
        }
      float *dxb = a->dx + (b + s) * n_in + (xc - a->x);
      for (int k = 0; k < nj; k++) dxb[k] = -t[k];
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

/* fn over [0, n) on `threads` POSIX threads (this one included), in pieces
   whose starts are multiples of `unit`. The threads claim pieces from a shared
   counter, about eight each, so that one slowed by another process's work on
   its core takes fewer and the others finish the rest. (One library serves
   every backend: it needs no OpenMP runtime, only libc.) */
typedef struct {
  const args_t *a;
  void (*fn)(const args_t *, int64_t, int64_t);
  int64_t n, step;
  int64_t next; /* the first unclaimed index, advanced atomically */
} work_t;

static void *run_pieces(void *p) {
  work_t *w = p;
  for (;;) {
    int64_t lo = __atomic_fetch_add(&w->next, w->step, __ATOMIC_RELAXED);
    if (lo >= w->n) return NULL;
    w->fn(w->a, lo, lo + w->step < w->n ? lo + w->step : w->n);
  }
}

/* An OpenMP runtime's GOMP_parallel(fn, data, threads, flags), set by
   synann_set_team: the pieces then run on that runtime's threads (torch's pool,
   so that its threads, waiting between torch's own parallel regions, work
   instead of competing with ours for the cores). NULL: POSIX threads. */
typedef void (*team_fn)(void (*)(void *), void *, unsigned, unsigned);
static team_fn team = NULL;

void synann_set_team(void *gomp_parallel) { team = (team_fn)gomp_parallel; }

static void run_team_member(void *p) { run_pieces(p); }

static void parallel(const args_t *a, void (*fn)(const args_t *, int64_t, int64_t),
                     int64_t n, int64_t unit, int threads) {
  int64_t units = (n + unit - 1) / unit, per;
  if (threads > units) threads = (int)units;
  if (threads > 64) threads = 64;
  if (threads < 1) threads = 1;
  per = units / (8 * (int64_t)threads);
  work_t w = {a, fn, n, (per > 1 ? per : 1) * unit, 0};
  if (team != NULL && threads > 1) {
    team(run_team_member, &w, (unsigned)threads, 0);
    return;
  }
  pthread_t ids[64];
  int started[64] = {0};
  for (int t = 1; t < threads; t++)  /* a thread that fails to start leaves its share */
    started[t] = pthread_create(&ids[t], NULL, run_pieces, &w) == 0;
  run_pieces(&w);
  for (int t = 1; t < threads; t++)
    if (started[t]) pthread_join(ids[t], NULL);
}

/* The threads worth starting for `factors` factors: one per 2^20 at most
   (below that a thread's start costs more than its share of the work, and
   a small layer in a larger model leaves the other cores to the framework). */
static int threads_for(int threads, int64_t factors) {
  int64_t most = factors >> 20;
  if (most < 1) most = 1;
  return threads < most ? threads : (int)most;
}

/* R_p(f): 1 / f^p, 0 where f <= floor (scalar and VL lanes). */
static inline float rpow(float f, float fl, int p) {
  float r = 1.f / (f > fl ? f : 1.f);
  float out = r;
  for (int k = 1; k < p; k++) out *= r;
  return f > fl ? out : 0.f;
}

static inline __attribute__((always_inline)) vf vrpow(vf f, float fl, const int p) {
  vi kept = f > vsplat(fl);
  vf r = vsplat(1.f) / vsel(kept, f, vsplat(1.f));
  vf out = r;
  for (int k = 1; k < p; k++) out *= r;
  return vsel(kept, out, vsplat(0.f));
}

/* fn(..., p) with the power p a compile-time constant for 1, 2 and 3. */
#define BY_POWER(p, fn, ...)                         \
  switch (p) {                                       \
    case 1: fn(__VA_ARGS__, 1); break;               \
    case 2: fn(__VA_ARGS__, 2); break;               \
    case 3: fn(__VA_ARGS__, 3); break;               \
    default: fn(__VA_ARGS__, p); break;              \
  }

/* o[i] += s * v[i] * R_p(1 - xj w[i]) for i < n. */
static inline __attribute__((always_inline)) void axpy_r(
    float *o, float s, const float *v, float xj, const float *w, int64_t n, float fl,
    const int p) {
  int64_t i = 0;
  for (; i + VL <= n; i += VL) {
    vf f = vsplat(1.f) - vsplat(xj) * vload(w + i);
    vstore(o + i, vload(o + i) + vsplat(s) * vload(v + i) * vrpow(f, fl, p));
  }
  for (; i < n; i++) o[i] += s * v[i] * rpow(1.f - xj * w[i], fl, p);
}

/* sum_i v[i] c[i] R_p(1 - xj w[i]). */
static inline __attribute__((always_inline)) float dot_r(
    const float *v, const float *c, float xj, const float *w, int64_t n, float fl,
    const int p) {
  vf acc = vsplat(0.f);
  int64_t i = 0;
  for (; i + VL <= n; i += VL) {
    vf f = vsplat(1.f) - vsplat(xj) * vload(w + i);
    acc += vload(v + i) * vload(c + i) * vrpow(f, fl, p);
  }
  float total = hsum(acc);
  for (; i < n; i++) total += v[i] * c[i] * rpow(1.f - xj * w[i], fl, p);
  return total;
}

/* Samples per pass over the rows of W and B in contract_a and contract_c:
   the rows are read from memory once per CT samples (W and B together
   outgrow the L2 cache at n = 784) while CT rows of the output stay in L1. */
#define CT 4

static inline __attribute__((always_inline)) void contract_c_tile(
    const args_t *a, int64_t b0, int64_t b1, const int p) {
  const int64_t ni = a->n_in, no = a->n_out;
  for (int64_t j = 0; j < ni; j++)
    for (int64_t b = b0; b < b1; b++) {
      const float aj = a->pa[b * ni + j];
      if (aj != 0.f)
        axpy_r(a->out + b * no, aj, a->pb + j * no, a->x[b * ni + j], a->w + j * no,
               no, a->floor_, p);
    }
}

/* out[b, i] = sum_j A[b, j] B[j, i] R_p, for samples [lo, hi). */
static void contract_c(const args_t *a, int64_t lo, int64_t hi) {
  const int64_t no = a->n_out;
  memset(a->out + lo * no, 0, sizeof(float) * (size_t)((hi - lo) * no));
  for (int64_t b0 = lo; b0 < hi; b0 += CT) {
    int64_t b1 = b0 + CT < hi ? b0 + CT : hi;
    BY_POWER(a->power, contract_c_tile, a, b0, b1)
  }
}

static inline __attribute__((always_inline)) void contract_a_tile(
    const args_t *a, int64_t b0, int64_t b1, const int p) {
  const int64_t ni = a->n_in, no = a->n_out;
  for (int64_t j = 0; j < ni; j++)
    for (int64_t b = b0; b < b1; b++)
      a->out[b * ni + j] = dot_r(a->pb + j * no, a->pc + b * no, a->x[b * ni + j],
                                 a->w + j * no, no, a->floor_, p);
}

/* out[b, j] = sum_i B[j, i] C[b, i] R_p, for samples [lo, hi). */
static void contract_a(const args_t *a, int64_t lo, int64_t hi) {
  for (int64_t b0 = lo; b0 < hi; b0 += CT) {
    int64_t b1 = b0 + CT < hi ? b0 + CT : hi;
    BY_POWER(a->power, contract_a_tile, a, b0, b1)
  }
}

static inline __attribute__((always_inline)) void contract_b_row(
    const args_t *a, int64_t j, const int p) {
  const int64_t ni = a->n_in, no = a->n_out;
  float *o = a->out + j * no;
  for (int64_t b = 0; b < a->batch; b++) {
    const float aj = a->pa[b * ni + j];
    if (aj != 0.f)
      axpy_r(o, aj, a->pc + b * no, a->x[b * ni + j], a->w + j * no, no, a->floor_, p);
  }
}

/* out[j, i] = sum_b A[b, j] C[b, i] R_p, for inputs [lo, hi). */
static void contract_b(const args_t *a, int64_t lo, int64_t hi) {
  const int64_t no = a->n_out;
  memset(a->out + lo * no, 0, sizeof(float) * (size_t)((hi - lo) * no));
  for (int64_t j = lo; j < hi; j++) BY_POWER(a->power, contract_b_row, a, j)
}

/* slot: 0 = a, 1 = b, 2 = c, the operand left out (NULL) and so the output's
   shape: (batch, n_in), (n_in, n_out), (batch, n_out). */
void synann_contract(int slot, int power, const float *pa, const float *pb,
                     const float *pc, const float *x, const float *w, float *out,
                     int64_t batch, int64_t n_in, int64_t n_out, float floor_,
                     int threads) {
  args_t a = {x, w, NULL, NULL, NULL, NULL, batch, n_in, n_out, 1, floor_, 0.f, 1,
              pa, pb, pc, out, power};
  threads = threads_for(threads, batch * n_in * n_out);
  if (slot == 1) {
    parallel(&a, contract_b, n_in, 1, threads);
  } else if (batch > 0) {
    parallel(&a, slot == 0 ? contract_a : contract_c, batch, CT, threads);
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
  parallel(&a, fwd_range, n_out, NV * VL, threads_for(threads, batch * n_in * n_out));
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
  parallel(&a, bwd_range, n_in, 4, threads_for(threads, batch * n_in * n_out));
}

/* What this build is, for the loader and the tests: {bytes per vector, samples
   and vectors per forward tile, samples per backward pass}. */
void synann_build_info(int32_t out[4]) {
  out[0] = VBYTES;
  out[1] = NB;
  out[2] = NV;
  out[3] = BS;
}
