// Weight-only int8 / int4 kernels for CPU decode: the `cpp` backend of smoe.kernels.quantized, built on first use
// by smoe/kernels/cpp_quant.py and registered as torch.ops.smoe_quant.*. Every kernel computes
// x @ dequantize(w).T (smoe/quant/format.py is the layout and the spec; tests/test_quant.py checks the parity).
//
// Decode multiplies a few rows by each weight, so its time is the weight bytes read. The weights stay packed in
// memory and become fp32 in registers: int8 lanes are widened and converted, int4 nibbles masked and shifted out
// of their bytes; a group's dot product is multiplied by its scale once (its offset multiplies the row's sum over
// the group, computed once per row). int4 weights whose groups are whole multiples of 32 inputs (and whose rows
// are a multiple of 64) multiply int8 activations instead: each row is quantised once per call, per block of 64
// inputs in the order the tile reads the nibbles (smoe/quant/format.py: quantize_activations, the spec), and
// vpmaddubsw multiplies 32 nibbles by 32 int8 activations in one instruction, where widening every nibble to fp32
// cost more than reading it. A tile converts each weight vector once for up to four rows. Work splits over output
// channels with at::parallel_for, on torch's own thread pool: no second pool competes with the next torch op for
// the cores. Built for AVX-512 (cpp_build.py), the int8 tile reads 16 inputs a step in 512-bit registers; the
// int4 tiles are 256 bits wide in every build. Without AVX2 and FMA (or for an int4 group whose half is not a
// multiple of 8) the scalar loops run.
//
// Legend: B rows, I inputs, O outputs, G group size, N groups per row (I / G), R rows sorted by expert,
// D model dim, F expert hidden dim.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SMOE_AVX2 1
#endif
#if defined(SMOE_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__)
#define SMOE_AVX512 1  // the int8 tile in 512-bit registers
#endif

namespace {

constexpr int64_t kChannels = 4;        // output channels per parallel task
constexpr int64_t kTaskMacs = 1 << 15;  // multiply-adds below which a parallel split costs more than it saves
constexpr int64_t kActivationBlock = 64;  // inputs per int8 activation scale: 32 bytes of int4 weights

// One quantised (O, I) matrix as the kernels read it: int8 with a scale per channel, or int4 (two inputs a byte)
// with a scale and an offset per group of G inputs.
struct QMatrix {
  const void* q;
  const float* scale;
  const float* offset;  // nullptr for int8
  int64_t in, group;    // group: G for int4, I for int8
  int64_t row_bytes() const { return offset ? in / 2 : in; }
  int64_t groups() const { return in / group; }
  // int4 with int8 activations: every 32 bytes of a row (64 inputs) lie in one group or fill two whole ones.
  bool int8_activations() const { return offset && group % 32 == 0 && in % kActivationBlock == 0; }
};

// The rows a call multiplies as the kernels read them: fp32 (ldx apart), each row's group sums (int4: the offsets
// multiply them) and, for int4 with int8 activations, the rows quantised: row r's block b (inputs of packed bytes
// 32b .. 32b + 31: their 32 low nibbles' inputs, then their 32 high nibbles') at q[(r * S + b) * 64], its scale at
// qscale[r * S + b], S = I / 64.
struct Rows {
  const float* x;
  int64_t ldx;
  std::vector<float> sums;
  std::vector<int8_t> q;
  std::vector<float> qscale;
};

// Scalar dot products of row x with channel c: the portable path, and the tails the vector tiles leave (int8 from
// input i0 on). xsum: the row's group sums.
float int8_dot(const float* x, const QMatrix& m, int64_t c, int64_t i0 = 0) {
  const int8_t* w = static_cast<const int8_t*>(m.q) + c * m.in;
  float dot = 0.f;
  for (int64_t i = i0; i < m.in; ++i) dot += x[i] * float(w[i]);
  return dot;
}

float int4_dot(const float* x, const float* xsum, const QMatrix& m, int64_t c) {
  const int64_t G = m.group, H = G / 2, N = m.groups();
  const uint8_t* row = static_cast<const uint8_t*>(m.q) + c * m.row_bytes();
  float total = 0.f;
  for (int64_t g = 0; g < N; ++g) {
    const uint8_t* b = row + g * H;
    const float* xg = x + g * G;
    float dot = 0.f;
    for (int64_t k = 0; k < H; ++k) dot += float(b[k] & 15) * xg[k] + float(b[k] >> 4) * xg[H + k];
    total += m.scale[c * N + g] * dot + m.offset[c * N + g] * xsum[g];
  }
  return total;
}

// Row r of `rows` with int4 channel c through int8 activations: each block's exact integer dot product per group,
// times the block's scale and the group's, plus the offsets times the row's group sums.
float int4_a8_dot(const Rows& rows, int64_t r, const QMatrix& m, int64_t c) {
  const int64_t H = m.group / 2, N = m.groups(), S = m.in / kActivationBlock;
  const uint8_t* row = static_cast<const uint8_t*>(m.q) + c * m.row_bytes();
  float total = 0.f;
  for (int64_t b = 0; b < S; ++b) {
    const int8_t* xq = rows.q.data() + (r * S + b) * kActivationBlock;
    for (int64_t half = 0; half < 32; half += 16) {  // bytes of one group (two when G is 32)
      int32_t dot = 0;
      for (int64_t k = half; k < half + 16; ++k) {
        const uint8_t byte = row[32 * b + k];
        dot += int32_t(byte & 15) * xq[k] + int32_t(byte >> 4) * xq[32 + k];
      }
      total += float(dot) * rows.qscale[r * S + b] * m.scale[c * N + (32 * b + half) / H];
    }
  }
  for (int64_t g = 0; g < N; ++g) total += m.offset[c * N + g] * rows.sums[r * N + g];
  return total;
}

#ifdef SMOE_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Ask for the cache line at p (the tile after next's weights: streaming them from memory at one thread's request
// rate alone, the hardware prefetcher leaves half the bandwidth unused). Never faults, even past the end.
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

// Eight bytes at p, widened to 32-bit lanes (signed for int8, unsigned for packed int4).
inline __m256i widen_i8(const void* p) {
  return _mm256_cvtepi8_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(p)));
}
inline __m256i widen_u8(const void* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(p)));
}

