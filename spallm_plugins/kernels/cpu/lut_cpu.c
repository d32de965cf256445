/* The LUT linear on a CPU: y = x @ W.T + b with W[r, c] = tables[r, c / (in / gpr), code(r, c)].
 *
 * Each output row's packed codes are unpacked once into one byte per weight (L1-resident), then every
 * weight is looked up in its row-group's table (at most 16 floats, held in one or two vector registers:
 * AVX-512 vpermps, AVX2 two vpermps and a blend) and multiplied into up to four rows of x at a time.
 * The codes are read once per call, never widened to an int64 index and never expanded to a dense
 * weight, which is what makes decode (a few rows of x) cheaper than a dense matmul. For many rows of x
 * the caller dequantizes with spallm_lut_dequantize and runs a dense matmul instead.
 *
 * Codes are format v1: packed along the input dimension, first column in the lowest bits
 * (4-bit: two per byte; 2-bit: four per byte; 3-bit: eight per three bytes, little-endian).
 * The ISA is chosen at compile time (-mavx512f -mavx512bw, -mavx2 -mfma, or neither: portable C).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

enum { TABLE_F32 = 0, TABLE_F16 = 1, TABLE_BF16 = 2 };
#define ROW_BLOCK 4

const char *spallm_isa(void) {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "portable";
#endif
}

static inline float table_value(const void *tables, int64_t i, int dtype) {
  if (dtype == TABLE_F32) return ((const float *)tables)[i];
  if (dtype == TABLE_BF16) {
    uint32_t u = (uint32_t)((const uint16_t *)tables)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
  }
  return (float)((const _Float16 *)tables)[i];
}

/* one row-group's table as 16 floats (zero beyond 2**bits); float16 converted 8 at a time where F16C is */
static inline void load_table(const void *tables, int64_t offset, int entries, int dtype, float *table) {
  int k = 0;
  if (dtype == TABLE_F32) {
    memcpy(table, (const float *)tables + offset, entries * sizeof(float));
    k = entries;
  }
#if defined(__F16C__)
  if (dtype == TABLE_F16)
    for (; k + 8 <= entries; k += 8)
      _mm256_storeu_ps(table + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)tables + offset + k))));
#endif
  for (; k < entries; k++) table[k] = table_value(tables, offset + k, dtype);
  for (; k < 16; k++) table[k] = 0.0f;
}

static void unpack_row(const uint8_t *packed, int64_t in, int bits, uint8_t *codes) {
  if (bits == 4) {
    for (int64_t i = 0; i < in / 2; i++) {
      uint8_t b = packed[i];
      codes[2 * i] = b & 15;
      codes[2 * i + 1] = b >> 4;
    }
  } else if (bits == 2) {
    for (int64_t i = 0; i < in / 4; i++) {
      uint8_t b = packed[i];
      codes[4 * i] = b & 3;
      codes[4 * i + 1] = (b >> 2) & 3;
      codes[4 * i + 2] = (b >> 4) & 3;
      codes[4 * i + 3] = b >> 6;
    }
  } else {
    for (int64_t i = 0; i < in / 8; i++) {
      const uint8_t *p = packed + 3 * i;
      uint32_t word = (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16);
      for (int j = 0; j < 8; j++) codes[8 * i + j] = (word >> (3 * j)) & 7;
    }
  }
}

/* sums[m] += sum over columns [c0, c1) of x[m][c] * table[codes[c]], for m < rows (<= ROW_BLOCK) */
static inline __attribute__((always_inline)) void dot_group(int rows, const float *x, int64_t ldx,
                                                            const uint8_t *codes, const float *table,
                                                            int64_t c0, int64_t c1, float *sums) {
  int64_t c = c0;
#if defined(__AVX512F__)
  __m512 t = _mm512_loadu_ps(table);
  __m512 acc[ROW_BLOCK];
  for (int m = 0; m < rows; m++) acc[m] = _mm512_setzero_ps();
  for (; c + 16 <= c1; c += 16) {
    __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + c)));
    __m512 w = _mm512_permutexvar_ps(idx, t);
    for (int m = 0; m < rows; m++) acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * ldx + c), w, acc[m]);
  }
  for (int m = 0; m < rows; m++) sums[m] += _mm512_reduce_add_ps(acc[m]);
#elif defined(__AVX2__)
  __m256 t_low = _mm256_loadu_ps(table), t_high = _mm256_loadu_ps(table + 8);
  __m256i seven = _mm256_set1_epi32(7);
  __m256 acc[ROW_BLOCK];
  for (int m = 0; m < rows; m++) acc[m] = _mm256_setzero_ps();
  for (; c + 8 <= c1; c += 8) {
    __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + c)));
    __m256 high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven));
    __m256 w = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t_low, idx), _mm256_permutevar8x32_ps(t_high, idx), high);
    for (int m = 0; m < rows; m++) acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + c), w, acc[m]);
  }
  for (int m = 0; m < rows; m++) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    sums[m] += _mm_cvtss_f32(s);
  }
