/* shiftbn's C kernel for batch-mode BN on CPU: exact float64 channel sums and BN's output in one call.
   Shipped as package data; shiftbn/bn/native.py compiles it once per machine and loads it with ctypes. */
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
/* Vectors as wide as one register holds: 8 doubles with AVX-512, else 4. GCC lowers a generic vector
   wider than the target's registers through the stack (6x slower on an AVX2 machine). */
#if defined(__AVX512F__)
#define LANES 8
#else
#define LANES 4
#endif
#define PARTS (16 / LANES)
typedef float fv __attribute__((vector_size(LANES * sizeof(float))));
typedef double dv __attribute__((vector_size(LANES * sizeof(double))));

/* Sums of d = x - kb and d^2 over one channel's rows (N rows of L at stride C * L), float64, 16 lanes. */
static void channel_sums(const float* x, int64_t N, int64_t C, int64_t L, int64_t c, double kb,
                         double* out1, double* out2) {
  dv kv, s1v[PARTS], s2v[PARTS];
  for (int j = 0; j < LANES; j++) kv[j] = kb;
  for (int i = 0; i < PARTS; i++) { s1v[i] = kv - kv; s2v[i] = kv - kv; }
  double s1 = 0.0, s2 = 0.0;
  const int64_t Lv = L - L % 16;
  for (int64_t n = 0; n < N; n++) {
    const float* p = x + (n * C + c) * L;
    for (int64_t l = 0; l < Lv; l += 16) {
      #pragma GCC unroll 4
      for (int i = 0; i < PARTS; i++) {
        fv u;
        memcpy(&u, p + l + i * LANES, sizeof u);
        const dv d = __builtin_convertvector(u, dv) - kv;
        s1v[i] += d; s2v[i] += d * d;
      }
    }
    for (int64_t l = Lv; l < L; l++) { const double d = (double)p[l] - kb; s1 += d; s2 += d * d; }
  }
  for (int i = 0; i < PARTS; i++)
    for (int j = 0; j < LANES; j++) { s1 += s1v[i][j]; s2 += s2v[i][j]; }
  *out1 = s1; *out2 = s2;
}

/* Mean of the channel's first row (sample 0): the batch's own shift, so its variance never cancels. */
static double first_row_mean(const float* x, int64_t C, int64_t L, int64_t c) {
  const float* p = x + c * L;
  double s = 0.0;
  for (int64_t l = 0; l < L; l++) s += p[l];
  return s / (double)L;
}

/* The batch's sums about kb, folded into the totals about k (exact algebra in float64); alpha, beta
   from the batch's own mean and variance rounded to float32, as eval-mode BN computes them. */
static void finish(double kb, double s1, double s2, double cnt, double k, const float* w, const float* b,
                   int64_t c, double eps, double* tot1, double* tot2, float* alpha, float* beta) {
  const double dm = s1 / cnt;
  double var = s2 / cnt - dm * dm;
  if (var < 0) var = 0;
  const float mean = (float)(kb + dm), varf = (float)var;
  const float invstd = 1.0f / sqrtf(varf + (float)eps);
  *alpha = w ? invstd * w[c] : invstd;
  *beta = (b ? b[c] : 0.0f) - mean * *alpha;
  const double e = kb - k;
  tot1[c] += s1 + cnt * e;
  tot2[c] += s2 + 2.0 * e * s1 + cnt * e * e;
}

/* x, y: (N, C, L) contiguous float32. Adds per channel sum(x - k) and sum((x - k)^2), float64, into
   tot1/tot2; writes y = x * alpha + beta (batch statistics) unless y is NULL. Returns 0, or 1 when
   memory ran out (then nothing is added). */
int shiftbn_bn_batch(const float* restrict x, float* restrict y, int64_t N, int64_t C, int64_t L,
                     const double* restrict k, const float* restrict w, const float* restrict b, double eps,
                     double* restrict tot1, double* restrict tot2, int nthreads, int64_t cache_bytes) {
  const double cnt = (double)(N * L);
  float* ab = malloc(2 * C * sizeof(float) + 1);
  double* part = malloc(3 * C * sizeof(double) + 1);
  if (!ab || !part) { free(ab); free(part); return 1; }
  if (L >= 32) {
    const int in_cache = N * L * 4 <= cache_bytes;
    #pragma omp parallel num_threads(nthreads)
    {
      #pragma omp for schedule(static)
      for (int64_t c = 0; c < C; c++) {
        const double kb = first_row_mean(x, C, L, c);
        double s1, s2;
        channel_sums(x, N, C, L, c, kb, &s1, &s2);
        finish(kb, s1, s2, cnt, k[c], w, b, c, eps, tot1, tot2, &ab[c], &ab[C + c]);
        if (y && in_cache) for (int64_t n = 0; n < N; n++) {
          const float* p = x + (n * C + c) * L;
          float* q = y + (n * C + c) * L;
          for (int64_t l = 0; l < L; l++) q[l] = p[l] * ab[c] + ab[C + c];
        }
      }
      if (y && !in_cache) {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < N * C; r++) {
          const float alpha = ab[r % C], beta = ab[C + r % C];
          const float* p = x + r * L;
          float* q = y + r * L;
          for (int64_t l = 0; l < L; l++) q[l] = p[l] * alpha + beta;
        }
      }
    }
  } else {
    /* short rows: each thread a block of channels, samples in memory order */
    double* kb = part;
    double* acc = part + C;  /* acc[c], acc[C + c] */
    for (int64_t c = 0; c < C; c++) { kb[c] = first_row_mean(x, C, L, c); acc[c] = 0.0; acc[C + c] = 0.0; }
    #pragma omp parallel num_threads(nthreads)
    {
      int t = 0, T = 1;
#ifdef _OPENMP
      t = omp_get_thread_num(); T = omp_get_num_threads();
#endif
      const int64_t c0 = C * t / T, c1 = C * (t + 1) / T;
      for (int64_t n = 0; n < N; n++) {
        const float* p = x + n * C * L;
        if (L == 1) {
          for (int64_t c = c0; c < c1; c++) {
            const double d = (double)p[c] - kb[c];
            acc[c] += d; acc[C + c] += d * d;
          }
        } else {
          for (int64_t c = c0; c < c1; c++) {
            double s = 0.0, q = 0.0;
            for (int64_t l = 0; l < L; l++) { const double d = (double)p[c * L + l] - kb[c]; s += d; q += d * d; }
            acc[c] += s; acc[C + c] += q;
          }
        }
      }
      for (int64_t c = c0; c < c1; c++)
        finish(kb[c], acc[c], acc[C + c], cnt, k[c], w, b, c, eps, tot1, tot2, &ab[c], &ab[C + c]);
      if (y) for (int64_t n = 0; n < N; n++) {
        const float* p = x + n * C * L;
        float* q = y + n * C * L;
        for (int64_t c = c0; c < c1; c++)
          for (int64_t l = 0; l < L; l++) q[c * L + l] = p[c * L + l] * ab[c] + ab[C + c];
      }
    }
  }
  free(ab); free(part);
  return 0;
}