#ifndef SMOE_AVX512
// The R x C tile out[r, c0 + c] of rows x[r] (stride ldx) and int8 channels c0 .. c0 + C - 1: each weight vector,
// converted once, feeds R rows; each row vector C channels; R * C + C + 1 <= 16 registers.
template <int R, int C>
void int8_tile(const float* x, int64_t ldx, const QMatrix& m, int64_t c0, float* out, int64_t ldo) {
  const int64_t I = m.in, I8 = I / 8 * 8;
  const int8_t* w = static_cast<const int8_t*>(m.q) + c0 * I;
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t i = 0; i < I8; i += 8) {
    __m256 wv[C];
    if (i % 64 == 0)
      for (int c = 0; c < C; ++c) prefetch(w + (2 * C + c) * I + i);
    for (int c = 0; c < C; ++c) wv[c] = _mm256_cvtepi32_ps(widen_i8(w + c * I + i));
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * ldx + i);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      out[r * ldo + c0 + c] = (hsum(acc[r][c]) + int8_dot(x + r * ldx, m, c0 + c, I8)) * m.scale[c0 + c];
}

#else
// The R x C tile out[r, c0 + c] of rows x[r] (stride ldx) and int8 channels c0 .. c0 + C - 1, sixteen inputs a
// step: each weight vector, converted once, feeds R rows; each row vector C channels. (The int4 tiles stay 256 bits
// wide: a 512-bit int4 tile with int8 activations measured 7-30% slower, with or without vpdpbusd;
// docs/quantization.md.)
template <int R, int C>
void int8_tile(const float* x, int64_t ldx, const QMatrix& m, int64_t c0, float* out, int64_t ldo) {
  const int64_t I = m.in, I16 = I / 16 * 16;
  const int8_t* w = static_cast<const int8_t*>(m.q) + c0 * I;
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < I16; i += 16) {
    __m512 wv[C];
    if (i % 64 == 0)
      for (int c = 0; c < C; ++c) prefetch(w + (2 * C + c) * I + i);
    for (int c = 0; c < C; ++c)
      wv[c] = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c * I + i))));
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * ldx + i);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      out[r * ldo + c0 + c] =
          (_mm512_reduce_add_ps(acc[r][c]) + int8_dot(x + r * ldx, m, c0 + c, I16)) * m.scale[c0 + c];
}

#endif