#endif
  for (; c < c1; c++) {
    float w = table[codes[c]];
    for (int m = 0; m < rows; m++) sums[m] += x[m * ldx + c] * w;
  }
}

static inline __attribute__((always_inline)) void row_block(int rows, const float *x, int64_t in, const uint8_t *codes,
                                                            const void *tables, int dtype, int64_t r, int64_t gpr,
                                                            int entries, float *sums) {
  int64_t group_size = in / gpr;
  float table[16];
  for (int m = 0; m < rows; m++) sums[m] = 0.0f;
  for (int64_t g = 0; g < gpr; g++) {
    load_table(tables, (r * gpr + g) * entries, entries, dtype, table);
    dot_group(rows, x, in, codes, table, g * group_size, (g + 1) * group_size, sums);
  }
}

/* Calls row(r, codes, context) for every output row r, its codes unpacked one byte per weight into a
 * per-thread buffer; rows are split over threads. Returns 0, or -1 when a buffer cannot be allocated. */
typedef void (*row_fn)(int64_t r, const uint8_t *codes, const void *context);

static int for_each_row(const uint8_t *packed, int64_t out, int64_t in, int bits, int threads, row_fn row,
                        const void *context) {
  int64_t row_bytes = in * bits / 8;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    uint8_t *codes = (uint8_t *)malloc((size_t)in + 64);
    if (!codes) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < out; r++) {
      if (!codes) continue;
      unpack_row(packed + r * row_bytes, in, bits, codes);
      row(r, codes, context);
    }
    free(codes);
  }
  return failed ? -1 : 0;
}

typedef struct {
  const float *x, *bias;
  float *y;
  const void *tables;
  int64_t m_rows, in, out, gpr;
  int dtype, entries;
} linear_args;

static void linear_row(int64_t r, const uint8_t *codes, const void *context) {
  const linear_args a = *(const linear_args *)context;
  float b = a.bias ? a.bias[r] : 0.0f;
  for (int64_t m0 = 0; m0 < a.m_rows; m0 += ROW_BLOCK) {
    float sums[ROW_BLOCK];
    int64_t left = a.m_rows - m0;
    const float *xb = a.x + m0 * a.in;
    switch (left >= ROW_BLOCK ? ROW_BLOCK : (int)left) {
      case 4: row_block(4, xb, a.in, codes, a.tables, a.dtype, r, a.gpr, a.entries, sums); break;
      case 3: row_block(3, xb, a.in, codes, a.tables, a.dtype, r, a.gpr, a.entries, sums); break;
      case 2: row_block(2, xb, a.in, codes, a.tables, a.dtype, r, a.gpr, a.entries, sums); break;
      default: row_block(1, xb, a.in, codes, a.tables, a.dtype, r, a.gpr, a.entries, sums); break;
    }
    for (int64_t m = 0; m < left && m < ROW_BLOCK; m++) a.y[(m0 + m) * a.out + r] = sums[m] + b;
  }
}

/* y [m_rows, out] = x [m_rows, in] @ W.T (+ bias); x, y, bias float32, contiguous. Returns 0, or -1 when out of memory. */
int spallm_lut_linear(const float *x, int64_t m_rows, int64_t in, const uint8_t *packed, int64_t out, int bits,
                      const void *tables, int dtype, int64_t gpr, const float *bias, float *y, int threads) {
  linear_args args = {x, bias, y, tables, m_rows, in, out, gpr, dtype, 1 << bits};
  return for_each_row(packed, out, in, bits, threads, linear_row, &args);
}

typedef struct {
  float *weight;
  const void *tables;
  int64_t in, gpr;
  int dtype, entries;
} dequantize_args;

static void dequantize_row(int64_t r, const uint8_t *codes, const void *context) {
  const dequantize_args a = *(const dequantize_args *)context;
  int64_t group_size = a.in / a.gpr;
  float *w = a.weight + r * a.in;
  float table[16];
  for (int64_t g = 0; g < a.gpr; g++) {
    load_table(a.tables, (r * a.gpr + g) * a.entries, a.entries, a.dtype, table);
    int64_t c = g * group_size, c1 = (g + 1) * group_size;
#if defined(__AVX512F__)
    __m512 t = _mm512_loadu_ps(table);
    for (; c + 16 <= c1; c += 16)
      _mm512_storeu_ps(w + c, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + c))), t));
#endif
    for (; c < c1; c++) w[c] = table[codes[c]];
  }
}

/* weight [out, in] float32 = tables[r, c / (in / gpr), code(r, c)] */
int spallm_lut_dequantize(const uint8_t *packed, int64_t out, int64_t in, int bits, const void *tables, int dtype,
                          int64_t gpr, float *weight, int threads) {
  dequantize_args args = {weight, tables, in, gpr, dtype, 1 << bits};
  return for_each_row(packed, out, in, bits, threads, dequantize_row, &args);
}