// The same for int4 channels whose group half H is a multiple of 8: eight bytes hold eight inputs of the group's
// first half (low nibbles) and the eight H later (high nibbles). A group's dot products of the unscaled nibbles are
// summed in registers, then multiplied by the group's scale once (its offset multiplies the row's group sum).
template <int R, int C>
void int4_tile(const float* x, int64_t ldx, const float* xsum, const QMatrix& m, int64_t c0, float* out,
               int64_t ldo) {
  const int64_t G = m.group, H = G / 2, N = m.groups(), bytes = m.row_bytes();
  const uint8_t* q = static_cast<const uint8_t*>(m.q) + c0 * bytes;
  const __m256i nibble = _mm256_set1_epi32(15);
  __m256 acc[R][C];
  float offsets[R][C] = {};
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t g = 0; g < N; ++g) {
    __m256 dot[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) dot[r][c] = _mm256_setzero_ps();
    for (int64_t k = 0; k < H; k += 8) {
      __m256 low[C], high[C];
      if ((g * H + k) % 64 == 0)
        for (int c = 0; c < C; ++c) prefetch(q + (2 * C + c) * bytes + g * H + k);
      for (int c = 0; c < C; ++c) {
        const __m256i v = widen_u8(q + c * bytes + g * H + k);
        low[c] = _mm256_cvtepi32_ps(_mm256_and_si256(v, nibble));
        high[c] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
      }
      for (int r = 0; r < R; ++r) {
        const float* xg = x + r * ldx + g * G + k;
        const __m256 xl = _mm256_loadu_ps(xg), xh = _mm256_loadu_ps(xg + H);
        for (int c = 0; c < C; ++c) dot[r][c] = _mm256_fmadd_ps(xh, high[c], _mm256_fmadd_ps(xl, low[c], dot[r][c]));
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) {
        acc[r][c] = _mm256_fmadd_ps(dot[r][c], _mm256_set1_ps(m.scale[(c0 + c) * N + g]), acc[r][c]);
        offsets[r][c] += m.offset[(c0 + c) * N + g] * xsum[r * N + g];
      }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * ldo + c0 + c] = hsum(acc[r][c]) + offsets[r][c];
}

// The R x C tile of int4 channels with int8 activations, rows r0 .. r0 + R - 1: 32 bytes of a channel are masked
// and shifted into 32 low and 32 high nibbles; vpmaddubsw multiplies each run by the row's 32 int8 activations
// into 16-bit pairs (at most 2 * 15 * 127, and two runs' sum 7,620: no saturation), vpmaddwd sums them into eight
// 32-bit lanes of four bytes each, and the lanes, converted once per block, are scaled by the block's activation
// scale and their group's weight scale (lanes 0-3 and 4-7 lie in different groups when G is 32). P: the blocks
// per group when that is a constant (1 at G = 64, 2 at 128), so the group is a shift of the block and the loop
// keeps no group bookkeeping; 0 for any other G (32, 96, ...), whose blocks the loop tracks.
template <int R, int C, int P>
void int4_a8_tile(const Rows& rows, int64_t r0, const QMatrix& m, int64_t c0, float* out, int64_t ldo) {
  const int64_t H = m.group / 2, N = m.groups(), S = m.in / kActivationBlock, bytes = m.row_bytes();
  const uint8_t* q = static_cast<const uint8_t*>(m.q) + c0 * bytes;
  const __m256i nibble = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  int64_t g0 = 0, g1 = 16 / H, at0 = 0, at1 = 16 % H;  // P = 0: the groups of the block's two 16-byte halves, and
  for (int64_t b = 0; b < S; ++b) {                      // where in them the halves start (no division in the loop)
    if (b % 2 == 0)
      for (int c = 0; c < C; ++c) prefetch(q + (2 * C + c) * bytes + 32 * b);
    __m256i xlo[R], xhi[R];
    __m256 xs[R];
    for (int r = 0; r < R; ++r) {
      const int8_t* xq = rows.q.data() + ((r0 + r) * S + b) * kActivationBlock;
      xlo[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
      xhi[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32));
      xs[r] = _mm256_set1_ps(rows.qscale[(r0 + r) * S + b]);
    }
    for (int c = 0; c < C; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + c * bytes + 32 * b));
      const __m256i low = _mm256_and_si256(v, nibble), high = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
      const float* scale = m.scale + (c0 + c) * N;
      __m256 sw;
      if constexpr (P > 0)
        sw = _mm256_set1_ps(scale[b / P]);
      else
        sw = g0 == g1 ? _mm256_set1_ps(scale[g0])
                      : _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(scale[g0])), _mm_set1_ps(scale[g1]), 1);
      for (int r = 0; r < R; ++r) {
        const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(low, xlo[r]), _mm256_maddubs_epi16(high, xhi[r]));
        const __m256 dot = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones)), xs[r]);
        acc[r][c] = _mm256_fmadd_ps(dot, sw, acc[r][c]);
      }
    }
    if constexpr (P == 0) {
      at0 += 32;
      at1 += 32;
      for (; at0 >= H; at0 -= H) ++g0;
      for (; at1 >= H; at1 -= H) ++g1;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {  // plus the offsets times the row's group sums, eight groups at a time
      const float *offset = m.offset + (c0 + c) * N, *sums = rows.sums.data() + (r0 + r) * N;
      __m256 dot = _mm256_setzero_ps();
      int64_t g = 0;
      for (; g + 8 <= N; g += 8) dot = _mm256_fmadd_ps(_mm256_loadu_ps(offset + g), _mm256_loadu_ps(sums + g), dot);
      float total = hsum(_mm256_add_ps(acc[r][c], dot));
      for (; g < N; ++g) total += offset[g] * sums[g];
      out[(r0 + r) * ldo + c0 + c] = total;
    }
}

template <int R, int C>
void tile(const Rows& rows, int64_t r0, const QMatrix& m, int64_t c0, float* out, int64_t ldo) {
  const float* x = rows.x + r0 * rows.ldx;
  if (m.int8_activations() && m.group == 64)
    int4_a8_tile<R, C, 1>(rows, r0, m, c0, out, ldo);
  else if (m.int8_activations() && m.group == 128)
    int4_a8_tile<R, C, 2>(rows, r0, m, c0, out, ldo);
  else if (m.int8_activations())
    int4_a8_tile<R, C, 0>(rows, r0, m, c0, out, ldo);
  else if (m.offset)
    int4_tile<R, C>(x, rows.ldx, rows.sums.data() + r0 * m.groups(), m, c0, out + r0 * ldo, ldo);
  else
    int8_tile<R, C>(x, rows.ldx, m, c0, out + r0 * ldo, ldo);
}
#endif

// out[r, c] = x[r] . dequantize(m)[c] for rows [r0, r1) and channels [c0, c1) (int4 with int8 activations: the
// rows as quantised).
void matmul_block(const Rows& rows, int64_t r0, int64_t r1, const QMatrix& m, int64_t c0, int64_t c1, float* out,
                  int64_t ldo) {
  int64_t c = c0;
#ifdef SMOE_AVX2
  if (!m.offset || (m.group / 2) % 8 == 0) {
    for (; c + kChannels <= c1; c += kChannels) {
      int64_t r = r0;
      for (; r + 4 <= r1; r += 4)
        for (int64_t half = 0; half < kChannels; half += 2) tile<4, 2>(rows, r, m, c + half, out, ldo);
      if (r1 - r == 3) {  // the last rows share each converted weight too (an expert gets a few rows at decode)
        for (int64_t half = 0; half < kChannels; half += 2) tile<3, 2>(rows, r, m, c + half, out, ldo);
      } else if (r1 - r == 2) {
        tile<2, 4>(rows, r, m, c, out, ldo);
      } else if (r1 - r == 1) {
        tile<1, 4>(rows, r, m, c, out, ldo);
      }
    }
    if (m.int8_activations())  // the last channels through the same instructions, so that no row's result varies
      for (; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) tile<1, 1>(rows, r, m, c, out, ldo);
  }
#endif
  for (; c < c1; ++c)
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = rows.x + r * rows.ldx;
      out[r * ldo + c] = m.int8_activations() ? int4_a8_dot(rows, r, m, c)
                         : m.offset           ? int4_dot(x, rows.sums.data() + r * m.groups(), m, c)
                                              : int8_dot(x, m, c) * m.scale[c];
    }
}

// One block of 64 inputs of a row quantised to int8 (the spec: smoe/kernels/qweight.py, quantize_activations):
// its 32 low-nibble inputs are x[lo], then x[lo2] (16 each: the bytes' two 16-byte halves, which lie in different
// groups when G is 32), its 32 high-nibble ones H further on. Rounds x * (127 / max|x|) to nearest (even on ties)
// in fp32 into q, returns the scale max|x| / 127 (NaN when the block holds inf or NaN; q is then 0), and the
// integer sums of the two halves' rounded values in sum[0], sum[1] (their group sums are these times the scale).
float quantize_block(const float* lo, const float* lo2, int64_t H, int8_t* q, int32_t sum[2]) {
#ifdef SMOE_AVX2
  const float* at[8] = {lo, lo + 8, lo2, lo2 + 8, lo + H, lo + H + 8, lo2 + H, lo2 + H + 8};  // q's order
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 largest = _mm256_set1_ps(std::numeric_limits<float>::max());
  __m256 v[8], top = _mm256_setzero_ps(), finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (int i = 0; i < 8; ++i) {
    v[i] = _mm256_loadu_ps(at[i]);
    const __m256 a = _mm256_and_ps(v[i], magnitude);
    top = _mm256_max_ps(top, a);
    finite = _mm256_and_ps(finite, _mm256_cmp_ps(a, largest, _CMP_LE_OQ));  // false for inf and NaN
  }
  if (_mm256_movemask_ps(finite) != 0xff) {
    std::fill(q, q + kActivationBlock, int8_t(0));
    sum[0] = sum[1] = 0;
    return std::numeric_limits<float>::quiet_NaN();
  }
  __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  t = _mm_max_ps(t, _mm_movehl_ps(t, t));
  const float m = _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
  const __m256 inverse = _mm256_set1_ps(m > 0.f ? 127.f / m : 0.f);
  __m256i n[8];
  for (int i = 0; i < 8; ++i)
    n[i] = _mm256_cvtps_epi32(
        _mm256_round_ps(_mm256_mul_ps(v[i], inverse), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  // The halves: inputs of bytes 0-15 are n[0], n[1] (low) and n[4], n[5] (high); of bytes 16-31, the others.
  const __m256i half0 = _mm256_add_epi32(_mm256_add_epi32(n[0], n[1]), _mm256_add_epi32(n[4], n[5]));
  const __m256i half1 = _mm256_add_epi32(_mm256_add_epi32(n[2], n[3]), _mm256_add_epi32(n[6], n[7]));
  const __m256i pair = _mm256_hadd_epi32(half0, half1);  // 128-bit lanes: h0 h0 h1 h1 | h0 h0 h1 h1
  const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(pair), _mm256_extracti128_si256(pair, 1));
  sum[0] = _mm_extract_epi32(s4, 0) + _mm_extract_epi32(s4, 1);
  sum[1] = _mm_extract_epi32(s4, 2) + _mm_extract_epi32(s4, 3);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo packs' per-128-bit-lane interleave
  for (int i = 0; i < 8; i += 4) {
    const __m256i bytes =
        _mm256_packs_epi16(_mm256_packs_epi32(n[i], n[i + 1]), _mm256_packs_epi32(n[i + 2], n[i + 3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 8 * i), _mm256_permutevar8x32_epi32(bytes, order));
  }
  return m / 127.f;
#else
  float block[kActivationBlock], m = 0.f;
  bool finite = true;
  for (int64_t k = 0; k < 16; ++k) {
    block[k] = lo[k], block[16 + k] = lo2[k], block[32 + k] = lo[H + k], block[48 + k] = lo2[H + k];
  }
  for (float v : block) {
    m = std::max(m, std::fabs(v));
    finite = finite && std::isfinite(v);
  }
  sum[0] = sum[1] = 0;
  if (!finite) {
    std::fill(q, q + kActivationBlock, int8_t(0));
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float inverse = m > 0.f ? 127.f / m : 0.f;
  for (int64_t k = 0; k < kActivationBlock; ++k) {
    q[k] = int8_t(std::nearbyint(block[k] * inverse));
    sum[(k % 32) / 16] += q[k];
  }
  return m / 127.f;
#endif
}

// The B rows of x (I apart) as the kernels of m read them: for int4, their group sums; with int8 activations,
// each block of 64 inputs in the tile's order quantised to int8 (quantize_block), so that the integer dot
// products match the spec exactly, and the group sums are those of the rounded activations: each group's exact
// integer sum per block times the block's scale, added over its blocks in order.
Rows prepare(const float* x, int64_t B, const QMatrix& m) {
  Rows rows{x, m.in, {}, {}, {}};
  if (!m.offset) return rows;
  const int64_t G = m.group, H = G / 2, N = m.groups();
  rows.sums.assign(B * N, 0.f);
  if (!m.int8_activations()) {
    for (int64_t r = 0; r < B; ++r)
      for (int64_t g = 0; g < N; ++g)
        for (int64_t k = 0; k < G; ++k) rows.sums[r * N + g] += x[r * m.in + g * G + k];
    return rows;
  }
  const int64_t S = m.in / kActivationBlock;
  rows.q.resize(B * m.in);
  rows.qscale.resize(B * S);
  for (int64_t r = 0; r < B; ++r) {
    float* sums = rows.sums.data() + r * N;
    int64_t g = 0, at = 0;  // the group of the byte a 16-byte half starts at, and where in it (no division)
    for (int64_t b = 0; b < S; ++b) {
      const int64_t g0 = g, at0 = at;
      if ((at += 16) == H) ++g, at = 0;
      const float* lo = x + r * m.in + g0 * G + at0;
      const float* lo2 = x + r * m.in + g * G + at;
      int32_t sum[2];
      const float scale = quantize_block(lo, lo2, H, rows.q.data() + (r * S + b) * kActivationBlock, sum);
      if (g == g0) {
        sums[g0] += float(sum[0] + sum[1]) * scale;
      } else {
        sums[g0] += float(sum[0]) * scale;
        sums[g] += float(sum[1]) * scale;
      }
      rows.qscale[r * S + b] = scale;
      if ((at += 16) == H) ++g, at = 0;
    }
  }
  return rows;
}

// Tasks (blocks of kChannels channels over `rows` rows of `in` inputs) per parallel chunk.
int64_t grain(int64_t rows, int64_t in) {
  return std::max<int64_t>(1, kTaskMacs / std::max<int64_t>(1, rows * in * kChannels));
}

// Matrix `expert` of a stacked (E, O, I) weight, or the (O, I) weight itself (expert -1).
QMatrix matrix(const at::Tensor& q, const at::Tensor& scale, const std::optional<at::Tensor>& offset, int64_t group,
               int64_t expert = -1) {
  const bool int4 = offset.has_value();
  const int64_t in = q.size(-1) * (int4 ? 2 : 1), per_q = q.size(-2) * q.size(-1);
  const int64_t per_scale = scale.numel() / std::max<int64_t>(1, expert < 0 ? 1 : scale.size(0));
  const int64_t e = std::max<int64_t>(expert, 0);
  return {static_cast<const char*>(q.const_data_ptr()) + e * per_q, scale.const_data_ptr<float>() + e * per_scale,
          int4 ? offset->const_data_ptr<float>() + e * per_scale : nullptr, in, int4 ? group : in};
}

void check(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const std::optional<at::Tensor>& offset,
           int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 (B, I)");
  TORCH_CHECK(q.is_contiguous() && scale.is_contiguous() && scale.scalar_type() == at::kFloat,
              "weights and scales must be contiguous, scales fp32");
  TORCH_CHECK(q.scalar_type() == (offset ? at::kByte : at::kChar), "int8 weights are int8, int4 weights uint8");
  TORCH_CHECK(!offset || (group > 0 && group % 2 == 0 && (2 * q.size(-1)) % group == 0),
              "int4 group must be even and divide the inputs");
}

at::Tensor linear(const at::Tensor& x_BI, const at::Tensor& q, const at::Tensor& scale,
                  const std::optional<at::Tensor>& offset, int64_t group) {
  check(x_BI, q, scale, offset, group);
  const QMatrix m = matrix(q, scale, offset, group);
  TORCH_CHECK(x_BI.size(1) == m.in, "x has ", x_BI.size(1), " inputs, the weight ", m.in);
  const int64_t B = x_BI.size(0), O = q.size(0);
  at::Tensor out = at::empty({B, O}, x_BI.options());
  const float* x = x_BI.const_data_ptr<float>();
  float* y = out.data_ptr<float>();
  const Rows rows = prepare(x, B, m);
  at::parallel_for(0, (O + kChannels - 1) / kChannels, grain(B, m.in), [&](int64_t t0, int64_t t1) {
    matmul_block(rows, 0, B, m, t0 * kChannels, std::min(O, t1 * kChannels), y, O);
  });
  return out;
}

// The stacked expert weights of one MoE layer.
struct ExpertWeights {
  const at::Tensor &gu_q, &gu_s;
  const std::optional<at::Tensor>& gu_z;
  int64_t gu_group;
  const at::Tensor &down_q, &down_s;
  const std::optional<at::Tensor>& down_z;
  int64_t down_group;
  bool gelu;
};

// Every expert's gated FFN on the R rows of x_RD sorted by expert (off: the E + 1 row offsets) into y_RD: the
// gate/up projection of the experts with rows as one parallel loop over (expert, channel block), the activation,
// then the down projection.
void ffn(const at::Tensor& x_RD, const std::vector<int64_t>& off, const ExpertWeights& w, at::Tensor& y_RD) {
  const int64_t R = x_RD.size(0), F2 = w.gu_q.size(1), F = F2 / 2, D = w.down_q.size(1);
  check(x_RD, w.gu_q, w.gu_s, w.gu_z, w.gu_group);
  std::vector<int64_t> active;
  std::vector<QMatrix> up, down;
  for (int64_t e = 0; e + 1 < int64_t(off.size()); ++e)
    if (off[e + 1] > off[e]) {
      active.push_back(e);
      up.push_back(matrix(w.gu_q, w.gu_s, w.gu_z, w.gu_group, e));
      down.push_back(matrix(w.down_q, w.down_s, w.down_z, w.down_group, e));
    }
  if (active.empty()) return;
  at::Tensor h = at::empty({R, F2}, x_RD.options()), a = at::empty({R, F}, x_RD.options());
  TORCH_CHECK(x_RD.size(1) == up[0].in && down[0].in == F && y_RD.size(1) == D,
              "x and the expert weights disagree in shape");
  check(a, w.down_q, w.down_s, w.down_z, w.down_group);

  // One parallel loop over (expert with rows, channel block) of a projection of `in` (R rows) into `to`.
  auto project = [&](const std::vector<QMatrix>& ms, const float* in, int64_t width, float* to) {
    const Rows rows = prepare(in, R, ms[0]);
    const int64_t blocks = (width + kChannels - 1) / kChannels, n = int64_t(ms.size());
    at::parallel_for(0, blocks * n, grain(std::max<int64_t>(1, R / n), ms[0].in), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t k = t / blocks, c = (t % blocks) * kChannels, e = active[k];
        matmul_block(rows, off[e], off[e + 1], ms[k], c, std::min(width, c + kChannels), to, width);
      }
    });
  };
  float *hp = h.data_ptr<float>(), *ap = a.data_ptr<float>();
  project(up, x_RD.const_data_ptr<float>(), F2, hp);
  for (int64_t r = 0; r < R; ++r)  // act(gate) * up: silu, or gelu's tanh approximation
    for (int64_t j = 0; j < F; ++j) {
      const float g = hp[r * F2 + j];
      const float act = w.gelu ? 0.5f * g * (1.f + std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g)))
                               : g / (1.f + std::exp(-g));
      ap[r * F + j] = act * hp[r * F2 + F + j];
    }
  project(down, ap, D, y_RD.data_ptr<float>());
}

// The experts' seam: rows sorted by expert in (offs: E + 1 int64 row offsets), their outputs out.
at::Tensor experts(const at::Tensor& x_RD, const at::Tensor& offs, const at::Tensor& gu_q, const at::Tensor& gu_s,
                   const std::optional<at::Tensor>& gu_z, int64_t gu_group, const at::Tensor& down_q,
                   const at::Tensor& down_s, const std::optional<at::Tensor>& down_z, int64_t down_group, bool gelu) {
  TORCH_CHECK(offs.scalar_type() == at::kLong && offs.is_contiguous() && offs.numel() == gu_q.size(0) + 1,
              "offs must hold E + 1 int64 row offsets");
  const int64_t* o = offs.const_data_ptr<int64_t>();
  const std::vector<int64_t> off(o, o + offs.numel());
  TORCH_CHECK(off.front() == 0 && off.back() == x_RD.size(0), "offs must run from 0 to the row count");
  at::Tensor y_RD = at::empty({x_RD.size(0), down_q.size(1)}, x_RD.options());
  ffn(x_RD, off, {gu_q, gu_s, gu_z, gu_group, down_q, down_s, down_z, down_group, gelu}, y_RD);
  return y_RD;
}

// The routed experts from unsorted tokens (decode): x_ND's N tokens, each with K expert ids (token-major, N * K;
// an id outside [0, E) routes nowhere, as padding does) and weights. A counting sort groups the assignments by
// expert (tokens in order within an expert), the rows are gathered, the FFN runs as in `experts`, and each token's
// output is the weighted sum of its rows, added in the order of its K choices.
at::Tensor moe(const at::Tensor& x_ND, const at::Tensor& ids_A, const at::Tensor& weights_A, const at::Tensor& gu_q,
               const at::Tensor& gu_s, const std::optional<at::Tensor>& gu_z, int64_t gu_group,
               const at::Tensor& down_q, const at::Tensor& down_s, const std::optional<at::Tensor>& down_z,
               int64_t down_group, bool gelu) {
  TORCH_CHECK(x_ND.dim() == 2 && x_ND.scalar_type() == at::kFloat && x_ND.is_contiguous(),
              "x must be contiguous fp32 (N, D)");
  TORCH_CHECK(ids_A.scalar_type() == at::kLong && ids_A.is_contiguous() && weights_A.scalar_type() == at::kFloat &&
                  weights_A.is_contiguous() && weights_A.numel() == ids_A.numel(),
              "expert ids must be int64 and weights fp32, one each per assignment");
  const int64_t N = x_ND.size(0), D = x_ND.size(1), A = ids_A.numel(), E = gu_q.size(0);
  TORCH_CHECK(N > 0 ? A % N == 0 : A == 0, "assignments must be K per token");
  const int64_t* ids = ids_A.const_data_ptr<int64_t>();
  const float* wa = weights_A.const_data_ptr<float>();
  std::vector<int64_t> off(E + 1, 0), row_A(A, -1);
  for (int64_t i = 0; i < A; ++i)
    if (ids[i] >= 0 && ids[i] < E) ++off[ids[i] + 1];
  for (int64_t e = 0; e < E; ++e) off[e + 1] += off[e];
  std::vector<int64_t> next(off.begin(), off.end() - 1);
  const int64_t R = off[E];
  at::Tensor x_RD = at::empty({R, D}, x_ND.options());
  const float* x = x_ND.const_data_ptr<float>();
  float* xr = x_RD.data_ptr<float>();
  for (int64_t i = 0; i < A; ++i)
    if (ids[i] >= 0 && ids[i] < E) {
      row_A[i] = next[ids[i]]++;
      std::copy(x + (i / (A / N)) * D, x + (i / (A / N) + 1) * D, xr + row_A[i] * D);
    }
  at::Tensor y_RD = at::empty({R, down_q.size(1)}, x_ND.options());
  ffn(x_RD, off, {gu_q, gu_s, gu_z, gu_group, down_q, down_s, down_z, down_group, gelu}, y_RD);
  const int64_t O = y_RD.size(1);
  at::Tensor y_ND = at::zeros({N, O}, x_ND.options());
  const float* yr = y_RD.const_data_ptr<float>();
  float* y = y_ND.data_ptr<float>();
  for (int64_t i = 0; i < A; ++i)
    if (row_A[i] >= 0)
      for (int64_t j = 0; j < O; ++j) y[(i / (A / N)) * O + j] += wa[i] * yr[row_A[i] * O + j];
  return y_ND;
}

}  // namespace

// Schemas here, CPU kernels below: cpp_quant.py registers the shapes (fake kernels) that torch.compile traces with.
TORCH_LIBRARY(smoe_quant, m) {
  m.def("linear(Tensor x, Tensor q, Tensor scale, Tensor? offset, int group) -> Tensor");
  m.def("experts(Tensor x, Tensor offs, Tensor gu_q, Tensor gu_s, Tensor? gu_z, int gu_group, Tensor down_q, "
        "Tensor down_s, Tensor? down_z, int down_group, bool gelu) -> Tensor");
  m.def("moe(Tensor x, Tensor ids, Tensor weights, Tensor gu_q, Tensor gu_s, Tensor? gu_z, int gu_group, "
        "Tensor down_q, Tensor down_s, Tensor? down_z, int down_group, bool gelu) -> Tensor");
}

TORCH_LIBRARY_IMPL(smoe_quant, CPU, m) {
  m.impl("linear", &linear);
  m.impl("experts", &experts);
  m.impl("moe", &moe);
}
