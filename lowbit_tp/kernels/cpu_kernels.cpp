// CPU kernels for the lowbit-tp codecs: one pass over the input per encode, one pass over
// the N payloads per decode-and-sum. Plain C ABI (loaded with ctypes, no torch headers).
//
// Every kernel reproduces the eager PyTorch reference in lowbit_tp/codecs/ bit for bit:
// the same fp32 operations in the same order (multiply by a reciprocal where the reference
// multiplies, IEEE division where it divides), round half to even, clamp, then the
// non-finite sentinel; bf16 and fp16 conversions round to nearest even exactly as torch's;
// decode-and-sum adds the decoded payloads in rank order in fp32. Build flags must keep
// -ffp-contract=off (no fused multiply-add) and must not use -ffast-math.
//
// Input dtypes: 0 = fp32, 1 = bf16, 2 = fp16. Rows have stride `ld` elements, inner stride 1.
// Return value of encoders: 1 if the input held a NaN/Inf (all of it is scanned), else 0.
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif
// LBT_AVX2: hand-written 8-wide paths (AVX2 + F16C); every one has a scalar twin below it
// that a portable build (LOWBIT_TP_CPU_PORTABLE=1) uses and the tests compare.
#if defined(__AVX2__) && defined(__F16C__) && !defined(LBT_PORTABLE)
#define LBT_AVX2 1
#endif
// LBT_AVX512: AVX-512 F/VL/DQ on top (the division-free level search); LOWBIT_TP_CPU_NO_AVX512=1
// builds without it, so that the AVX2 paths are tested on an AVX-512 machine too.
#if defined(LBT_AVX2) && defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define LBT_AVX512 1
#endif

// Profiling only (scripts/cpu_kernel_profile.py): LBT_SKIP is a bit mask of rot-* phases to
// leave out (wrong results, same memory traffic), to see what bounds the kernels. 0 normally.
#ifndef LBT_SKIP
#define LBT_SKIP 0
#endif
// LBT_TWO_PASS=1: the two-pass Hadamard even where AVX-512 could keep a block in registers
// (the profile script compares both).
#ifndef LBT_TWO_PASS
#define LBT_TWO_PASS 0
#endif
// LBT_ZMM_SEARCH=1 (default): the division-free level search 16 values at a time in 512-bit
// registers (measured ~7% faster encode than 8 at a time on Zen 4); 0: 8 at a time.
// LBT_ZMM_GRID=0: the 5/6-bit integer-grid fast path 8 values at a time only.
#ifndef LBT_ZMM_GRID
#define LBT_ZMM_GRID 1
#endif
// LBT_CELLS=0: the 4-bit-or-less level search without its cell shortcut (ThresholdSearch).
#ifndef LBT_CELLS
#define LBT_CELLS 1
#endif
#ifndef LBT_ZMM_SEARCH
#define LBT_ZMM_SEARCH 1
#endif

namespace {

inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline bool finite_bits(uint32_t u) { return (u & 0x7f800000u) != 0x7f800000u; }
constexpr float QNAN = __builtin_nanf("");  // 0x7fc00000, what torch writes for float("nan")

inline float bf16_to_f32(uint16_t h) { return float_of(uint32_t(h) << 16); }
// torch's CPU conversion: round to nearest even; every NaN becomes 0xffff.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = bits_of(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffff;
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#ifdef __F16C__
inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }
inline uint16_t f32_to_f16(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
#else
inline float f16_to_f32(uint16_t h) {
  uint32_t s = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ffu;
  if (e == 0x1f) return float_of(s | 0x7f800000u | (m << 13));
  if (e == 0) return float_of(s) + (s ? -1.0f : 1.0f) * float(m) * 5.9604644775390625e-08f;
  return float_of(s | ((e + 112) << 23) | (m << 13));
}
inline uint16_t f32_to_f16(float f) {  // round to nearest even, NaN quieted with its top payload bits
  uint32_t u = bits_of(f), s = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(s | 0x7e00u | ((a >> 13) & 0x3ffu));
  if (a >= 0x477ff000u) return uint16_t(s | 0x7c00u);  // rounds to >= 65520: Inf
  if (a < 0x38800000u) {                                // fp16 subnormal or zero
    float r = float_of(a) * 16777216.0f;                // exact: scales to units of 2**-24
    return uint16_t(s | uint32_t(std::nearbyint(r)));
  }
  uint32_t mant_odd = (a >> 13) & 1u;
  a += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round
  return uint16_t(s | (a >> 13));
}
#endif

template <int DT> inline float load(const void* p, int64_t i);
template <> inline float load<0>(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
template <> inline float load<1>(const void* p, int64_t i) { return bf16_to_f32(static_cast<const uint16_t*>(p)[i]); }
template <> inline float load<2>(const void* p, int64_t i) { return f16_to_f32(static_cast<const uint16_t*>(p)[i]); }

template <int DT> inline int64_t elem_size() { return DT == 0 ? 4 : 2; }

#ifdef LBT_AVX2
// 8 values from element i as fp32 (bf16 widened, fp16 through F16C: both exact).
template <int DT> inline __m256 load8(const void* p, int64_t i) {
  if (DT == 0) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
  if (DT == 1) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}
inline int32_t hmax_epi32(__m256i v) {
  __m128i m = _mm_max_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4e));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xb1));
  return _mm_cvtsi128_si32(m);
}
#endif

// The reference's bf16 cast of the input: a no-op (raw bits kept) when it is bf16 already;
// torch's direct fp16 -> bf16 cast writes NaN as 0x7fc0 (its fp32 -> bf16 cast as 0xffff).
template <int DT> inline uint16_t to_bf16(const void* p, int64_t i) {
  if (DT == 1) return static_cast<const uint16_t*>(p)[i];
  const float v = load<DT>(p, i);
  if (DT == 2 && v != v) return 0x7fc0;
  return f32_to_bf16(v);
}

inline void put_u16(uint8_t* dst, uint16_t v) { std::memcpy(dst, &v, 2); }
inline uint16_t get_u16(const uint8_t* src) { uint16_t v; std::memcpy(&v, src, 2); return v; }

// Codes c[0..m) of one row go to the flat nibble stream at index `f` (value 2i in the low
// nibble of byte i). A row starting at an odd index completes the byte its predecessor
// started; a row ending on a low nibble leaves the high nibble 0 (the pad, or the next row
// fills it).
inline void pack_nibbles(const int8_t* c, int64_t m, int64_t f, uint8_t* body) {
  int64_t j = 0;
  if (m == 0) return;
  if (f & 1) {
    uint8_t* b = body + (f >> 1);
    *b = uint8_t((*b & 0x0f) | ((c[0] & 0x0f) << 4));
    j = 1;
  }
  uint8_t* dst = body + ((f + j) >> 1);
  const int64_t pairs = (m - j) / 2;
  int64_t i = 0;
#ifdef LBT_AVX2
  const __m256i m4 = _mm256_set1_epi8(0x0f), m8 = _mm256_set1_epi16(0x00ff);
  for (; i + 16 <= pairs; i += 16) {  // 32 codes -> 16 bytes: byte = lo | hi << 4
    const __m256i v = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + j + 2 * i)), m4);
    const __m256i w = _mm256_and_si256(_mm256_or_si256(v, _mm256_srli_epi16(v, 4)), m8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
  }
#endif
  for (; i < pairs; ++i)
    dst[i] = uint8_t((c[j + 2 * i] & 0x0f) | ((c[j + 2 * i + 1] & 0x0f) << 4));
  j += 2 * pairs;
  if (j < m) dst[pairs] = uint8_t(c[j] & 0x0f);
}

inline float int4_value(int32_t code) { return code == -8 ? QNAN : float(code); }

// Quantize n values: round(x * factor) or round(x / factor) half to even, clamp to [-qmax, qmax],
// non-finite x to the sentinel. Returns whether any x was non-finite; *amax_bits becomes the
// largest |x| among the finite ones (as its bit pattern: non-negative floats order as ints),
// which is how the callers check the input range without a second pass.
template <int DT, bool DIVIDE>
inline uint32_t quantize_run(const void* row, const float* factor, int64_t n, float qmax, int32_t sentinel,
                             int8_t* q, int32_t* amax_bits) {
  uint32_t nf = 0;
  int32_t am = *amax_bits;
  int64_t i = 0;
#ifdef LBT_AVX2
  {
    const __m256 hi = _mm256_set1_ps(qmax), lo = _mm256_set1_ps(-qmax);
    const __m256i absm = _mm256_set1_epi32(0x7fffffff), fin = _mm256_set1_epi32(0x7f7fffff);
    const __m256i sent = _mm256_set1_epi32(sentinel), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i vam = _mm256_setzero_si256(), vnf = _mm256_setzero_si256();
    for (; i + 32 <= n; i += 32) {
      __m256i c[4];
      for (int u = 0; u < 4; ++u) {
        const __m256 v = load8<DT>(row, i + 8 * u);
        const __m256i a = _mm256_and_si256(_mm256_castps_si256(v), absm);
        const __m256i bad = _mm256_cmpgt_epi32(a, fin);
        vnf = _mm256_or_si256(vnf, bad);
        vam = _mm256_max_epi32(vam, _mm256_andnot_si256(bad, a));
        const __m256 f = _mm256_loadu_ps(factor + i + 8 * u);
        __m256 y = _mm256_round_ps(DIVIDE ? _mm256_div_ps(v, f) : _mm256_mul_ps(v, f),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        y = _mm256_min_ps(_mm256_max_ps(y, lo), hi);  // NaN only where x is non-finite: replaced below
        c[u] = _mm256_blendv_epi8(_mm256_cvtps_epi32(y), sent, bad);
      }
      // int32 -> int8 (values fit, no saturation); the packs interleave 128-bit lanes: reorder.
      const __m256i b8 = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(b8, order));
    }
    const int32_t vm = hmax_epi32(vam);
    am = am > vm ? am : vm;
    nf |= !_mm256_testz_si256(vnf, vnf);
  }
#endif
  for (; i < n; ++i) {
    const float v = load<DT>(row, i);
    float y = __builtin_rintf(DIVIDE ? v / factor[i] : v * factor[i]);
    y = y < -qmax ? -qmax : y;
    y = y > qmax ? qmax : y;
    const int32_t a = int32_t(bits_of(v) & 0x7fffffffu);
    const int32_t bad = a >= 0x7f800000;
    nf |= bad;
    am = (!bad && a > am) ? a : am;
    y = bad ? 0.0f : y;
    q[i] = int8_t(bad ? sentinel : int32_t(y));
  }
  *amax_bits = am;
  return nf;
}

// o[i] = (or +=) code(f + i) * sc[i] for i < n: int4 codes from the flat nibble stream at
// index f (the sentinel -8 decodes to NaN). FIRST writes, otherwise adds to o in place.
template <bool FIRST>
inline void int4_run(const uint8_t* body, int64_t f, int64_t n, const float* sc, float* o) {
  int64_t i = 0;
  auto scalar = [&](int64_t i) {
    const uint8_t b = body[(f + i) >> 1];
    const int32_t code = ((f + i) & 1) ? int8_t(b) >> 4 : int8_t(uint8_t(b << 4)) >> 4;
    const float v = int4_value(code) * sc[i];
    o[i] = FIRST ? v : o[i] + v;
  };
  if (n > 0 && (f & 1)) scalar(i++);
#ifdef LBT_AVX2
  const uint8_t* src = body + ((f + i) >> 1);  // low nibble = code i
  const __m128i m4 = _mm_set1_epi8(0x0f), s8 = _mm_set1_epi8(8);
  const __m256 nan = _mm256_set1_ps(QNAN);
  const __m256i sent = _mm256_set1_epi32(-8);
  for (; i + 32 <= n; i += 32, src += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m128i lo = _mm_and_si128(b, m4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
    __m128i x[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};
    for (int h = 0; h < 2; ++h) {
      x[h] = _mm_sub_epi8(_mm_xor_si128(x[h], s8), s8);  // sign-extend the 4-bit codes
      for (int u = 0; u < 2; ++u) {
        const __m256i qi = _mm256_cvtepi8_epi32(u ? _mm_srli_si128(x[h], 8) : x[h]);
        const __m256 isnan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(qi, sent));
        const int64_t at = i + 16 * h + 8 * u;
        __m256 v = _mm256_mul_ps(_mm256_blendv_ps(_mm256_cvtepi32_ps(qi), nan, isnan), _mm256_loadu_ps(sc + at));
        if (!FIRST) v = _mm256_add_ps(_mm256_loadu_ps(o + at), v);
        _mm256_storeu_ps(o + at, v);
      }
    }
  }
  for (; i + 8 <= n; i += 8, src += 4) {  // short runs (between kept channels): 8 at a time
    int32_t four;
    std::memcpy(&four, src, 4);
    const __m128i b = _mm_cvtsi32_si128(four);
    const __m128i lo = _mm_and_si128(b, m4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
    const __m256i qi = _mm256_cvtepi8_epi32(_mm_sub_epi8(_mm_xor_si128(_mm_unpacklo_epi8(lo, hi), s8), s8));
    const __m256 isnan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(qi, sent));
    __m256 v = _mm256_mul_ps(_mm256_blendv_ps(_mm256_cvtepi32_ps(qi), nan, isnan), _mm256_loadu_ps(sc + i));
    if (!FIRST) v = _mm256_add_ps(_mm256_loadu_ps(o + i), v);
    _mm256_storeu_ps(o + i, v);
  }
#endif
  for (; i < n; ++i) scalar(i);
}

// The same for int8 codes (sentinel -128).
template <bool FIRST>
inline void int8_run(const int8_t* q, int64_t n, const float* sc, float* o) {
  int64_t i = 0;
#ifdef LBT_AVX2
  const __m256 nan = _mm256_set1_ps(QNAN);
  const __m256i sent = _mm256_set1_epi32(-128);
  for (; i + 8 <= n; i += 8) {
    const __m256i qi = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i)));
    const __m256 isnan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(qi, sent));
    __m256 v = _mm256_mul_ps(_mm256_blendv_ps(_mm256_cvtepi32_ps(qi), nan, isnan), _mm256_loadu_ps(sc + i));
    if (!FIRST) v = _mm256_add_ps(_mm256_loadu_ps(o + i), v);
    _mm256_storeu_ps(o + i, v);
  }
#endif
  for (; i < n; ++i) {
    const float v = (q[i] == -128 ? QNAN : float(q[i])) * sc[i];
    o[i] = FIRST ? v : o[i] + v;
  }
}

// Inverse: m sign-extended int4 codes as floats (the sentinel -8 as NaN) from index f.
inline void unpack_nibbles(const uint8_t* body, int64_t f, int64_t m, float* v) {
  int64_t j = 0;
  if (m == 0) return;
  if (f & 1) {
    v[0] = int4_value(int8_t(body[f >> 1]) >> 4);
    j = 1;
  }
  const uint8_t* src = body + ((f + j) >> 1);
  float* dst = v + j;
  const int64_t pairs = (m - j) / 2;
  for (int64_t i = 0; i < pairs; ++i) {
    const uint8_t b = src[i];
    const int32_t lo = int8_t(uint8_t(b << 4)) >> 4, hi = int8_t(b) >> 4;
    const float fl = float(lo), fh = float(hi);
    dst[2 * i] = lo == -8 ? QNAN : fl;
    dst[2 * i + 1] = hi == -8 ? QNAN : fh;
  }
  j += 2 * pairs;
  if (j < m) v[j] = int4_value(int8_t(uint8_t(src[pairs] << 4)) >> 4);
}

// Runs of consecutive inlier channels: channel c0..c1-1 holds inlier index j0.. (ascending
// outliers given).
struct Run { int64_t c0, c1, j0; };

std::vector<Run> inlier_runs(int64_t e, const int64_t* outl, int64_t k) {
  std::vector<Run> runs;
  int64_t c = 0, j = 0;
  for (int64_t i = 0; i <= k; ++i) {
    const int64_t stop = i < k ? outl[i] : e;
    if (stop > c) { runs.push_back({c, stop, j}); j += stop - c; }
    c = stop + 1;
  }
  return runs;
}

// Decoded sums go to an output of dtype 0 = fp32, 1 = bf16 or 2 = fp16. Each row is summed in
// an fp32 scratch row (it stays in L1 across the N ranks) and written out once when finished:
// fp32 as is, bf16/fp16 rounded once, which is bitwise `sum.to(dtype)` (round to nearest even;
// a NaN as torch writes it: 0xffff in bf16, F16C's quieted NaN in fp16). A large output
// (>= kStreamBytes) is written with non-temporal stores: it would not stay in cache anyway,
// and they skip reading every output line before writing it (what made decode-and-sum slower
// than a copy). Small outputs (decode steps) stay in cache for the next layer.
constexpr int64_t kStreamBytes = int64_t(4) << 20;

struct SumOut {
  void* base;
  int dt;
  int64_t e;
  bool stream;
  std::vector<float> scratch;
  // Error feedback (the *_decode_error entry points): each row is written as minus - sum, fp32,
  // +0.0 where not finite (feedback_of's arithmetic), instead of the sum itself.
  const float* minus = nullptr;
  SumOut(void* out, int dtype, int64_t width, int64_t rows)
      : base(out), dt(dtype), e(width), stream(rows * width * (dtype ? 2 : 4) >= kStreamBytes), scratch(width) {}
  SumOut(float* out, const float* sent, int64_t width)
      : base(out), dt(0), e(width), stream(false), scratch(width), minus(sent) {}
#ifdef LBT_AVX2
  ~SumOut() { if (stream) _mm_sfence(); }  // order the non-temporal stores before returning
#endif
  float* row(int64_t) { return scratch.data(); }
  void finish(int64_t t) {
    const float* a = scratch.data();
    int64_t c = 0;
    if (minus) {
      float* o = static_cast<float*>(base) + t * e;
      const float* m = minus + t * e;
      for (; c < e; ++c) {
        const float r = m[c] - a[c];
        o[c] = finite_bits(bits_of(r)) ? r : 0.0f;
      }
      return;
    }
    if (dt == 0) {
      float* o = static_cast<float*>(base) + t * e;
#ifdef LBT_AVX2
      if (stream) {
        for (; c < e && (reinterpret_cast<uintptr_t>(o + c) & 31); ++c) o[c] = a[c];
        for (; c + 8 <= e; c += 8) _mm256_stream_ps(o + c, _mm256_loadu_ps(a + c));
      }
#endif
      for (; c < e; ++c) o[c] = a[c];
      return;
    }
    uint16_t* o = static_cast<uint16_t*>(base) + t * e;
#ifdef LBT_AVX2
    if (stream)
      for (; c < e && (reinterpret_cast<uintptr_t>(o + c) & 31); ++c) o[c] = dt == 1 ? f32_to_bf16(a[c]) : f32_to_f16(a[c]);
    auto put16 = [&](int64_t at, __m256i v) {  // 16 halves
      if (stream && !(reinterpret_cast<uintptr_t>(o + at) & 31)) _mm256_stream_si256(reinterpret_cast<__m256i*>(o + at), v);
      else _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + at), v);
    };
    if (dt == 1) {
      const __m256i absm = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
      const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
      for (; c + 16 <= e; c += 16) {
        __m256i w[2];
        for (int h = 0; h < 2; ++h) {
          const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(a + c + 8 * h));
          const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, absm), inf);
          const __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, bias), _mm256_and_si256(_mm256_srli_epi32(u, 16), one));
          w[h] = _mm256_or_si256(_mm256_srli_epi32(r, 16), _mm256_srli_epi32(nan, 16));  // NaN: 0xffff
        }
        put16(c, _mm256_permute4x64_epi64(_mm256_packus_epi32(w[0], w[1]), 0xd8));
      }
    } else {
      for (; c + 16 <= e; c += 16)
        put16(c, _mm256_set_m128i(_mm256_cvtps_ph(_mm256_loadu_ps(a + c + 8), _MM_FROUND_TO_NEAREST_INT),
                                  _mm256_cvtps_ph(_mm256_loadu_ps(a + c), _MM_FROUND_TO_NEAREST_INT)));
    }
#endif
    for (; c < e; ++c) o[c] = dt == 1 ? f32_to_bf16(a[c]) : f32_to_f16(a[c]);
  }
};

// ------------------------------------------------------------------- static int codecs
// int8 / int4 / int4-outlier / int4-random-k: [ T*k bf16 | codes of the T*(E-k) inliers ].
// Rows are quantized at full width with a per-channel factor (0 on kept channels), then the
// kept channels' codes are squeezed out: long vector loops instead of short runs.

// inv (or scale) of the inliers spread over all E channels, `fill` on the kept ones.
std::vector<float> spread(const float* vals, int64_t e, const std::vector<Run>& runs, float fill) {
  std::vector<float> full(e, fill);
  for (const Run& r : runs) std::memcpy(full.data() + r.c0, vals + r.j0, 4 * (r.c1 - r.c0));
  return full;
}

// One row of a static payload: the codes of row t (`full`: the row's E codes, kept channels
// coded 0), its kept channels as bf16 in the head, the inliers' codes packed in the body.
// Returns quantize_run's non-finite mask.
struct StaticRows {
  int64_t e, k, m, t_rows;
  int bits;
  float qmax;
  int32_t sentinel;
  const int64_t* outl;
  std::vector<Run> runs;
  std::vector<float> inv;
  std::vector<int8_t> full, codes;
  uint8_t *head, *body;
  StaticRows(int64_t width, const int64_t* outliers, int64_t kept, const float* inv_scale, int nbits, int64_t rows,
             uint8_t* out)
      : e(width), k(kept), m(width - kept), t_rows(rows), bits(nbits), qmax(float((1 << (nbits - 1)) - 1)),
        sentinel(-(1 << (nbits - 1))), outl(outliers), runs(inlier_runs(width, outliers, kept)),
        inv(spread(inv_scale, width, runs, 0.0f)), full(width), codes(width - kept), head(out),
        body(out + 2 * rows * kept) {}
  template <int DT>
  uint32_t row(const void* x, int64_t t, int32_t* amax) {
    const uint32_t bad = quantize_run<DT, false>(x, inv.data(), e, qmax, sentinel, full.data(), amax);
    // The kept channels after the streaming pass (the row is in cache now: gathering them
    // first would stall on a cache miss per channel).
    for (int64_t i = 0; i < k; ++i) put_u16(head + 2 * (t * k + i), to_bf16<DT>(x, outl[i]));
    const int8_t* q = full.data();
    if (k) {
      for (const Run& r : runs) std::memcpy(codes.data() + r.j0, full.data() + r.c0, r.c1 - r.c0);
      q = codes.data();
    }
    if (bits == 4) pack_nibbles(q, m, t * m, body);
    else std::memcpy(body + t * m, q, m);
    return bad;
  }
};

template <int DT>
int static_encode(const void* x, int64_t t_rows, int64_t e, int64_t ld, const int64_t* outl, int64_t k,
                  const float* inv_scale, int bits, uint8_t* out, float* amax_out) {
  StaticRows enc(e, outl, k, inv_scale, bits, t_rows, out);
  uint32_t bad = 0;
  int32_t amax = 0;
  for (int64_t t = 0; t < t_rows; ++t)
    bad |= enc.row<DT>(static_cast<const char*>(x) + t * ld * elem_size<DT>(), t, &amax);
  *amax_out = float_of(uint32_t(amax));
  return bad ? 1 : 0;
}

// Error feedback fused into the encoder: the payload of encode(x + carry) (x's values widened to
// fp32; no carry: x itself, which must then be fp32) and next = sent - decode(payload) in fp32,
// +0.0 where not finite, one row at a time while the row is in cache. The codes are those of
// static_encode<0> on the sent row; the decode is int4_run/int8_run's code * scale (sentinel:
// NaN) and the kept channels' bf16. Returns static_encode's "bad" (the caller then takes the
// general path, so a NaN/Inf or out-of-range row's next is never used).
template <int DT>
int static_encode_feedback(const void* x, const float* carry, int64_t t_rows, int64_t e, int64_t ld,
                           const int64_t* outl, int64_t k, const float* inv_scale, const float* scale, int bits,
                           uint8_t* out, float* next, float* amax_out) {
  StaticRows enc(e, outl, k, inv_scale, bits, t_rows, out);
  const std::vector<float> sc = spread(scale, e, enc.runs, 0.0f);
  std::vector<float> sent(e);
  uint32_t bad = 0;
  int32_t amax = 0;
  for (int64_t t = 0; t < t_rows; ++t) {
    const char* row = static_cast<const char*>(x) + t * ld * elem_size<DT>();
    const float* cy = carry ? carry + t * e : nullptr;
    float* s = sent.data();
    if (cy) for (int64_t c = 0; c < e; ++c) s[c] = load<DT>(row, c) + cy[c];
    else for (int64_t c = 0; c < e; ++c) s[c] = load<DT>(row, c);
    bad |= enc.row<0>(s, t, &amax);
    float* nx = next + t * e;
    const int8_t* f = enc.full.data();
    const float* scp = sc.data();
    for (int64_t c = 0; c < e; ++c) {  // kept channels: code 0 * 0 here, rewritten below
      const float d = (int32_t(f[c]) == enc.sentinel ? QNAN : float(f[c])) * scp[c];
      const float r = s[c] - d;
      nx[c] = finite_bits(bits_of(r)) ? r : 0.0f;
    }
    for (int64_t i = 0; i < k; ++i) {
      const int64_t c = outl[i];
      const float r = s[c] - bf16_to_f32(get_u16(enc.head + 2 * (t * k + i)));
      nx[c] = finite_bits(bits_of(r)) ? r : 0.0f;
    }
  }
  *amax_out = float_of(uint32_t(amax));
  return bad ? 1 : 0;
}

// out = sum_r decode(payload_r) in rank order (acc = d0; acc += d1; ...), one row at a time
// so each output row is written once: each run of inlier channels decodes straight from the
// payload into the output row (the scales of a run are contiguous), then the kept channels.
void static_decode_sum(const uint8_t* const* payloads, const float* const* scales, int n, int64_t t_rows,
                       int64_t e, const int64_t* const* outls, int64_t k, int bits, SumOut& out) {
  const int64_t m = e - k;
  std::vector<std::vector<Run>> runs(n);
  for (int r = 0; r < n; ++r) runs[r] = inlier_runs(e, outls[r], k);
  for (int64_t t = 0; t < t_rows; ++t) {
    float* orow = out.row(t);
    for (int r = 0; r < n; ++r) {
      const uint8_t* head = payloads[r];
      const uint8_t* body = payloads[r] + 2 * t_rows * k;
      for (const Run& rr : runs[r]) {
        const int64_t cnt = rr.c1 - rr.c0;
        const float* sc = scales[r] + rr.j0;
        float* o = orow + rr.c0;
        if (bits == 4) {
          if (r == 0) int4_run<true>(body, t * m + rr.j0, cnt, sc, o);
          else int4_run<false>(body, t * m + rr.j0, cnt, sc, o);
        } else {
          const int8_t* q = reinterpret_cast<const int8_t*>(body + t * m + rr.j0);
          if (r == 0) int8_run<true>(q, cnt, sc, o);
          else int8_run<false>(q, cnt, sc, o);
        }
      }
      for (int64_t i = 0; i < k; ++i) {  // rank 0: raw bits, as index_copy_; then value * 1 added
        const int64_t c = outls[r][i];
        const float v = bf16_to_f32(get_u16(head + 2 * (t * k + i)));
        orow[c] = r == 0 ? v : orow[c] + v * 1.0f;
      }
    }
    out.finish(t);
  }
}

// ------------------------------------------------------------------- int4 with group scales
// int4-g32 / int4-g128: [ ceil(T*E/2) int4 | T*G fp16 scales ], scale = fp16(absmax / 7).
template <int DT>
int group_encode(const void* x, int64_t t_rows, int64_t e, int64_t ld, int64_t group, uint8_t* out,
                 float* amax_out) {
  const int64_t g_count = (e + group - 1) / group;
  uint8_t* body = out;
  uint8_t* sbytes = out + (t_rows * e + 1) / 2;
  std::vector<int8_t> codes(e);
  std::vector<float> buf(DT == 0 ? 0 : e), div(e);
  uint32_t bad = 0;
  int32_t amax = 0;
  for (int64_t t = 0; t < t_rows; ++t) {
    const char* row = static_cast<const char*>(x) + t * ld * elem_size<DT>();
    const float* xf = reinterpret_cast<const float*>(row);
    if (DT != 0) {
      for (int64_t c = 0; c < e; ++c) buf[c] = load<DT>(row, c);
      xf = buf.data();
    }
    for (int64_t g = 0; g < g_count; ++g) {
      const int64_t c0 = g * group, n = (c0 + group <= e ? group : e - c0);
      // Non-negative floats order as their bit patterns: an integer max (signed, which gcc
      // vectorizes), non-finite values skipped.
      const int32_t* xb = reinterpret_cast<const int32_t*>(xf + c0);
      int32_t amax_bits = 0;
      for (int64_t i = 0; i < n; ++i) {
        int32_t u = xb[i] & 0x7fffffff;
        u = u >= 0x7f800000 ? 0 : u;
        amax_bits = amax_bits > u ? amax_bits : u;
      }
      float s = float_of(uint32_t(amax_bits)) / 7.0f;
      s = s > 65504.0f ? 65504.0f : s;
      const uint16_t h = f32_to_f16(s);
      put_u16(sbytes + 2 * (t * g_count + g), h);
      const float s32 = (h & 0x7fffu) == 0 ? 1.0f : f16_to_f32(h);
      for (int64_t i = 0; i < n; ++i) div[c0 + i] = s32;
    }
    bad |= quantize_run<0, true>(xf, div.data(), e, 7.0f, -8, codes.data(), &amax);
    pack_nibbles(codes.data(), e, t * e, body);
  }
  *amax_out = float_of(uint32_t(amax));
  return bad ? 1 : 0;
}

// Row by row, rank by rank (each output row written once): the group scales spread over the
// row, then one decode run.
void group_decode_sum(const uint8_t* const* payloads, int n, int64_t t_rows, int64_t e, int64_t group, SumOut& out) {
  const int64_t g_count = (e + group - 1) / group;
  std::vector<float> sfull(e);
  for (int64_t t = 0; t < t_rows; ++t) {
    float* orow = out.row(t);
    for (int r = 0; r < n; ++r) {
      const uint8_t* body = payloads[r];
      const uint8_t* sbytes = payloads[r] + (t_rows * e + 1) / 2 + 2 * t * g_count;
      for (int64_t g = 0; g < g_count; ++g) {
        const int64_t c0 = g * group, cnt = (c0 + group <= e ? group : e - c0);
        const float s = f16_to_f32(get_u16(sbytes + 2 * g));
        for (int64_t i = 0; i < cnt; ++i) sfull[c0 + i] = s;
      }
      if (r == 0) int4_run<true>(body, t * e, e, sfull.data(), orow);
      else int4_run<false>(body, t * e, e, sfull.data(), orow);
    }
    out.finish(t);
  }
}


// ------------------------------------------------------------------- rotated group codecs
// rot-*: [ T*k bf16 | codes of the T*E rotated values | scales ]. Codes are int4 nibbles
// (bits 4), bytes (bits 8) or bit-planes (plane j = bit j of every code, 8 codes per byte,
// LSB first, each plane ceil(T*E/8) bytes). Scales: fp16 per group; E8M0 byte per group; or
// lg8 = T*G log-step codes then T bf16 bases. Tables (levels, bounds, lg8 steps, exp2) come
// from the Python side, computed by torch, so every constant is the reference's own.
struct RotSpec {
  int64_t e, k, group, block, bits, fmt;  // fmt: 0 fp16, 1 e8m0, 2 lg8
  float inv_sqrt_block;
  const float* signs;    // [E]
  const float* levels;   // [2**bits]
  const float* bounds;   // [2**bits - 1], ascending
  const float* lg8;      // [256]: 2**(-q/16)
  const float* exp2tab;  // [256]: 2**(b - 127)
};

inline int64_t rot_groups(const RotSpec& s) { return (s.e + s.group - 1) / s.group; }
inline int64_t rot_code_bytes(const RotSpec& s, int64_t n) {
  if (s.bits == 8) return n;
  if (s.bits == 4) return (n + 1) / 2;
  return ((n + 7) / 8) * s.bits;
}

// The reference's fwht: butterflies (a + b, a - b) at strides 1, 2, 4, ... within blocks of
// `block`, then one multiply by fp32 1/sqrt(block).
// One butterfly stage at a compile-time stride H over n values (n a multiple of 2H): the
// constant stride lets the compiler vectorize the short strides with permutes.
template <int H>
inline void fwht_stage(float* v, int64_t n) {
  for (int64_t p = 0; p < n; p += 2 * H)
    for (int j = 0; j < H; ++j) {
      const float a = v[p + j], b = v[p + j + H];
      v[p + j] = a + b;
      v[p + j + H] = a - b;
    }
}

inline void fwht_row(float* y, int64_t e, int64_t block, float inv_sqrt) {
  // Stages in the reference's order (stride 1, 2, 4, ...). A stage never crosses a block
  // boundary, so it can run over the whole row at once.
  if (block >= 2) fwht_stage<1>(y, e);
  if (block >= 4) fwht_stage<2>(y, e);
  if (block >= 8) fwht_stage<4>(y, e);
  if (block >= 16) fwht_stage<8>(y, e);
  for (int64_t h = 16; h < block; h *= 2)
    for (int64_t i = 0; i < e; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const float a = y[j], b = y[j + h];
        y[j] = a + b;
        y[j + h] = a - b;
      }
  for (int64_t c = 0; c < e; ++c) y[c] = y[c] * inv_sqrt;
}

#ifdef LBT_AVX2
// Stages 1, 2, 4 of the butterfly inside one 8-lane vector; a lane computes a + b or a - b
// with the reference's operands: the lower lane of a pair b + a (fp add commutes bitwise),
// the upper one a + (-b), which IEEE defines as a - b (signed zeros included); -b is a sign
// flip (xor), so one add per stage instead of an add, a sub and a blend.
//
// With FMA, each stage is one permute and one fma(v, +-1, partner): the product v * (+-1) is
// exact (a sign flip), so the single rounding of the sum gives fl(partner + v) or
// fl(partner - v), the same bits as the add (and one operation fewer than the xor).
inline __m256 fwht8(__m256 v) {
#ifdef __FMA__
  const __m256 s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
  const __m256 s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
  const __m256 s4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
  v = _mm256_fmadd_ps(v, s1, _mm256_permute_ps(v, 0xb1));
  v = _mm256_fmadd_ps(v, s2, _mm256_permute_ps(v, 0x4e));
  return _mm256_fmadd_ps(v, s4, _mm256_permute2f128_ps(v, v, 1));
#else
  const __m256 n1 = _mm256_castsi256_ps(_mm256_setr_epi32(0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN));
  const __m256 n2 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, INT32_MIN, INT32_MIN, 0, 0, INT32_MIN, INT32_MIN));
  const __m256 n4 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, 0, 0, INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN));
  v = _mm256_add_ps(_mm256_permute_ps(v, 0xb1), _mm256_xor_ps(v, n1));  // partner [1 0 3 2 ...]
  v = _mm256_add_ps(_mm256_permute_ps(v, 0x4e), _mm256_xor_ps(v, n2));  // partner [2 3 0 1 ...]
  return _mm256_add_ps(_mm256_permute2f128_ps(v, v, 1), _mm256_xor_ps(v, n4));  // halves swapped
#endif
}

// fwht_row for rows of whole vectors and blocks of >= 8 (every model width); false: not handled.
inline bool fwht_row_avx2(float* y, int64_t e, int64_t block, float inv_sqrt) {
  if (block < 8 || e % 8) return false;
  for (int64_t c = 0; c < e; c += 8) _mm256_storeu_ps(y + c, fwht8(_mm256_loadu_ps(y + c)));
  for (int64_t h = 8; h < block; h *= 2)
    for (int64_t p = 0; p < e; p += 2 * h)
      for (int64_t j = p; j < p + h; j += 8) {
        const __m256 a = _mm256_loadu_ps(y + j), b = _mm256_loadu_ps(y + j + h);
        _mm256_storeu_ps(y + j, _mm256_add_ps(a, b));
        _mm256_storeu_ps(y + j + h, _mm256_sub_ps(a, b));
      }
  const __m256 s = _mm256_set1_ps(inv_sqrt);
  for (int64_t c = 0; c < e; c += 8) _mm256_storeu_ps(y + c, _mm256_mul_ps(_mm256_loadu_ps(y + c), s));
  return true;
}

// The same transform in two passes over the row instead of eight (rows of whole 64-value
// chunks, 64 <= block <= 256: every model width). `load(at)` gives the 8 input values at
// `at` (the encoder's x times the signs; the decoder's levels times the group scale, read
// straight from the codes). Pass A: per 64-value chunk in eight registers, the load,
// stages 1-4 (fwht8) and 8, 16, 32 (into `y`); pass B: stages 64 and 128 across the block's
// chunks, four registers at a time, and the final multiply by 1/sqrt(block). Every value gets
// the same operations with the same operands as the stage-by-stage loops.
template <int A, int B>
inline void bfly(__m256* v) {  // (v[A], v[B]) <- (v[A] + v[B], v[A] - v[B])
  const __m256 a = v[A], b = v[B];
  v[A] = _mm256_add_ps(a, b);
  v[B] = _mm256_sub_ps(a, b);
}

// Q = block / 64 chunks of 64 values (1, 2 or 4); constant indices keep v[] in registers.
// The last step of each value: times 1/sqrt(block), or times `post` when given (the decoder's
// signs times 1/sqrt(block): fl(fl(v * c) * (+-1)) = fl(v * (+-c)), rounding to nearest is
// symmetric), then stored to `dst` (ACC: added to what `dst` holds, as acc + v).
template <int Q, bool ACC, class Load>
inline void fwht_row_fused_q(const Load& load, float* y, const float* post, float* dst, int64_t e, float inv_sqrt) {
  const __m256 s = _mm256_set1_ps(inv_sqrt);
  auto finish = [&](__m256 v, int64_t at) {
    v = _mm256_mul_ps(v, post ? _mm256_loadu_ps(post + at) : s);
    if (ACC) v = _mm256_add_ps(_mm256_loadu_ps(dst + at), v);
    _mm256_storeu_ps(dst + at, v);
  };
  for (int64_t c = 0; c < e; c += 64) {
    __m256 v[8];
    for (int i = 0; i < 8; ++i) v[i] = fwht8(load(c + 8 * i));
    bfly<0, 1>(v); bfly<2, 3>(v); bfly<4, 5>(v); bfly<6, 7>(v);  // stride 8
    bfly<0, 2>(v); bfly<1, 3>(v); bfly<4, 6>(v); bfly<5, 7>(v);  // stride 16
    bfly<0, 4>(v); bfly<1, 5>(v); bfly<2, 6>(v); bfly<3, 7>(v);  // stride 32
    for (int i = 0; i < 8; ++i) {
      if (Q == 1) finish(v[i], c + 8 * i);
      else _mm256_storeu_ps(y + c + 8 * i, v[i]);
    }
  }
  if (Q == 1) return;
  for (int64_t p = 0; p < e; p += 64 * Q)
    for (int64_t j = p; j < p + 64; j += 8) {
      __m256 v[4];
      for (int i = 0; i < Q; ++i) v[i] = _mm256_loadu_ps(y + j + 64 * i);
      bfly<0, 1>(v);  // stride 64
      if (Q == 4) {
        bfly<2, 3>(v);
        bfly<0, 2>(v); bfly<1, 3>(v);  // stride 128
      }
      for (int i = 0; i < Q; ++i) finish(v[i], j + 64 * i);
    }
}

#ifdef LBT_AVX512
// With AVX-512's 32 vector registers a whole block of up to 256 values stays in registers:
// every stage in one pass, nothing stored and reloaded between them. The same operations in
// the same order per value as fwht_row_fused_q.
template <int Q, bool ACC, class Load>
inline void fwht_row_regs_q(const Load& load, const float* post, float* dst, int64_t e, float inv_sqrt) {
  const __m256 s = _mm256_set1_ps(inv_sqrt);
  for (int64_t p = 0; p < e; p += 64 * Q) {
    __m256 v[8 * Q];
#pragma GCC unroll 32
    for (int i = 0; i < 8 * Q; ++i) v[i] = fwht8(load(p + 8 * i));
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) {
      __m256* w = v + 8 * q;
      bfly<0, 1>(w); bfly<2, 3>(w); bfly<4, 5>(w); bfly<6, 7>(w);  // stride 8
      bfly<0, 2>(w); bfly<1, 3>(w); bfly<4, 6>(w); bfly<5, 7>(w);  // stride 16
      bfly<0, 4>(w); bfly<1, 5>(w); bfly<2, 6>(w); bfly<3, 7>(w);  // stride 32
    }
    if (Q >= 2) {
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {  // stride 64, then 128
        __m256 a[4];
        for (int q = 0; q < Q; ++q) a[q] = v[8 * q + i];
        bfly<0, 1>(a);
        if (Q == 4) {
          bfly<2, 3>(a);
          bfly<0, 2>(a); bfly<1, 3>(a);
        }
        for (int q = 0; q < Q; ++q) v[8 * q + i] = a[q];
      }
    }
#pragma GCC unroll 32
    for (int i = 0; i < 8 * Q; ++i) {
      const int64_t at = p + 8 * i;
      __m256 x = _mm256_mul_ps(v[i], post ? _mm256_loadu_ps(post + at) : s);
      if (ACC) x = _mm256_add_ps(_mm256_loadu_ps(dst + at), x);
      _mm256_storeu_ps(dst + at, x);
    }
  }
}
#endif

#ifdef LBT_AVX512
// The same block in 512-bit registers: a 256-value block is 16 of them (no spills, where 32
// 256-bit ones plus constants are not enough). Stages 1, 2, 4, 8 inside a register (permute
// + fma(v, +-1, partner), exact as in fwht8), 16 and up between registers; each value gets
// the same operations with the same operands in the same order.
inline __m512 fwht16(__m512 v) {
  const __m512 s1 = _mm512_setr_ps(1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1);
  const __m512 s2 = _mm512_setr_ps(1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1);
  const __m512 s4 = _mm512_setr_ps(1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1);
  const __m512 s8 = _mm512_setr_ps(1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1);
  v = _mm512_fmadd_ps(v, s1, _mm512_permute_ps(v, 0xb1));
  v = _mm512_fmadd_ps(v, s2, _mm512_permute_ps(v, 0x4e));
  v = _mm512_fmadd_ps(v, s4, _mm512_shuffle_f32x4(v, v, 0xb1));  // 128-bit quarters swapped in pairs
  return _mm512_fmadd_ps(v, s8, _mm512_shuffle_f32x4(v, v, 0x4e));  // 256-bit halves swapped
}

// A store hook of fwht_row_zmm_q that does nothing (the encoder's takes the group absmax there).
struct NoSink { void operator()(int64_t, __m512) const {} };

template <int Q, bool ACC, class Load, class Sink = NoSink>
__attribute__((always_inline)) inline void fwht_row_zmm_q_inl(const Load& load, const float* post, float* dst, int64_t e,
                                                              float inv_sqrt, const Sink& sink) {
  constexpr int NZ = 4 * Q;  // registers per block
  const __m512 s = _mm512_set1_ps(inv_sqrt);
  for (int64_t p = 0; p < e; p += 64 * Q) {
    __m512 v[NZ];
#pragma GCC unroll 16
    for (int i = 0; i < NZ; ++i) {
      if constexpr (sizeof(decltype(load(int64_t(0)))) == 64) v[i] = fwht16(load(p + 16 * i));
      else v[i] = fwht16(_mm512_insertf32x8(_mm512_castps256_ps512(load(p + 16 * i)), load(p + 16 * i + 8), 1));
    }
#pragma GCC unroll 4
    for (int h = 1; h < NZ; h *= 2) {  // strides 16, 32, 64, 128
#pragma GCC unroll 16
      for (int i = 0; i < NZ; ++i) {
        if (i & h) continue;
        const __m512 a = v[i], b = v[i + h];
        v[i] = _mm512_add_ps(a, b);
        v[i + h] = _mm512_sub_ps(a, b);
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < NZ; ++i) {
      const int64_t at = p + 16 * i;
      __m512 x = _mm512_mul_ps(v[i], post ? _mm512_loadu_ps(post + at) : s);
      if (ACC) x = _mm512_add_ps(_mm512_loadu_ps(dst + at), x);
      sink(at, x);
      _mm512_storeu_ps(dst + at, x);
    }
  }
}
// The same, left to the compiler's inlining (the decoders: forced inline there measured slower).
template <int Q, bool ACC, class Load, class Sink = NoSink>
inline void fwht_row_zmm_q(const Load& load, const float* post, float* dst, int64_t e, float inv_sqrt,
                           const Sink& sink = Sink()) {
  fwht_row_zmm_q_inl<Q, ACC>(load, post, dst, e, inv_sqrt, sink);
}
#endif
#ifndef LBT_ZMM_HADAMARD
#define LBT_ZMM_HADAMARD 1
#endif
#if defined(LBT_AVX512) && LBT_ZMM_HADAMARD && !LBT_TWO_PASS
// LBT_ZMM16: fwht_row_fused16 takes loads of 16 values (one zmm: no two 8-value halves joined).
#define LBT_ZMM16 1
template <class Load16>
inline void fwht_row_fused16(const Load16& load, const float* post, float* dst, bool acc, int64_t e, int64_t block,
                             float inv_sqrt) {
  switch (block * 2 + acc) {
    case 128: fwht_row_zmm_q<1, false>(load, post, dst, e, inv_sqrt); return;
    case 129: fwht_row_zmm_q<1, true>(load, post, dst, e, inv_sqrt); return;
    case 256: fwht_row_zmm_q<2, false>(load, post, dst, e, inv_sqrt); return;
    case 257: fwht_row_zmm_q<2, true>(load, post, dst, e, inv_sqrt); return;
    case 512: fwht_row_zmm_q<4, false>(load, post, dst, e, inv_sqrt); return;
    default: fwht_row_zmm_q<4, true>(load, post, dst, e, inv_sqrt); return;
  }
}
// The encoder's: forced inline into its caller, so that what the hooks capture by reference
// (the input scan's max, the group absmax) stays in registers (out of line it went through
// memory on every 16 values); `sink(at, v)` sees each finished 16 values v (stored at dst + at).
template <class Load16, class Sink>
__attribute__((always_inline)) inline void fwht_row_encode16(const Load16& load, float* dst, int64_t e, int64_t block,
                                                             float inv_sqrt, const Sink& sink) {
  switch (block) {
    case 64: fwht_row_zmm_q_inl<1, false>(load, nullptr, dst, e, inv_sqrt, sink); return;
    case 128: fwht_row_zmm_q_inl<2, false>(load, nullptr, dst, e, inv_sqrt, sink); return;
    default: fwht_row_zmm_q_inl<4, false>(load, nullptr, dst, e, inv_sqrt, sink); return;
  }
}
// 16 values from element i as fp32, as load8.
template <int DT> inline __m512 load16(const void* p, int64_t i) {
  if (DT == 0) return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
  if (DT == 1) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}
#endif

// Whether fwht_row_fused takes rows of width e with this block.
inline bool fwht_fusable(int64_t e, int64_t block) { return block >= 64 && block <= 256 && e % block == 0; }

// fwht_row of load(...) (`post` multiplied after) into `dst`, added to it when `acc`; `y` is
// scratch of e floats. Only where fwht_fusable.
template <class Load>
inline void fwht_row_fused(const Load& load, float* y, const float* post, float* dst, bool acc, int64_t e,
                           int64_t block, float inv_sqrt) {
#ifdef LBT_AVX512
  if (!LBT_TWO_PASS && LBT_ZMM_HADAMARD) {
    (void)y;
    switch (block * 2 + acc) {
      case 128: fwht_row_zmm_q<1, false>(load, post, dst, e, inv_sqrt); return;
      case 129: fwht_row_zmm_q<1, true>(load, post, dst, e, inv_sqrt); return;
      case 256: fwht_row_zmm_q<2, false>(load, post, dst, e, inv_sqrt); return;
      case 257: fwht_row_zmm_q<2, true>(load, post, dst, e, inv_sqrt); return;
      case 512: fwht_row_zmm_q<4, false>(load, post, dst, e, inv_sqrt); return;
      default: fwht_row_zmm_q<4, true>(load, post, dst, e, inv_sqrt); return;
    }
  }
  if (!LBT_TWO_PASS) {
    (void)y;
    switch (block * 2 + acc) {
      case 128: fwht_row_regs_q<1, false>(load, post, dst, e, inv_sqrt); return;
      case 129: fwht_row_regs_q<1, true>(load, post, dst, e, inv_sqrt); return;
      case 256: fwht_row_regs_q<2, false>(load, post, dst, e, inv_sqrt); return;
      case 257: fwht_row_regs_q<2, true>(load, post, dst, e, inv_sqrt); return;
      case 512: fwht_row_regs_q<4, false>(load, post, dst, e, inv_sqrt); return;
      default: fwht_row_regs_q<4, true>(load, post, dst, e, inv_sqrt); return;
    }
  }
#endif
  switch (block * 2 + acc) {
    case 128: fwht_row_fused_q<1, false>(load, y, post, dst, e, inv_sqrt); return;
    case 129: fwht_row_fused_q<1, true>(load, y, post, dst, e, inv_sqrt); return;
    case 256: fwht_row_fused_q<2, false>(load, y, post, dst, e, inv_sqrt); return;
    case 257: fwht_row_fused_q<2, true>(load, y, post, dst, e, inv_sqrt); return;
    case 512: fwht_row_fused_q<4, false>(load, y, post, dst, e, inv_sqrt); return;
    default: fwht_row_fused_q<4, true>(load, y, post, dst, e, inv_sqrt); return;
  }
}

// A float table read by 8 int32 indices at once: in-register permutes up to 16 entries (one
// two-table permute with AVX-512VL; up to 64 with AVX-512: one or two 32-entry permutes), a
// gather beyond.
struct Table8 {
  const float* t;
  int n;
  __m256 lo, hi;
#ifdef LBT_AVX512
  __m512 z[4];  // entries 0-15, 16-31, 32-47, 48-63
#endif
  Table8(const float* table, int count) : t(table), n(count) {
    alignas(64) float buf[64] = {0};
    for (int i = 0; i < count && i < 64; ++i) buf[i] = table[i];
    lo = _mm256_load_ps(buf);
    hi = _mm256_load_ps(buf + 8);
#ifdef LBT_AVX512
    for (int i = 0; i < 4; ++i) z[i] = _mm512_load_ps(buf + 16 * i);
#endif
  }
  __m256 at(__m256i idx) const {
    if (n <= 8) return _mm256_permutevar8x32_ps(lo, idx);
#ifdef __AVX512VL__
    if (n <= 16) return _mm256_permutex2var_ps(lo, idx, hi);
#endif
#ifdef LBT_AVX512
    if (n <= 64) {  // index bits 0-4 pick within 32 entries, bit 5 which 32
      const __m512i i5 = _mm512_castsi256_si512(idx);
      const __m256 a = _mm512_castps512_ps256(_mm512_permutex2var_ps(z[0], i5, z[1]));
      if (n <= 32) return a;
      const __m256 b = _mm512_castps512_ps256(_mm512_permutex2var_ps(z[2], i5, z[3]));
      return _mm256_mask_blend_ps(_mm256_test_epi32_mask(idx, _mm256_set1_epi32(32)), a, b);
    }
#endif
    if (n <= 16)
      return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                              _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7))));
    return _mm256_i32gather_ps(t, idx, 4);
  }
};

// torch.bucketize(y, bounds) for 8 values: the number of bounds b with !(b >= y) (NaN y: all
// of them). The bounds ascend, so that predicate holds on a prefix: a branch-free binary search.
template <int BITS>
inline __m256i bucketize8_n(__m256 y, const Table8& bounds) {
  __m256i pos = _mm256_setzero_si256();
  for (int step = 1 << (BITS - 1); step; step >>= 1) {
    const __m256 b = bounds.at(_mm256_add_epi32(pos, _mm256_set1_epi32(step - 1)));
    const __m256i take = _mm256_castps_si256(_mm256_cmp_ps(b, y, _CMP_NGE_UQ));
    pos = _mm256_add_epi32(pos, _mm256_and_si256(take, _mm256_set1_epi32(step)));
  }
  return pos;
}
inline __m256i bucketize8(__m256 y, const Table8& bounds, int bits) {
  switch (bits) {  // unrolled per width
    case 2: return bucketize8_n<2>(y, bounds);
    case 3: return bucketize8_n<3>(y, bounds);
    case 4: return bucketize8_n<4>(y, bounds);
    case 5: return bucketize8_n<5>(y, bounds);
    case 6: return bucketize8_n<6>(y, bounds);
    case 7: return bucketize8_n<7>(y, bounds);
    default: return bucketize8_n<8>(y, bounds);
  }
}

#ifdef __AVX512VL__
// bucketize8 for up to 15 bounds (BITS <= 4) with AVX-512VL: the first step compares with the
// middle bound directly; each later step reads bounds[pos + step - 1] from a table shifted
// by step - 1 with one two-register permute and adds `step` under a compare mask.
struct Bucketize16 {
  int bits;
  __m256 first, lo[4], hi[4];
  Bucketize16(const float* bounds, int b) : bits(b) {
    const int nb = (1 << b) - 1;
    first = _mm256_set1_ps(bounds[(1 << (b - 1)) - 1]);
    for (int k = 1; k < b; ++k) {
      const int step = 1 << (b - 1 - k);
      alignas(32) float t[16];
      for (int i = 0; i < 16; ++i) t[i] = bounds[i + step - 1 < nb ? i + step - 1 : nb - 1];
      lo[k] = _mm256_load_ps(t);
      hi[k] = _mm256_load_ps(t + 8);
    }
  }
  __m256i operator()(__m256 y) const {
    __m256i pos = _mm256_maskz_mov_epi32(_mm256_cmp_ps_mask(first, y, _CMP_NGE_UQ), _mm256_set1_epi32(1 << (bits - 1)));
    for (int k = 1; k < bits; ++k) {
      const __mmask8 m = _mm256_cmp_ps_mask(_mm256_permutex2var_ps(lo[k], pos, hi[k]), y, _CMP_NGE_UQ);
      pos = _mm256_mask_add_epi32(pos, m, pos, _mm256_set1_epi32(1 << (bits - 1 - k)));
    }
    return pos;
  }
};
#endif

#ifdef LBT_AVX512
// The same search without the division (at most 15 bounds). The reference's code is the
// number of bounds b with !(b >= clamp(fl(z / s), -1, 1)), fl = IEEE round to nearest even.
// For a scale s that is a normal float, a finite z and b in [-1, 1):
//   clamp(fl(z/s), -1, 1) > b  <=>  fl(z/s) > b  <=>  z/s > m_b, or z/s == m_b and the tie
//   rounds up to succ(b),
// where succ(b) is the next float above b and m_b = (b + succ(b)) / 2 their midpoint (rounding
// is monotone; a tie rounds to whichever of b, succ(b) has an even encoding). With s > 0,
// z/s > m_b <=> z > T_b = s * m_b, and T_b is exact in double (24 x 26 significant bits). For
// a float z, "z > T" is "z > floor_f(T)" (the largest float <= T) and "z >= T" is
// "z > pred_f(T)" (the largest float < T). So one float threshold per bound and group,
//   t_b = tie_up(b) ? pred_f(s * m_b) : floor_f(s * m_b),
// gives code = #{b : !(t_b >= z)}: the same predicate form, bit for bit the same codes. Bounds
// below -1 always count (t_b = -inf), bounds >= 1 never (t_b = +inf), for finite z. The caller
// uses it only for groups without NaN/Inf, s normal, and the default MXCSR (round to nearest,
// no FTZ/DAZ); the others divide. tests/test_cpu_kernels.py checks it at and next to every
// threshold against torch.bucketize(clamp(z / s)).
struct ThresholdSearch {
  int bits;
  __m512d mid_lo, mid_hi;  // m_b for b = 0..7 and 8..15 (0 where unused)
  __mmask16 tie_up, below, above;  // lanes: tie rounds up; bound < -1; bound >= 1 or padding
  __m512i shift[4];        // step k reads bound min(i + step - 1, nb - 1): 1 << (bits - 1 - k) = step
  ThresholdSearch(const float* bounds, int b) : bits(b), tie_up(0), below(0), above(0) {
    const int nb = (1 << b) - 1;
    alignas(64) double mid[16] = {0};
    for (int i = 0; i < 16; ++i) {
      if (i >= nb || bounds[i] >= 1.0f) { above = __mmask16(above | (1u << i)); continue; }
      if (bounds[i] < -1.0f) { below = __mmask16(below | (1u << i)); continue; }
      const float succ = std::nextafter(bounds[i] == 0.0f ? 0.0f : bounds[i], INFINITY);
      mid[i] = (double(bounds[i]) + double(succ)) / 2;
      if ((bits_of(succ) & 1u) == 0) tie_up = __mmask16(tie_up | (1u << i));
    }
    mid_lo = _mm512_load_pd(mid);
    mid_hi = _mm512_load_pd(mid + 8);
    alignas(64) int32_t lo[32];
    cells_ok = true;
    for (int c = 0; c < 32; ++c) {  // codes of y in [-1 + c/16, -1 + (c+1)/16] +- margin, within [-1, 1]
      const double ylo = std::max(-1.0, -1.0 + c / 16.0 - kCellMargin), yhi = std::min(1.0, -1.0 + (c + 1) / 16.0 + kCellMargin);
      int nlo = 0, nhi = 0;
      for (int i = 0; i < nb; ++i) {
        nlo += double(bounds[i]) < ylo;
        nhi += double(bounds[i]) < yhi;
      }
      lo[c] = nlo;
      cells_ok = cells_ok && nhi - nlo <= 1;
    }
    cell_lo[0] = _mm512_load_si512(lo);
    cell_lo[1] = _mm512_load_si512(lo + 16);
    for (int k = 1; k < b; ++k) {
      const int step = 1 << (b - 1 - k);
      alignas(64) int32_t idx[16];
      for (int i = 0; i < 16; ++i) idx[i] = i + step - 1 < nb ? i + step - 1 : nb - 1;
      shift[k] = _mm512_load_si512(idx);
    }
  }
  // Cell search (cells_ok): one threshold comparison instead of the 4-step search. An
  // estimate y' of z / s (z times a rounded 1/s, by one fma as u = y' + 3, clamped to
  // [2, 4)) picks one of 32 cells of width 1/16 over [-1, 1] from u's top 5 mantissa bits.
  // The constructor has checked for every cell c that the codes of all y within kCellMargin
  // of it (clamped to [-1, 1]) are lo_c or lo_c + 1. |y' - clamp(fl(z / s), -1, 1)| <
  // 2**-20 for every finite z in a group whose scale s is a normal float (1/s rounded:
  // relative error 2**-24, even where 1/s is subnormal: 2**-22 there; the fma: 2**-23 absolute
  // on [2, 4); the clamps are 1-Lipschitz), far inside kCellMargin = 2**-12, so the code is lo_c
  // plus [z > t_{lo_c}], the same comparison the search makes with the same thresholds.
  static constexpr double kCellMargin = 1.0 / 4096;
  bool cells_ok = false;
  __m512i cell_lo[2];  // lo_c for cells 0-15 and 16-31
  struct GroupC { __m512 tc0, tc1, k; };  // t_{lo_c} per cell; fl(1/s)
  void prepare_cells(float s, GroupC& g) const {
    const __m512 t = thresholds(s);
    g.tc0 = _mm512_permutexvar_ps(cell_lo[0], t);
    g.tc1 = _mm512_permutexvar_ps(cell_lo[1], t);
    g.k = _mm512_set1_ps(1.0f / s);
  }
  __m512i search_cells(const GroupC& g, __m512 z) const {
    __m512 u = _mm512_fmadd_ps(z, g.k, _mm512_set1_ps(3.0f));
    u = _mm512_min_ps(_mm512_max_ps(u, _mm512_set1_ps(2.0f)), _mm512_set1_ps(4.0f - 0x1p-22f));
    const __m512i c = _mm512_srli_epi32(_mm512_castps_si512(u), 18);  // low 5 bits: floor((y' + 1) * 16)
    const __m512i lo = _mm512_permutex2var_epi32(cell_lo[0], c, cell_lo[1]);
    const __mmask16 up = _mm512_cmp_ps_mask(_mm512_permutex2var_ps(g.tc0, c, g.tc1), z, _CMP_NGE_UQ);
    return _mm512_mask_add_epi32(lo, up, lo, _mm512_set1_epi32(1));
  }
  struct Group { __m256 first, lo[4], hi[4]; __m512 firstz, z[4]; };
  // 4 bits (15 bounds) with the step count known at compile time: the 16-wide search unrolled,
  // its tables in registers (with `bits` read at run time the loop kept them in memory).
  // The same thresholds and comparisons as prepare / operator() at bits == 4.
  struct Group4 { __m512 first, z1, z2, z3; };
  void prepare4(float s, Group4& g) const {
    const __m512 t = thresholds(s);
    g.first = _mm512_permutexvar_ps(_mm512_set1_epi32(7), t);
    g.z1 = _mm512_permutexvar_ps(shift[1], t);
    g.z2 = _mm512_permutexvar_ps(shift[2], t);
    g.z3 = _mm512_permutexvar_ps(shift[3], t);
  }
  static __m512i search4(const Group4& g, __m512 y) {
    __m512i pos = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(g.first, y, _CMP_NGE_UQ), _mm512_set1_epi32(8));
    pos = _mm512_mask_add_epi32(pos, _mm512_cmp_ps_mask(_mm512_permutexvar_ps(pos, g.z1), y, _CMP_NGE_UQ), pos,
                                _mm512_set1_epi32(4));
    pos = _mm512_mask_add_epi32(pos, _mm512_cmp_ps_mask(_mm512_permutexvar_ps(pos, g.z2), y, _CMP_NGE_UQ), pos,
                                _mm512_set1_epi32(2));
    return _mm512_mask_add_epi32(pos, _mm512_cmp_ps_mask(_mm512_permutexvar_ps(pos, g.z3), y, _CMP_NGE_UQ), pos,
                                 _mm512_set1_epi32(1));
  }
  // The thresholds t_b for scale s (a normal float), as the search's per-step tables.
  void prepare(float s, Group& g) const {
    const __m512 t = thresholds(s);
    g.firstz = _mm512_permutexvar_ps(_mm512_set1_epi32((1 << (bits - 1)) - 1), t);
    g.first = _mm512_castps512_ps256(g.firstz);
    for (int k = 1; k < bits; ++k) {
      const __m512 sh = _mm512_permutexvar_ps(shift[k], t);
      g.z[k] = sh;
      g.lo[k] = _mm512_castps512_ps256(sh);
      g.hi[k] = _mm512_extractf32x8_ps(sh, 1);
    }
  }
  // t_b for the 16 lanes b (-inf below -1, +inf at and above 1 and past the last bound).
  __m512 thresholds(float s) const {
    const __m512d sd = _mm512_set1_pd(double(s));
    const __m512d tl = _mm512_mul_pd(sd, mid_lo), th = _mm512_mul_pd(sd, mid_hi);  // exact
    const __m256 fl = _mm512_cvt_roundpd_ps(tl, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // floor_f
    const __m256 fh = _mm512_cvt_roundpd_ps(th, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __mmask16 eq = __mmask16((_mm512_cmp_pd_mask(_mm512_cvtps_pd(fl), tl, _CMP_EQ_OQ) |
                                    (unsigned(_mm512_cmp_pd_mask(_mm512_cvtps_pd(fh), th, _CMP_EQ_OQ)) << 8)) & tie_up);
    // pred_f where T is a float and the tie rounds up: one step down (T != 0, so t != 0)
    __m512i u = _mm512_castps_si512(_mm512_insertf32x8(_mm512_castps256_ps512(fl), fh, 1));
    const __mmask16 neg = _mm512_cmplt_epi32_mask(u, _mm512_setzero_si512());
    u = _mm512_mask_add_epi32(u, eq, u, _mm512_mask_blend_epi32(neg, _mm512_set1_epi32(-1), _mm512_set1_epi32(1)));
    __m512 t = _mm512_castsi512_ps(u);
    t = _mm512_mask_mov_ps(t, below, _mm512_set1_ps(-INFINITY));
    return _mm512_mask_mov_ps(t, above, _mm512_set1_ps(INFINITY));
  }
  __m512i operator()(const Group& g, __m512 y) const {  // 16 values: one 16-entry table per step
    __m512i pos = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(g.firstz, y, _CMP_NGE_UQ), _mm512_set1_epi32(1 << (bits - 1)));
    for (int k = 1; k < bits; ++k) {
      const __mmask16 m = _mm512_cmp_ps_mask(_mm512_permutexvar_ps(pos, g.z[k]), y, _CMP_NGE_UQ);
      pos = _mm512_mask_add_epi32(pos, m, pos, _mm512_set1_epi32(1 << (bits - 1 - k)));
    }
    return pos;
  }
  __m256i operator()(const Group& g, __m256 y) const {  // as Bucketize16, on the group's thresholds
    __m256i pos = _mm256_maskz_mov_epi32(_mm256_cmp_ps_mask(g.first, y, _CMP_NGE_UQ), _mm256_set1_epi32(1 << (bits - 1)));
    for (int k = 1; k < bits; ++k) {
      const __mmask8 m = _mm256_cmp_ps_mask(_mm256_permutex2var_ps(g.lo[k], pos, g.hi[k]), y, _CMP_NGE_UQ);
      pos = _mm256_mask_add_epi32(pos, m, pos, _mm256_set1_epi32(1 << (bits - 1 - k)));
    }
    return pos;
  }
};

// Whether this thread rounds to nearest without flushing subnormals (what the proof assumes).
inline bool default_mxcsr() { return (_mm_getcsr() & 0xe040u) == 0; }
#endif

// 8 int32 lanes (values 0..255) -> 8 bytes.
inline void store8_u8(uint8_t* dst, __m256i v) {
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(w, w));
}
#endif

#if defined(LBT_AVX512) && defined(__GFNI__) && defined(__AVX512VBMI__) && !LBT_NO_GFNI
#define LBT_GFNI 1
// 64 bytes as eight 8x8 bit matrices, each transposed: out qword q, byte i, bit j = in qword
// q, byte j, bit i. GF2P8AFFINEQB gives result byte i bit j = parity(A.byte[7 - j] & x.byte[i]);
// with x.byte[i] = 1 << i and A = the qword byte-reversed that is bit i of in byte j.
inline __m512i transpose_bits8x8(__m512i v) {
  // pshufb (indices within each 16-byte lane): the bytes of each qword reversed
  const __m512i rev = _mm512_set4_epi64(0x08090a0b0c0d0e0fll, 0x0001020304050607ll, 0x08090a0b0c0d0e0fll,
                                        0x0001020304050607ll);
  return _mm512_gf2p8affine_epi64_epi8(_mm512_set1_epi64(int64_t(0x8040201008040201ull)),
                                       _mm512_shuffle_epi8(v, rev), 0);
}
// The 8x8 byte transpose of a zmm: out byte 8i + q = in byte 8q + i.
inline __m512i transpose_bytes8x8(__m512i v) {
  alignas(64) static const uint8_t idx[64] = {
      0, 8, 16, 24, 32, 40, 48, 56, 1, 9, 17, 25, 33, 41, 49, 57, 2, 10, 18, 26, 34, 42, 50, 58,
      3, 11, 19, 27, 35, 43, 51, 59, 4, 12, 20, 28, 36, 44, 52, 60, 5, 13, 21, 29, 37, 45, 53, 61,
      6, 14, 22, 30, 38, 46, 54, 62, 7, 15, 23, 31, 39, 47, 55, 63};
  return _mm512_permutexvar_epi8(_mm512_load_si512(idx), v);
}
#endif
#ifndef LBT_NO_GFNI
#define LBT_NO_GFNI 0
#endif

inline void put_bitplanes(const uint8_t* c, int64_t m, int64_t f, int64_t plane_bytes, int bits, uint8_t* body) {
  int64_t i0 = 0;
#ifdef LBT_GFNI
  if ((f & 7) == 0)  // 64 codes -> 8 bytes of each plane: bit transposes, then qword q = plane q's bytes
    for (; i0 + 64 <= m; i0 += 64) {
      const __m512i w = transpose_bytes8x8(transpose_bits8x8(_mm512_loadu_si512(c + i0)));
      uint8_t* dst = body + ((f + i0) >> 3);
      for (int j = 0; j < bits; j += 2) {  // qwords j, j + 1 from 128-bit lane j / 2 (no store/reload)
        const __m128i lane = j == 0 ? _mm512_castsi512_si128(w) : (j == 2 ? _mm512_extracti32x4_epi32(w, 1)
                                             : (j == 4 ? _mm512_extracti32x4_epi32(w, 2) : _mm512_extracti32x4_epi32(w, 3)));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + j * plane_bytes), lane);
        if (j + 1 < bits) _mm_storeh_pd(reinterpret_cast<double*>(dst + (j + 1) * plane_bytes), _mm_castsi128_pd(lane));
      }
    }
#endif
  c += i0;
  f += i0;
  m -= i0;
  for (int j = 0; j < bits; ++j) {
    uint8_t* plane = body + j * plane_bytes;
    int64_t i = 0;
#ifdef LBT_AVX2
    if ((f & 7) == 0)  // byte-aligned start: 32 codes -> 4 bytes of plane j (bit j to each byte's top)
      for (; i + 32 <= m; i += 32) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + i));
        const uint32_t word = uint32_t(_mm256_movemask_epi8(_mm256_slli_epi16(v, 7 - j)));
        std::memcpy(plane + ((f + i) >> 3), &word, 4);
      }
#endif
    for (; i < m && ((f + i) & 7); ++i) plane[(f + i) >> 3] |= uint8_t(((c[i] >> j) & 1) << ((f + i) & 7));
    for (; i + 8 <= m; i += 8) {
      uint8_t byte = 0;
      for (int b = 0; b < 8; ++b) byte |= uint8_t(((c[i + b] >> j) & 1) << b);
      plane[(f + i) >> 3] = byte;
    }
    for (; i < m; ++i) plane[(f + i) >> 3] |= uint8_t(((c[i] >> j) & 1) << ((f + i) & 7));
  }
}

inline void get_bitplanes(const uint8_t* body, int64_t m, int64_t f, int64_t plane_bytes, int bits, uint8_t* c) {
  int64_t i0 = 0;
#ifdef LBT_GFNI
  if ((f & 7) == 0)  // 8 bytes of each plane -> 64 codes: the inverse transposes (planes >= bits: 0)
    for (; i0 + 64 <= m; i0 += 64) {
      const uint8_t* src = body + ((f + i0) >> 3);
      __m128i lane[4];
      for (int j = 0; j < 8; j += 2) {  // qword j = plane j's 8 bytes (0 past `bits`), straight into registers
        lane[j / 2] = j < bits ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + j * plane_bytes))
                               : _mm_setzero_si128();
        if (j + 1 < bits)
          lane[j / 2] = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(lane[j / 2]),
                                                      reinterpret_cast<const double*>(src + (j + 1) * plane_bytes)));
      }
      const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(lane[1], lane[0])),
                                           _mm256_set_m128i(lane[3], lane[2]), 1);
      _mm512_storeu_si512(c + i0, transpose_bits8x8(transpose_bytes8x8(w)));
    }
#endif
#ifdef LBT_AVX2
  if ((f & 7) == 0) {  // byte-aligned start: 32 codes from 4 bytes of each plane
    const __m256i sel = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                         2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201ull));
    for (; i0 + 32 <= m; i0 += 32) {
      __m256i acc = _mm256_setzero_si256();
      for (int j = 0; j < bits; ++j) {
        int32_t w;
        std::memcpy(&w, body + j * plane_bytes + ((f + i0) >> 3), 4);
        const __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(w), sel), bit);
        acc = _mm256_or_si256(acc, _mm256_and_si256(_mm256_cmpeq_epi8(v, bit), _mm256_set1_epi8(char(1 << j))));
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + i0), acc);
    }
  }
#endif
  if (i0 == m) return;
  c += i0;
  f += i0;
  m -= i0;
  for (int64_t i = 0; i < m; ++i) c[i] = 0;
  for (int j = 0; j < bits; ++j) {
    const uint8_t* plane = body + j * plane_bytes;
    int64_t i = 0;
    for (; i < m && ((f + i) & 7); ++i) c[i] |= uint8_t(((plane[(f + i) >> 3] >> ((f + i) & 7)) & 1) << j);
    for (; i + 8 <= m; i += 8) {  // whole bytes: 8 codes each
      const uint8_t byte = plane[(f + i) >> 3];
      for (int b = 0; b < 8; ++b) c[i + b] |= uint8_t(((byte >> b) & 1) << j);
    }
    for (; i < m; ++i) c[i] |= uint8_t(((plane[(f + i) >> 3] >> ((f + i) & 7)) & 1) << j);
  }
}

// The codes of one group of rotated values: #{bounds !>= clamp(z / sc, -1, 1)}, torch.bucketize
// of the reference's clamped quotient. Without the division where ThresholdSearch applies.
struct LevelCoder {
  const float* bounds;
  int bits, nb;
#ifdef LBT_AVX2
  Table8 bounds8;
#endif
#ifdef __AVX512VL__
  Bucketize16 bucket16;
#endif
#ifdef LBT_AVX512
  ThresholdSearch thr;
  bool thr_ok;
#endif
  // Integer grids above 4 bits (levels i/q): the code from an estimate, ceil(y * q + q + 0.5),
  // moved by at most one step with the bounds' own comparisons. Used only where the
  // constructor has checked, at both ends of every code's interval of y in [-1, 1], that the
  // estimate is within one step of the code (the estimate is monotone in y, so then it is
  // everywhere in between).
  float grid_q = 0.0f;
  bool grid_ok = false;
  int grid_estimate(float y) const {
    float e = std::ceil(y * grid_q + (grid_q + 0.5f));
    e = e < 0.0f ? 0.0f : (e > float(nb) ? float(nb) : e);
    return int(e);
  }
  void check_grid() {
    if (bits < 5 || bits > 6) return;
    grid_q = float((1 << (bits - 1)) - 1);
    for (int j = 0; j <= nb; ++j) {  // code j <=> bounds[j-1] < y <= bounds[j]
      float lo = j == 0 ? -1.0f : std::nextafter(bounds[j - 1], INFINITY);
      float hi = j == nb ? 1.0f : bounds[j];
      lo = lo < -1.0f ? -1.0f : lo;
      hi = hi > 1.0f ? 1.0f : hi;
      if (lo > hi) continue;
      if (grid_estimate(lo) < j - 1 || grid_estimate(hi) > j + 1) return;
    }
    grid_ok = true;
    // Multiply-only estimate (grid_fast): bounds[j] = (2j - 2q - 1) / (2q) up to tol (checked
    // here in double), so code(y) = ceil(q y + q + 0.5) wherever q y + q + 0.5 is further than
    // q tol from an integer. The encoders compute w = q (z / s) + q + 0.5 as z * fl(q / s) +
    // (q + 0.5): within 4 fp32 roundings of |w| <= 2q + 1, i.e. < (2q + 1) 2^-21 absolute, of
    // the exact w; lanes with w within kNearInt of an integer take the exact path (division
    // and the bounds' own comparisons). kNearInt = 2^-9 leaves a wide margin when
    // q tol + (2q + 1) 2^-21 < 2^-10 (true for every grid here: tol ~ 1e-7).
    double tol = 0.0;
    for (int j = 0; j < nb; ++j) {
      const double exact = (2.0 * j - 2.0 * grid_q - 1.0) / (2.0 * grid_q);
      const double d = std::fabs(double(bounds[j]) - exact);
      tol = d > tol ? d : tol;
    }
    grid_fast = grid_q * tol + (2.0 * grid_q + 1.0) * std::ldexp(1.0, -21) < std::ldexp(1.0, -10);
  }
  static constexpr float kNearInt = 1.0f / 512;
  bool grid_fast = false;
  LevelCoder(const float* b, int nbits)
      : bounds(b), bits(nbits), nb((1 << nbits) - 1)
#ifdef LBT_AVX2
      , bounds8(b, (1 << nbits) - 1)
#endif
#ifdef __AVX512VL__
      , bucket16(b, nbits <= 4 ? nbits : 1)
#endif
#ifdef LBT_AVX512
      , thr(b, nbits <= 4 ? nbits : 1), thr_ok(nbits <= 4 && default_mxcsr())
#endif
  { check_grid(); }
  // 4-bit codes of one group written straight into the nibble stream at an even index f
  // (code f + 2i in the low nibble of byte (f >> 1) + i), 16 per step: the search's int32
  // lanes 2i and 2i + 1 joined in their qword (lane 2i | lane 2i+1 << 4, then its low byte).
  // Only where the division-free search takes the whole group; false: the caller codes and packs.
  bool code_nibbles(const float* z, int64_t n, float sc, bool finite, int64_t f, uint8_t* body) const {
#ifdef LBT_AVX512
    if (!(thr_ok && bits == 4 && finite && sc >= FLT_MIN && sc <= FLT_MAX && n % 16 == 0 && !(f & 1) &&
          LBT_ZMM_SEARCH && !(LBT_SKIP & 112)))
      return false;
    uint8_t* dst = body + (f >> 1);
    if (thr.cells_ok && LBT_CELLS) {
      ThresholdSearch::GroupC tg;
      thr.prepare_cells(sc, tg);
      for (int64_t i = 0; i < n; i += 16) {
        const __m512i q = thr.search_cells(tg, _mm512_loadu_ps(z + i));  // codes 0..15
        _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + (i >> 1)),
                         _mm512_cvtepi64_epi8(_mm512_or_si512(q, _mm512_srli_epi64(q, 28))));
      }
      return true;
    }
    ThresholdSearch::Group4 tg;
    thr.prepare4(sc, tg);
    for (int64_t i = 0; i < n; i += 16) {
      const __m512i q = ThresholdSearch::search4(tg, _mm512_loadu_ps(z + i));  // codes 0..15
      _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + (i >> 1)),
                       _mm512_cvtepi64_epi8(_mm512_or_si512(q, _mm512_srli_epi64(q, 28))));
    }
    return true;
#else
    (void)z; (void)n; (void)sc; (void)finite; (void)f; (void)body;
    return false;
#endif
  }
  // finite: the group holds no NaN/Inf.
  void code(const float* z, int64_t n, float sc, bool finite, uint8_t* codes) const {
    int64_t i = 0;
    (void)finite;
#ifdef LBT_AVX512
    if (thr_ok && finite && sc >= FLT_MIN && sc <= FLT_MAX && n >= 8 && !(LBT_SKIP & 48)) {
      if (thr.cells_ok && LBT_CELLS && LBT_ZMM_SEARCH) {
        ThresholdSearch::GroupC tc;
        thr.prepare_cells(sc, tc);
        for (; i + 16 <= n; i += 16)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(thr.search_cells(tc, _mm512_loadu_ps(z + i))));
      }
      ThresholdSearch::Group tg;
      thr.prepare(sc, tg);
      for (; LBT_ZMM_SEARCH && i + 16 <= n; i += 16)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(thr(tg, _mm512_loadu_ps(z + i))));
      for (; i + 8 <= n; i += 8)
        _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm256_cvtepi32_epi8(thr(tg, _mm256_loadu_ps(z + i))));
    }
#endif
#ifdef LBT_AVX2
    const __m256 vs = _mm256_set1_ps(sc), m1 = _mm256_set1_ps(-1.0f), p1 = _mm256_set1_ps(1.0f);
    if (LBT_SKIP & 48)
      for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(z + i);
        const __m256 y = _mm256_min_ps(p1, _mm256_max_ps(m1, (LBT_SKIP & 16) ? _mm256_mul_ps(v, vs) : _mm256_div_ps(v, vs)));
#ifdef __AVX512VL__
        if (!(LBT_SKIP & 32)) { _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm256_cvtepi32_epi8(bucket16(y))); continue; }
#endif
        store8_u8(codes + i, _mm256_cvttps_epi32(y));
      }
#ifdef __AVX512VL__
    if (bits <= 4)
      for (; i + 8 <= n; i += 8) {
        const __m256 y = _mm256_min_ps(p1, _mm256_max_ps(m1, _mm256_div_ps(_mm256_loadu_ps(z + i), vs)));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm256_cvtepi32_epi8(bucket16(y)));
      }
#endif
    if (grid_ok) {
      const __m256 q = _mm256_set1_ps(grid_q), q5 = _mm256_set1_ps(grid_q + 0.5f);
      const __m256i zero = _mm256_setzero_si256(), top = _mm256_set1_epi32(nb), one = _mm256_set1_epi32(1);
      const float rq = grid_q / sc;  // fl(q / s)
      const bool fast = grid_fast && finite && sc >= FLT_MIN && sc <= FLT_MAX && rq <= FLT_MAX && !(LBT_SKIP & 48);
      const __m256 vr = _mm256_set1_ps(rq), wlo = _mm256_set1_ps(0.5f), whi = _mm256_set1_ps(2.0f * grid_q + 0.5f);
      const __m256 near = _mm256_set1_ps(kNearInt), absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
#ifdef LBT_AVX512
      // the same fast path 16 values at a time: w - round(w) by one vreduceps, ceil and the
      // int conversion in one; a chunk with a lane near an integer goes to the 8-wide loop
      // below (which takes it 8 at a time, the exact path where needed) and the rest follow it
      if (fast && LBT_ZMM_GRID) {
        const __m512 vr16 = _mm512_set1_ps(rq), q516 = _mm512_set1_ps(grid_q + 0.5f);
        const __m512 wlo16 = _mm512_set1_ps(0.5f), whi16 = _mm512_set1_ps(2.0f * grid_q + 0.5f);
        const __m512 near16 = _mm512_set1_ps(kNearInt);
        for (; i + 16 <= n; i += 16) {
          const __m512 w = _mm512_min_ps(whi16, _mm512_max_ps(wlo16, _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(z + i), vr16), q516)));
          const __m512 off = _mm512_reduce_ps(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          if (_mm512_cmp_ps_mask(_mm512_abs_ps(off), near16, _CMP_LT_OQ)) break;
          _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i),
                           _mm512_cvtepi32_epi8(_mm512_cvt_roundps_epi32(w, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC)));
        }
      }
#endif
      for (; i + 8 <= n; i += 8) {
        if (fast) {  // w = clamp(z * fl(q / s) + q + 0.5, 0.5, 2q + 0.5); code = ceil(w) away from integers
          const __m256 w = _mm256_min_ps(whi, _mm256_max_ps(wlo, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(z + i), vr), q5)));
          const __m256 off = _mm256_sub_ps(w, _mm256_round_ps(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
          if (!_mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(off, absm), near, _CMP_LT_OQ))) {
            store8_u8(codes + i, _mm256_cvtps_epi32(_mm256_round_ps(w, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC)));
            continue;
          }
        }
        const __m256 y = _mm256_min_ps(p1, _mm256_max_ps(m1, _mm256_div_ps(_mm256_loadu_ps(z + i), vs)));
        const __m256 est = _mm256_round_ps(_mm256_add_ps(_mm256_mul_ps(y, q), q5), _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
        __m256i c = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(est), zero), top);  // NaN: fixed below
        // one down where bounds[c-1] >= y, one up where bounds[c] < y
        const __m256i dn = _mm256_and_si256(_mm256_cmpgt_epi32(c, zero), _mm256_castps_si256(_mm256_cmp_ps(
            bounds8.at(_mm256_max_epi32(_mm256_sub_epi32(c, one), zero)), y, _CMP_GE_OQ)));
        c = _mm256_add_epi32(c, dn);
        const __m256i up = _mm256_and_si256(_mm256_cmpgt_epi32(top, c), _mm256_castps_si256(_mm256_cmp_ps(
            bounds8.at(_mm256_min_epi32(c, _mm256_sub_epi32(top, one))), y, _CMP_LT_OQ)));
        c = _mm256_sub_epi32(c, up);
        c = _mm256_blendv_epi8(c, top, _mm256_castps_si256(_mm256_cmp_ps(y, y, _CMP_UNORD_Q)));
        store8_u8(codes + i, c);
      }
    }
    for (; i + 8 <= n; i += 8) {  // max/min with y second: a NaN y passes through, as in the reference
      const __m256 y = _mm256_min_ps(p1, _mm256_max_ps(m1, _mm256_div_ps(_mm256_loadu_ps(z + i), vs)));
      store8_u8(codes + i, bucketize8(y, bounds8, bits));
    }
#endif
    for (; i < n; ++i) {
      float y = z[i] / sc;
      y = y < -1.0f ? -1.0f : y;
      y = y > 1.0f ? 1.0f : y;
      uint8_t code = 0;
      for (int b = 0; b < nb; ++b) code = uint8_t(code + !(bounds[b] >= y));
      codes[i] = code;
    }
  }
};

// lg8: the largest q <= 254 with lg8[q] >= ratio (the table descends; 0 if none), as the
// reference's searchsorted. Start from -16 log2(ratio) read off the float's bits (within 2 of
// the answer), then step to the exact one with the table's own comparisons: four branch-free
// steps up from two below the estimate, then the loops (which find nothing left to do unless
// the estimate was further off) leave the exact answer either way.
inline int lg8_code(float ratio, const float* lg8) {
  int q = (-(int32_t(bits_of(ratio)) - 0x3f800000) >> 19) - 2;
  q = q < 0 ? 0 : (q > 255 ? 255 : q);
  for (int step = 0; step < 4; ++step) q += int(q < 255) & int(lg8[q < 255 ? q + 1 : 255] >= ratio);
  while (q > 0 && !(lg8[q] >= ratio)) --q;
  while (q < 255 && lg8[q + 1] >= ratio) ++q;
  q = lg8[q] >= ratio ? q : 0;
  return q > 254 ? 254 : q;
}

#ifdef LBT_AVX2
// lg8_code of amax[0..8) / b32 for 8 groups at once (the same steps, table reads by gathers);
// a lane the four steps leave unsettled (the estimate off by more than the steps reach) takes
// the scalar search. Writes each group's scale b32 * lg8[q] and its code byte (255 if poisoned).
inline void lg8_codes8(const float* amax, const uint8_t* poisoned, float b32, const float* lg8, float* scale,
                       uint8_t* qbytes) {
  const __m256 r = _mm256_div_ps(_mm256_loadu_ps(amax), _mm256_set1_ps(b32));
  const __m256i top = _mm256_set1_epi32(255), zero = _mm256_setzero_si256(), one = _mm256_set1_epi32(1);
  __m256i q = _mm256_sub_epi32(_mm256_srai_epi32(_mm256_sub_epi32(_mm256_set1_epi32(0x3f800000),
                                                                  _mm256_castps_si256(r)), 19), _mm256_set1_epi32(2));
  q = _mm256_min_epi32(_mm256_max_epi32(q, zero), top);
  auto ge = [&](__m256i idx) {  // lg8[idx] >= r
    return _mm256_castps_si256(_mm256_cmp_ps(_mm256_i32gather_ps(lg8, idx, 4), r, _CMP_GE_OQ));
  };
  for (int step = 0; step < 4; ++step) {
    const __m256i below = _mm256_cmpgt_epi32(top, q);
    q = _mm256_sub_epi32(q, _mm256_and_si256(below, ge(_mm256_min_epi32(_mm256_add_epi32(q, one), top))));
  }
  const __m256i here = ge(q);
  const __m256i down = _mm256_andnot_si256(here, _mm256_cmpgt_epi32(q, zero));
  const __m256i up = _mm256_and_si256(_mm256_cmpgt_epi32(top, q), ge(_mm256_min_epi32(_mm256_add_epi32(q, one), top)));
  alignas(32) int32_t qs[8];
  q = _mm256_min_epi32(_mm256_and_si256(q, here), _mm256_set1_epi32(254));
  _mm256_store_si256(reinterpret_cast<__m256i*>(qs), q);
  const int unsettled = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(down, up)));
  for (int i = 0; i < 8; ++i)
    if (unsettled >> i & 1) qs[i] = lg8_code(amax[i] / b32, lg8);
  q = _mm256_load_si256(reinterpret_cast<const __m256i*>(qs));
  _mm256_storeu_ps(scale, _mm256_mul_ps(_mm256_set1_ps(b32), _mm256_i32gather_ps(lg8, q, 4)));
  const __m256i bad = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(poisoned)));
  store8_u8(qbytes, _mm256_blendv_epi8(q, top, _mm256_cmpgt_epi32(bad, zero)));
}
#endif

#ifdef LBT_AVX512
// lg8_code for 16 groups at once, without gathers or a search loop, where the table is
// 2**(-q/16) rounded once: lg8[0] = 1 > lg8[1] > ... > lg8[15] > lg8[16] = 0.5 and
// lg8[16a + j] = lg8[j] * 2**-a for every q = 16a + j (the constructor checks all of it;
// `ok` false: the caller keeps lg8_codes8). For a normal ratio r = m * 2**-a0 with m in
// [0.5, 1) (read off r's bits), lg8[16a + j] >= r  <=>  lg8[j] * 2**(a0 - a) >= m, which holds
// for every a < a0 (2 lg8[j] > 1 > m), at a = a0 iff lg8[j] >= m, at a = a0 + 1 only for j = 0
// and m = 0.5 (lg8[j] / 2 >= m needs lg8[j] = 1 and m = 0.5), and never for a > a0 + 1. So
//   #{q : lg8[q] >= r} = 16 a0 + 1 + #{j in 1..15 : lg8[j] >= m} + [m == 0.5],
// and the reference's answer (the largest q <= 254 with lg8[q] >= r, 0 if none) is that count
// minus one clamped to [0, 254]. The clamp also covers r >= 1 (a0 <= -1) and zero or
// subnormal r (a0 >= 126: every q counts). #{j in 1..15 : lg8[j] >= m} is a 4-step binary
// search over lg8[1..15] (descending: the predicate holds on a prefix), 16 lanes a step.
struct Lg8Fast {
  bool ok = true;
  __m512 tab, first;  // lg8[0..15]; lg8[8] (the first step's bound)
  __m512 step[4];     // step k (1..3) reads lg8[1 + min(pos + w - 1, 14)], w = 8 >> k
  explicit Lg8Fast(const float* lg8) {
    alignas(64) static const float none[256] = {0};
    if (!lg8) { ok = false; lg8 = none; }  // not an lg8 format
    ok = ok && lg8[0] == 1.0f && lg8[16] == 0.5f;
    for (int j = 1; j < 16; ++j) ok = ok && lg8[j] < lg8[j - 1] && lg8[j] > 0.5f;
    for (int q = 0; q < 256; ++q) ok = ok && lg8[q] == std::ldexp(lg8[q & 15], -(q >> 4));
    tab = _mm512_loadu_ps(lg8);
    first = _mm512_set1_ps(lg8[8]);
    for (int k = 1; k < 4; ++k) {
      const int w = 8 >> k;
      alignas(64) float t[16];
      for (int i = 0; i < 16; ++i) t[i] = lg8[1 + (i + w - 1 < 14 ? i + w - 1 : 14)];
      step[k] = _mm512_load_ps(t);
    }
  }
  // scale[i] = b32 * lg8[q], qbytes[i] = q (255 where poisoned) for ratios amax[i] / b32.
  void codes16(const float* amax, const uint8_t* poisoned, float b32, float* scale, uint8_t* qbytes) const {
    const __m512 r = _mm512_div_ps(_mm512_loadu_ps(amax), _mm512_set1_ps(b32));
    const __m512i rb = _mm512_castps_si512(r);  // r >= +0
    const __m512 m = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(rb, _mm512_set1_epi32(0x007fffff)),
                                                         _mm512_set1_epi32(0x3f000000)));
    __m512i pos = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(first, m, _CMP_GE_OQ), _mm512_set1_epi32(8));
    for (int k = 1; k < 4; ++k) {
      const __mmask16 ge = _mm512_cmp_ps_mask(_mm512_permutexvar_ps(pos, step[k]), m, _CMP_GE_OQ);
      pos = _mm512_mask_add_epi32(pos, ge, pos, _mm512_set1_epi32(8 >> k));
    }
    pos = _mm512_mask_add_epi32(pos, _mm512_cmp_ps_mask(m, _mm512_set1_ps(0.5f), _CMP_EQ_OQ), pos, _mm512_set1_epi32(1));
    const __m512i a0 = _mm512_sub_epi32(_mm512_set1_epi32(126), _mm512_srli_epi32(rb, 23));
    __m512i q = _mm512_add_epi32(_mm512_slli_epi32(a0, 4), pos);
    q = _mm512_min_epi32(_mm512_max_epi32(q, _mm512_setzero_si512()), _mm512_set1_epi32(254));
    const __m512i lq = _mm512_sub_epi32(_mm512_castps_si512(_mm512_permutexvar_ps(q, tab)),
                                        _mm512_slli_epi32(_mm512_srli_epi32(q, 4), 23));  // lg8[q & 15] * 2**-(q >> 4)
    _mm512_storeu_ps(scale, _mm512_mul_ps(_mm512_set1_ps(b32), _mm512_castsi512_ps(lq)));
    const __mmask16 bad = _mm512_test_epi32_mask(
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(poisoned))), _mm512_set1_epi32(0xff));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qbytes),
                     _mm512_cvtepi32_epi8(_mm512_mask_mov_epi32(q, bad, _mm512_set1_epi32(255))));
  }
};

// Lane j: the largest of the 16 int32 at p + 16 j (a transposing max tree: 15 pairs of
// shuffles and maxes for 16 rows instead of a horizontal reduction per row).
inline __m512i max16x16(const int32_t* p) {
  __m512i v[16];
  for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_si512(p + 16 * i);
  __m512i c[8], d[4], f[2];
  for (int i = 0; i < 8; ++i)  // lanes 0-7: row 2i's 8 partial maxes, 8-15: row 2i + 1's
    c[i] = _mm512_max_epi32(_mm512_shuffle_i32x4(v[2 * i], v[2 * i + 1], 0x44),
                            _mm512_shuffle_i32x4(v[2 * i], v[2 * i + 1], 0xee));
  for (int i = 0; i < 4; ++i)  // quarter j: row 4i + j's 4 partials
    d[i] = _mm512_max_epi32(_mm512_shuffle_i32x4(c[2 * i], c[2 * i + 1], 0x88),
                            _mm512_shuffle_i32x4(c[2 * i], c[2 * i + 1], 0xdd));
  for (int i = 0; i < 2; ++i)  // quarter j: rows 8i + j, 8i + 4 + j, 2 partials each
    f[i] = _mm512_max_epi32(_mm512_unpacklo_epi64(d[2 * i], d[2 * i + 1]), _mm512_unpackhi_epi64(d[2 * i], d[2 * i + 1]));
  // quarter j: rows j, 4 + j, 8 + j, 12 + j
  const __m512i g = _mm512_max_epi32(
      _mm512_castps_si512(_mm512_shuffle_ps(_mm512_castsi512_ps(f[0]), _mm512_castsi512_ps(f[1]), 0x88)),
      _mm512_castps_si512(_mm512_shuffle_ps(_mm512_castsi512_ps(f[0]), _mm512_castsi512_ps(f[1]), 0xdd)));
  return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), g);
}
#endif

// Returns bit 0: the input held NaN/Inf; bit 1: a rotated value overflowed fp32 or a group
// absmax exceeded `scale_max` (error mode: the caller lets the reference raise; propagate
// mode: the absmax is clamped, as the reference's _fit_range does).
template <int DT>
int rot_encode(const void* x, int64_t t_rows, int64_t ld, const int64_t* outl, const RotSpec& s, int propagate,
               float rotate_max, float scale_max, uint8_t* out, float* amax_out) {
  const int64_t e = s.e, k = s.k, group = s.group, g_count = rot_groups(s);
  uint8_t* head = out;
  uint8_t* body = out + 2 * t_rows * k;
  const int64_t ncode = rot_code_bytes(s, t_rows * e);
  uint8_t* sbytes = body + ncode;
  const int64_t plane_bytes = (t_rows * e + 7) / 8;
  if (s.bits != 4 && s.bits != 8) std::memset(body, 0, ncode);
  std::vector<float> z(e), amax(g_count), scale(g_count);
  std::vector<uint8_t> codes(e), poisoned(g_count);
  const LevelCoder coder(s.bounds, int(s.bits));
  int status = 0;
  int32_t in_amax = 0;
#ifdef LBT_AVX2
  // Direct: the first Hadamard pass reads the input row itself (scanning it, zeroing the kept
  // channels with a mask, times the signs): no fp32 copy of the row. Not in propagate mode,
  // which clamps the row first.
  const bool direct = fwht_fusable(e, s.block) && !propagate && !(LBT_SKIP & 2);
  std::vector<int32_t> keep(direct ? e : 0, -1);
  for (int64_t i = 0; i < k && direct; ++i) keep[outl[i]] = 0;
#ifdef LBT_ZMM16
  // the same as bit masks (bit c % 16 of word c / 16: channel c is not kept)
  // signs with the kept channels' zeroed: one multiply per 16 values (a kept channel becomes
  // x * 0 = +-0: the sign of a zero never reaches the payload, see below; a NaN/Inf there
  // becomes NaN, but any NaN/Inf input makes the caller discard this payload: direct is
  // error mode only)
  std::vector<float> sk(direct ? e : 0);
  for (int64_t c = 0; c < int64_t(sk.size()); ++c) sk[c] = s.signs[c];
  for (int64_t i = 0; i < k && direct; ++i) sk[outl[i]] = 0.0f;
  // Group absmax taken in the Hadamard's store loop (a group is 2**gshift whole stores of one
  // block): per group the elementwise max of |z| bits, reduced 16 groups at a time after the row.
  const bool fuse_amax = direct && group % 16 == 0 && s.block % group == 0 && !(LBT_SKIP & 4);
  int gshift = 0;
  while ((int64_t(16) << gshift) < group) ++gshift;
  std::vector<int32_t> gbuf(fuse_amax ? 16 * g_count : 0);
  const Lg8Fast lg8fast(s.fmt == 2 ? s.lg8 : nullptr);
#endif
#endif
  for (int64_t t = 0; t < t_rows; ++t) {
    const char* row = static_cast<const char*>(x) + t * ld * elem_size<DT>();
#ifdef LBT_AVX2
    // the next row streams in while this one is transformed and coded (the ZMM16 direct path
    // asks for each line next to its own load; else all of it up front: measured faster than
    // none, or than rows t + 2 or t + 4 ahead)
#ifdef LBT_ZMM16
    const char* next_row = row + (t + 1 < t_rows ? ld * elem_size<DT>() : 0);
    if (t + 1 < t_rows && !direct) {
#else
    if (t + 1 < t_rows) {
#endif
      const char* next = row + ld * elem_size<DT>();
      for (int64_t b = 0; b < e * elem_size<DT>(); b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
    }
#ifdef LBT_ZMM16
    if (direct) {  // 16 values per load; kept channels by a mask register
      for (int64_t i = 0; i < k; ++i) put_u16(head + 2 * (t * k + i), f32_to_bf16(load<DT>(row, outl[i])));
      const __m512i absm = _mm512_set1_epi32(0x7fffffff);
      __m512i vam = _mm512_setzero_si512();
      const float* skp = sk.data();
      // kept channels become x * 0 = +-0 (the reference's index_fill then times the sign gives
      // -0 where the sign is -1: the sign of a zero never reaches the payload, since the
      // rotated values are only compared and their magnitudes taken); the others x times the sign
      auto load = [&vam, row, next_row, skp, absm](int64_t at) {
        _mm_prefetch(next_row + at * elem_size<DT>(), _MM_HINT_T0);
        const __m512 v = load16<DT>(row, at);
        vam = _mm512_max_epi32(vam, _mm512_and_si512(_mm512_castps_si512(v), absm));
        return _mm512_mul_ps(v, _mm512_loadu_ps(skp + at));
      };
      if (fuse_amax) {
        __m512i gacc = _mm512_setzero_si512();
        int32_t* gb = gbuf.data();
        const int64_t glast = (int64_t(1) << gshift) - 1;
        const int gs = gshift;
        fwht_row_encode16(load, z.data(), e, s.block, s.inv_sqrt_block,
                          [&gacc, gb, glast, gs, absm](int64_t at, __m512 v) {
          gacc = _mm512_max_epi32(gacc, _mm512_and_si512(_mm512_castps_si512(v), absm));
          if (((at >> 4) & glast) == glast) {  // the group's last 16 values
            _mm512_storeu_si512(gb + 16 * ((at >> 4) >> gs), gacc);
            gacc = _mm512_setzero_si512();
          }
        });
      } else {
        fwht_row_encode16(load, z.data(), e, s.block, s.inv_sqrt_block, NoSink());
      }
      const int32_t vm = _mm512_reduce_max_epi32(vam);
      if (vm >= 0x7f800000) status |= 1;
      else in_amax = in_amax > vm ? in_amax : vm;
    } else
#endif
    if (direct) {
      for (int64_t i = 0; i < k; ++i) put_u16(head + 2 * (t * k + i), f32_to_bf16(load<DT>(row, outl[i])));
      const __m256i absm = _mm256_set1_epi32(0x7fffffff);
      __m256i vam = _mm256_setzero_si256();
      const int32_t* kp = keep.data();
      const float* sg = s.signs;
      // kept channels: +0 (the reference's index_fill), then times the sign, as the others.
      // The scan keeps only the largest |x| as bits: a NaN/Inf is above every finite value,
      // and once one is seen the finite maximum no longer matters (the caller re-checks).
      fwht_row_fused([&vam, row, kp, sg, absm](int64_t at) {
        const __m256 v = load8<DT>(row, at);
        vam = _mm256_max_epi32(vam, _mm256_and_si256(_mm256_castps_si256(v), absm));
        const __m256 m = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kp + at)));
        return _mm256_mul_ps(_mm256_and_ps(v, m), _mm256_loadu_ps(sg + at));
      }, z.data(), nullptr, z.data(), false, e, s.block, s.inv_sqrt_block);
      const int32_t vm = hmax_epi32(vam);
      if (vm >= 0x7f800000) status |= 1;
      else in_amax = in_amax > vm ? in_amax : vm;
    } else
#endif
    {
    int64_t c0 = 0;
#ifdef LBT_AVX2
    {
      const __m256i absm = _mm256_set1_epi32(0x7fffffff);
      __m256i vam = _mm256_setzero_si256();
      for (; c0 + 8 <= e; c0 += 8) {  // the largest |x| as bits, as in the direct path
        const __m256 v = load8<DT>(row, c0);
        _mm256_storeu_ps(z.data() + c0, v);
        vam = _mm256_max_epi32(vam, _mm256_and_si256(_mm256_castps_si256(v), absm));
      }
      const int32_t vm = hmax_epi32(vam);
      if (vm >= 0x7f800000) status |= 1;
      else in_amax = in_amax > vm ? in_amax : vm;
    }
#endif
    for (int64_t c = c0; c < e; ++c) z[c] = load<DT>(row, c);
    for (int64_t c = c0; c < e; ++c) {
      const int32_t a = int32_t(bits_of(z[c]) & 0x7fffffffu);
      const int32_t bad = a >= 0x7f800000;
      status |= bad;
      in_amax = (!bad && a > in_amax) ? a : in_amax;
    }
    for (int64_t i = 0; i < k; ++i) {
      put_u16(head + 2 * (t * k + i), f32_to_bf16(z[outl[i]]));
      z[outl[i]] = 0.0f;
    }
    if (propagate)
      for (int64_t c = 0; c < e; ++c) {
        const float v = z[c];
        const bool big = std::fabs(v) > rotate_max && finite_bits(bits_of(v));
        z[c] = big ? (v < 0 ? -rotate_max : rotate_max) : v;
      }
#ifdef LBT_AVX2
    const bool fused = fwht_fusable(e, s.block);
    if (fused && !(LBT_SKIP & 2)) {
      const float* zp = z.data();
      const float* sg = s.signs;
      fwht_row_fused([zp, sg](int64_t at) { return _mm256_mul_ps(_mm256_loadu_ps(zp + at), _mm256_loadu_ps(sg + at)); },
                     z.data(), nullptr, z.data(), false, e, s.block, s.inv_sqrt_block);
    }
    if (!fused && !(LBT_SKIP & 2))
#else
    if (!(LBT_SKIP & 2))
#endif
    {
      for (int64_t c = 0; c < e; ++c) z[c] = z[c] * s.signs[c];
#ifdef LBT_AVX2
      if (!fwht_row_avx2(z.data(), e, s.block, s.inv_sqrt_block))
#endif
        fwht_row(z.data(), e, s.block, s.inv_sqrt_block);
    }
    }  // not direct
    int64_t g_done = 0;
#ifdef LBT_ZMM16
    if (fuse_amax && direct) {  // 16 groups a step: the largest |z| bits per group from the store loop
      for (; g_done < g_count; g_done += 16) {
        const int64_t m = g_count - g_done < 16 ? g_count - g_done : 16;
        const __mmask16 valid = __mmask16((1u << m) - 1);
        __m512i a;
        if (m == 16) {
          a = max16x16(gbuf.data() + 16 * g_done);
        } else {
          alignas(64) int32_t tmp[16] = {0};
          for (int64_t j = 0; j < m; ++j) tmp[j] = _mm512_reduce_max_epi32(_mm512_loadu_si512(gbuf.data() + 16 * (g_done + j)));
          a = _mm512_load_si512(tmp);
        }
        // NaN/Inf bits are above every finite one: such a group is rescanned for its finite max
        __mmask16 bad = __mmask16(_mm512_cmpge_epi32_mask(a, _mm512_set1_epi32(0x7f800000)) & valid);
        if (bad) {
          alignas(64) int32_t tmp[16];
          _mm512_store_si512(tmp, a);
          for (int j = 0; j < 16; ++j) {
            if (!(bad >> j & 1)) continue;
            int32_t f = 0;
            const int32_t* zb = reinterpret_cast<const int32_t*>(z.data() + (g_done + j) * group);
            for (int64_t i = 0; i < group; ++i) {
              const int32_t u = zb[i] & 0x7fffffff;
              f = (u < 0x7f800000 && u > f) ? u : f;
            }
            tmp[j] = f;
          }
          a = _mm512_load_si512(tmp);
          if (!(status & 1)) status |= 2;  // finite input, non-finite rotation: fp32 overflow
        }
        __m512 am = _mm512_castsi512_ps(a);
        const __mmask16 big = __mmask16(_mm512_cmp_ps_mask(am, _mm512_set1_ps(scale_max), _CMP_GT_OQ) & valid);
        if (big) {
          status |= 2;
          am = _mm512_mask_mov_ps(am, big, _mm512_set1_ps(scale_max));
        }
        _mm512_mask_storeu_ps(amax.data() + g_done, valid, am);
        // (vpmovdb with a mask: AVX-512F only, no AVX-512BW needed)
        _mm512_mask_cvtepi32_storeu_epi8(poisoned.data() + g_done, valid, _mm512_maskz_mov_epi32(bad, _mm512_set1_epi32(1)));
      }
    }
#endif
    for (int64_t g = g_done; g < g_count; ++g) {
      const int64_t c0 = g * group, n = (c0 + group <= e ? group : e - c0);
      if (LBT_SKIP & 4) { amax[g] = 1.0f; poisoned[g] = 0; continue; }
      int32_t a = 0, bad = 0;
      const int32_t* zb = reinterpret_cast<const int32_t*>(z.data() + c0);
      int64_t i = 0;
#ifdef LBT_AVX2
      if (n % 8 == 0) {  // the largest |z| as bits (NaN/Inf bits are above every finite one)
        const __m256i absm = _mm256_set1_epi32(0x7fffffff);
        __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
        for (; i + 16 <= n; i += 16) {
          m0 = _mm256_max_epi32(m0, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(zb + i)), absm));
          m1 = _mm256_max_epi32(m1, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(zb + i + 8)), absm));
        }
        for (; i < n; i += 8)
          m0 = _mm256_max_epi32(m0, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(zb + i)), absm));
        a = hmax_epi32(_mm256_max_epi32(m0, m1));
        if (a >= 0x7f800000) { a = 0; i = 0; }  // a NaN/Inf: the finite ones' max below
      }
#endif
      for (; i < n; ++i) {
        int32_t u = zb[i] & 0x7fffffff;
        const int32_t nf = u >= 0x7f800000;
        bad |= nf;
        u = nf ? 0 : u;
        a = a > u ? a : u;
      }
      float am = float_of(uint32_t(a));
      if (bad && !(status & 1)) status |= 2;  // finite input, non-finite rotation: fp32 overflow
      if (am > scale_max) {
        status |= 2;
        am = scale_max;
      }
      amax[g] = am;
      poisoned[g] = uint8_t(bad);
    }
    // scales
    if (LBT_SKIP & 8) {
      for (int64_t g = 0; g < g_count; ++g) scale[g] = amax[g];
    } else if (s.fmt == 2) {
      float top = 0.0f;
      for (int64_t g = 0; g < g_count; ++g) top = amax[g] > top ? amax[g] : top;
      uint16_t base = f32_to_bf16(top);
      if (bf16_to_f32(base) < top) base = uint16_t(base + 1);
      const float b32 = (base & 0x7fffu) == 0 ? 1.0f : bf16_to_f32(base);
      uint8_t* qrow = sbytes + t * g_count;
      int64_t g = 0;
#ifdef LBT_ZMM16
      for (; lg8fast.ok && g + 16 <= g_count; g += 16)
        lg8fast.codes16(amax.data() + g, poisoned.data() + g, b32, scale.data() + g, qrow + g);
#endif
#ifdef LBT_AVX2
      for (; g + 8 <= g_count; g += 8)
        lg8_codes8(amax.data() + g, poisoned.data() + g, b32, s.lg8, scale.data() + g, qrow + g);
#endif
      for (; g < g_count; ++g) {
        const int q = lg8_code(amax[g] / b32, s.lg8);
        scale[g] = b32 * s.lg8[q];
        qrow[g] = poisoned[g] ? uint8_t(255) : uint8_t(q);
      }
      put_u16(sbytes + t_rows * g_count + 2 * t, base);
    } else if (s.fmt == 0) {
      for (int64_t g = 0; g < g_count; ++g) {
        const uint16_t h = f32_to_f16(amax[g]);
        scale[g] = (h & 0x7fffu) == 0 ? 1.0f : f16_to_f32(h);
        put_u16(sbytes + 2 * (t * g_count + g), poisoned[g] ? uint16_t(0x7e00) : h);
      }
    } else {
      for (int64_t g = 0; g < g_count; ++g) {
        const float a = amax[g] < 1.1754943508222875e-38f ? 1.1754943508222875e-38f : amax[g];
        int e2;
        const float m = std::frexp(a, &e2);
        int ex = e2 - (m == 0.5f ? 1 : 0);
        ex = ex < -127 ? -127 : (ex > 127 ? 127 : ex);
        scale[g] = s.exp2tab[ex + 127];
        sbytes[t * g_count + g] = poisoned[g] ? uint8_t(255) : uint8_t(ex + 127);
      }
    }
    // codes: y = z / scale, clamped to [-1, 1]; code = #{bounds !>= y} (torch.bucketize)
    for (int64_t g = 0; g < g_count; ++g) {
      const int64_t c0 = g * group, n = (c0 + group <= e ? group : e - c0);
      if (s.bits == 4 && coder.code_nibbles(z.data() + c0, n, scale[g], !poisoned[g], t * e + c0, body)) continue;
      coder.code(z.data() + c0, n, scale[g], !poisoned[g], codes.data() + c0);
      // 4-bit: each group packed after it (a group starting on an odd index completes the
      // byte its predecessor started)
      if (s.bits == 4 && !(LBT_SKIP & 64))
        pack_nibbles(reinterpret_cast<const int8_t*>(codes.data() + c0), n, t * e + c0, body);  // codes 0..15
    }
    if (LBT_SKIP & 64) {
    } else if (s.bits == 4) {
    } else if (s.bits == 8) {
      std::memcpy(body + t * e, codes.data(), e);
    } else {
      put_bitplanes(codes.data(), e, t * e, plane_bytes, int(s.bits), body);
    }
  }
  *amax_out = float_of(uint32_t(in_amax));
  return status;
}

void rot_decode_sum(const uint8_t* const* payloads, int n, int64_t t_rows, const int64_t* const* outls,
                    const RotSpec& s, SumOut& out) {
  const int64_t e = s.e, k = s.k, group = s.group, g_count = rot_groups(s);
  const int64_t ncode = rot_code_bytes(s, t_rows * e);
  const int64_t plane_bytes = (t_rows * e + 7) / 8;
  std::vector<float> z(e), scale(g_count), kept(k);
  std::vector<uint8_t> codes(e);
#ifdef LBT_AVX2
  const Table8 levels8(s.levels, 1 << s.bits);
  std::vector<float> post(e);  // signs * 1/sqrt(block), for the fused last pass
  for (int64_t c = 0; c < e; ++c) post[c] = s.signs[c] * s.inv_sqrt_block;
  const bool fused = fwht_fusable(e, s.block) && s.group % 8 == 0;
  std::vector<float> sc8(e / 8 + 1);  // the group scale of each 8 values
  // 4-bit codes: the fused pass reads each 8 codes (4 bytes: code 2i low nibble of byte i)
  // straight from the payload; rows start on a byte (t * e is even: e is a multiple of 64).
  const bool nib_direct = fused && s.bits == 4 && !(LBT_SKIP & 512);
  const __m256i nib_shift = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
#ifdef LBT_ZMM16
  alignas(64) float lv_buf[64] = {0};
  for (int i = 0; i < 64 && i < (1 << s.bits); ++i) lv_buf[i] = s.levels[i];
  const __m512 levels16 = _mm512_load_ps(lv_buf);
  const __m512 levels_z[4] = {levels16, _mm512_load_ps(lv_buf + 16), _mm512_load_ps(lv_buf + 32),
                              _mm512_load_ps(lv_buf + 48)};  // entries 0-63 (codes of <= 6 bits)
#ifdef __AVX512VBMI__
  // multishift control: byte 0 of dword lane i (byte 4 (i % 2) of qword i / 2) from bit 4i
  const __m512i nib_ctl = _mm512_set_epi64(0x3c00000038ll, 0x3400000030ll, 0x2c00000028ll, 0x2400000020ll,
                                           0x1c00000018ll, 0x1400000010ll, 0x0c00000008ll, 0x0400000000ll);
#endif
#endif
#else
  const bool nib_direct = false;
#endif
  for (int64_t t = 0; t < t_rows; ++t) {
    float* orow = out.row(t);
    for (int r = 0; r < n; ++r) {
      const uint8_t* head = payloads[r];
      const uint8_t* body = payloads[r] + 2 * t_rows * k;
      const uint8_t* sbytes = body + ncode;
      if (LBT_SKIP & 128) {
      } else if (s.bits == 4 && nib_direct) {  // the fused pass reads the nibbles itself
      } else if (s.bits == 4) {
        const int64_t f = t * e;
        int64_t c = 0;
        if (f & 1) { codes[0] = uint8_t(body[f >> 1] >> 4); c = 1; }
#ifdef LBT_AVX2
        const __m128i m4 = _mm_set1_epi8(0x0f);
        for (; c + 32 <= e; c += 32) {  // (f + c) even: 16 bytes -> 32 codes, low nibble first
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(body + ((f + c) >> 1)));
          const __m128i lo = _mm_and_si128(b, m4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(codes.data() + c), _mm_unpacklo_epi8(lo, hi));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(codes.data() + c + 16), _mm_unpackhi_epi8(lo, hi));
        }
#endif
        for (; c < e; ++c) codes[c] = uint8_t((body[(f + c) >> 1] >> (((f + c) & 1) * 4)) & 0x0f);
      } else if (s.bits == 8) {
        std::memcpy(codes.data(), body + t * e, e);
      } else {
        get_bitplanes(body, e, t * e, plane_bytes, int(s.bits), codes.data());
      }
      const float base = s.fmt == 2 ? bf16_to_f32(get_u16(sbytes + t_rows * g_count + 2 * t)) : 0.0f;
      for (int64_t g = 0; g < g_count; ++g) {
        if (s.fmt == 2) {
          const uint8_t q = sbytes[t * g_count + g];
          scale[g] = q == 255 ? QNAN : base * s.lg8[q];
        } else if (s.fmt == 0) {
          scale[g] = f16_to_f32(get_u16(sbytes + 2 * (t * g_count + g)));
        } else {
          const uint8_t b = sbytes[t * g_count + g];
          scale[g] = b == 255 ? QNAN : s.exp2tab[b];
        }
      }
#ifdef LBT_AVX2
      if (fused && !(LBT_SKIP & 512)) {
        // One pass does the level lookup and all butterfly stages up to 32, one more the rest,
        // the signs and the sum into the output row; the kept channels then get rank r's bf16
        // value added to the row's sum before this rank.
        for (int64_t g = 0; g < g_count; ++g)
          for (int64_t j = 0; j < group / 8; ++j) sc8[g * (group / 8) + j] = scale[g];
        for (int64_t i = 0; i < k; ++i) kept[i] = orow[outls[r][i]];
        const uint8_t* cp = codes.data();
        const float* sp = sc8.data();
        const Table8& lv = levels8;
#if defined(LBT_ZMM16) && defined(__AVX512VBMI__)  // vpmultishiftqb is VBMI, not AVX-512F (Skylake-SP has none)
        if (nib_direct && s.group % 16 == 0) {  // 16 codes (8 bytes) per load: nibble i picked by a multishift
          const uint8_t* np = body + (t * e >> 1);
          const __m512 lv16 = levels16;
          const __m512i ctl = nib_ctl;
          fwht_row_fused16([np, sp, lv16, ctl](int64_t at) {
            int64_t w;
            std::memcpy(&w, np + (at >> 1), 8);
            // dword lane i's low byte = bits 4i.. of w; vpermps reads only its index bits 0-3
            const __m512i idx = _mm512_multishift_epi64_epi8(ctl, _mm512_set1_epi64(w));
            return _mm512_mul_ps(_mm512_permutexvar_ps(idx, lv16), _mm512_set1_ps(sp[at >> 3]));
          }, post.data(), orow, r > 0, e, s.block, s.inv_sqrt_block);
        } else
#endif
#ifdef LBT_ZMM16
        if (!nib_direct && s.bits <= 6 && s.group % 16 == 0) {  // 16 byte codes per load, a <= 64-entry table
          const __m512 t0 = levels16, t1 = levels_z[1], t2 = levels_z[2], t3 = levels_z[3];
          const bool wide = s.bits > 5;
          fwht_row_fused16([cp, sp, t0, t1, t2, t3, wide](int64_t at) {
            const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cp + at)));
            __m512 lv = _mm512_permutex2var_ps(t0, idx, t1);  // index bits 0-4: entries 0-31
            if (wide)  // bit 5: entries 32-63
              lv = _mm512_mask_mov_ps(lv, _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32)),
                                      _mm512_permutex2var_ps(t2, idx, t3));
            return _mm512_mul_ps(lv, _mm512_set1_ps(sp[at >> 3]));
          }, post.data(), orow, r > 0, e, s.block, s.inv_sqrt_block);
        } else
#endif
        if (nib_direct) {
          const uint8_t* np = body + (t * e >> 1);
          fwht_row_fused([np, sp, &lv, nib_shift](int64_t at) {
            uint32_t w;
            std::memcpy(&w, np + (at >> 1), 4);
            __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi32(int32_t(w)), nib_shift);
#ifndef __AVX512VL__
            idx = _mm256_and_si256(idx, _mm256_set1_epi32(15));  // the 16-entry permute uses bits 0-3
#endif
            return _mm256_mul_ps(lv.at(idx), _mm256_set1_ps(sp[at >> 3]));
          }, z.data(), post.data(), orow, r > 0, e, s.block, s.inv_sqrt_block);
        } else {
          fwht_row_fused([cp, sp, &lv](int64_t at) {
            const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(cp + at)));
            return _mm256_mul_ps(lv.at(idx), _mm256_set1_ps(sp[at >> 3]));
          }, z.data(), post.data(), orow, r > 0, e, s.block, s.inv_sqrt_block);
        }
        for (int64_t i = 0; i < k; ++i) {
          const float v = bf16_to_f32(get_u16(head + 2 * (t * k + i)));
          orow[outls[r][i]] = r == 0 ? v : kept[i] + v;
        }
        continue;
      }
#endif
      for (int64_t g = 0; g < g_count && !(LBT_SKIP & 256); ++g) {
        const int64_t c0 = g * group, cnt = (c0 + group <= e ? group : e - c0);
        const float sc = scale[g];
        int64_t i = 0;
#ifdef LBT_AVX2
        const __m256 vs = _mm256_set1_ps(sc);
        for (; i + 8 <= cnt; i += 8) {
          const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes.data() + c0 + i)));
          _mm256_storeu_ps(z.data() + c0 + i, _mm256_mul_ps(levels8.at(idx), vs));
        }
#endif
        for (; i < cnt; ++i) z[c0 + i] = s.levels[codes[c0 + i]] * sc;
      }
#ifdef LBT_AVX2
      if (LBT_SKIP & 512) {
        if (r == 0) std::memcpy(orow, z.data(), 4 * e);
        else for (int64_t c = 0; c < e; ++c) orow[c] = orow[c] + z[c];
        continue;
      }
      if (!fwht_row_avx2(z.data(), e, s.block, s.inv_sqrt_block))
#endif
        fwht_row(z.data(), e, s.block, s.inv_sqrt_block);
      for (int64_t c = 0; c < e; ++c) z[c] = z[c] * s.signs[c];
      for (int64_t i = 0; i < k; ++i) z[outls[r][i]] = bf16_to_f32(get_u16(head + 2 * (t * k + i)));
      if (r == 0) std::memcpy(orow, z.data(), 4 * e);
      else for (int64_t c = 0; c < e; ++c) orow[c] = orow[c] + z[c];
    }
    if (!(LBT_SKIP & 1024)) out.finish(t);
  }
}

}  // namespace

extern "C" {

int lbt_abi_version() { return 6; }

// Which hand-written vector paths this build has: bit 0 AVX2, bit 1 AVX-512, bit 2 GFNI
// bit-planes (the tests check that a CPU with them got them: a -march=native build that
// fails to compile falls back to the portable one silently otherwise).
int lbt_features() {
  int f = 0;
#ifdef LBT_AVX2
  f |= 1;
#endif
#ifdef LBT_AVX512
  f |= 2;
#endif
#ifdef LBT_GFNI
  f |= 4;
#endif
  return f;
}

// Test hook: the codes the rot encoders give n rotated values z of one group with scale sc
// (finite: the group holds no NaN/Inf), for `bits` (bounds: 2**bits - 1 ascending floats).
void lbt_rot_codes(const float* z, int64_t n, float sc, int finite, const float* bounds, int bits, uint8_t* codes) {
  const LevelCoder coder(bounds, bits);
  coder.code(z, n, sc, finite != 0, codes);
}

// Test hook: the lg8 codes (and scales) the rot encoders give n group absmaxes under the bf16
// base b32, 8 groups at a time where the vector units allow (as in a row), the rest one by one.
void lbt_lg8_codes(const float* amax, int64_t n, float b32, const float* lg8, float* scale, uint8_t* q) {
  std::vector<uint8_t> poisoned(n, 0);
  int64_t g = 0;
#ifdef LBT_ZMM16
  const Lg8Fast fast(lg8);
  for (; fast.ok && g + 16 <= n; g += 16) fast.codes16(amax + g, poisoned.data() + g, b32, scale + g, q + g);
#endif
#ifdef LBT_AVX2
  for (; g + 8 <= n; g += 8) lg8_codes8(amax + g, poisoned.data() + g, b32, lg8, scale + g, q + g);
#endif
  for (; g < n; ++g) {
    const int c = lg8_code(amax[g] / b32, lg8);
    scale[g] = b32 * lg8[c];
    q[g] = uint8_t(c);
  }
}

// Encoders: *amax = the largest |x| among the finite inputs (the caller's range check).
int lbt_static_encode(const void* x, int dtype, int64_t t, int64_t e, int64_t ld, const int64_t* outl, int64_t k,
                      const float* inv_scale, int bits, uint8_t* out, float* amax) {
  switch (dtype) {
    case 0: return static_encode<0>(x, t, e, ld, outl, k, inv_scale, bits, out, amax);
    case 1: return static_encode<1>(x, t, e, ld, outl, k, inv_scale, bits, out, amax);
    default: return static_encode<2>(x, t, e, ld, outl, k, inv_scale, bits, out, amax);
  }
}

int lbt_static_encode_feedback(const void* x, int dtype, const float* carry, int64_t t, int64_t e, int64_t ld,
                               const int64_t* outl, int64_t k, const float* inv_scale, const float* scale, int bits,
                               uint8_t* out, float* next, float* amax) {
  switch (dtype) {
    case 0: return static_encode_feedback<0>(x, carry, t, e, ld, outl, k, inv_scale, scale, bits, out, next, amax);
    case 1: return static_encode_feedback<1>(x, carry, t, e, ld, outl, k, inv_scale, scale, bits, out, next, amax);
    default: return static_encode_feedback<2>(x, carry, t, e, ld, outl, k, inv_scale, scale, bits, out, next, amax);
  }
}

// Decoders: `out` has dtype `out_dtype` (0 fp32, 1 bf16, 2 fp16), [t, e] contiguous.
void lbt_static_decode_sum(const uint8_t* const* payloads, const float* const* scales, int n, int64_t t, int64_t e,
                           const int64_t* const* outls, int64_t k, int bits, void* out, int out_dtype) {
  SumOut o(out, out_dtype, e, t);
  static_decode_sum(payloads, scales, n, t, e, outls, k, bits, o);
}

int lbt_group_encode(const void* x, int dtype, int64_t t, int64_t e, int64_t ld, int64_t group, uint8_t* out,
                     float* amax) {
  switch (dtype) {
    case 0: return group_encode<0>(x, t, e, ld, group, out, amax);
    case 1: return group_encode<1>(x, t, e, ld, group, out, amax);
    default: return group_encode<2>(x, t, e, ld, group, out, amax);
  }
}

void lbt_group_decode_sum(const uint8_t* const* payloads, int n, int64_t t, int64_t e, int64_t group, void* out,
                          int out_dtype) {
  SumOut o(out, out_dtype, e, t);
  group_decode_sum(payloads, n, t, e, group, o);
}

// spec: e, k, group, block, bits, fmt as int64[6]; tables: signs, levels, bounds, lg8, exp2tab.
static RotSpec make_spec(const int64_t* spec, float inv_sqrt_block, const float* const* tables) {
  return RotSpec{spec[0], spec[1], spec[2], spec[3], spec[4], spec[5], inv_sqrt_block,
                 tables[0], tables[1], tables[2], tables[3], tables[4]};
}

int lbt_rot_encode(const void* x, int dtype, int64_t t, int64_t ld, const int64_t* outl, const int64_t* spec,
                   float inv_sqrt_block, const float* const* tables, int propagate, float rotate_max,
                   float scale_max, uint8_t* out, float* amax) {
  const RotSpec s = make_spec(spec, inv_sqrt_block, tables);
  switch (dtype) {
    case 0: return rot_encode<0>(x, t, ld, outl, s, propagate, rotate_max, scale_max, out, amax);
    case 1: return rot_encode<1>(x, t, ld, outl, s, propagate, rotate_max, scale_max, out, amax);
    default: return rot_encode<2>(x, t, ld, outl, s, propagate, rotate_max, scale_max, out, amax);
  }
}

// Error feedback's next carry: sent - decode(payload), fp32 [t, e], +0.0 where not finite, with
// the decode of the matching *_decode_sum of one payload (so the same bits as decode).
void lbt_group_decode_error(const uint8_t* payload, int64_t t, int64_t e, int64_t group, const float* sent,
                            float* next) {
  SumOut o(next, sent, e);
  group_decode_sum(&payload, 1, t, e, group, o);
}
void lbt_rot_decode_error(const uint8_t* payload, int64_t t, const int64_t* outl, const int64_t* spec,
                          float inv_sqrt_block, const float* const* tables, const float* sent, float* next) {
  const RotSpec s = make_spec(spec, inv_sqrt_block, tables);
  SumOut o(next, sent, s.e);
  rot_decode_sum(&payload, 1, t, &outl, s, o);
}
void lbt_rot_decode_sum(const uint8_t* const* payloads, int n, int64_t t, const int64_t* const* outls,
                        const int64_t* spec, float inv_sqrt_block, const float* const* tables, void* out,
                        int out_dtype) {
  const RotSpec s = make_spec(spec, inv_sqrt_block, tables);
  SumOut o(out, out_dtype, s.e, t);
  rot_decode_sum(payloads, n, t, outls, s, o);
}

// ECSQ bit packing (lowbit_tp/codecs/ecsq.py: pack_rows / unpack_rows). Integers only, so
// the bytes and codes are the reference's by construction; the reference loops over the E
// positions of all rows at once in torch, which costs ~0.7 s per 1k-token row block.
//
// Pack: the codewords of q [t, e] (int64, in [-half, half]), MSB first, row after row in
// c-byte slots, zero-padded. Returns -1, or the first row that does not fit its slot, or
// -2 - row for a code outside [-half, half] (nothing is promised about out then).
int64_t lbt_ecsq_pack(const int64_t* q, int64_t t, int64_t e, const int64_t* lengths, const int64_t* codes,
                      int64_t half, int64_t c, uint8_t* out) {
  const int64_t nbits = 8 * c;
  for (int64_t r = 0; r < t; ++r) {
    uint8_t* slot = out + r * c;
    std::memset(slot, 0, (size_t)c);
    const int64_t* qr = q + r * e;
    uint64_t acc = 0;  // pending bits, right-aligned
    int nacc = 0;
    int64_t pos = 0, byte = 0;
    for (int64_t i = 0; i < e; ++i) {
      const int64_t v = qr[i];
      if (v < -half || v > half) return -2 - r;
      const int64_t l = lengths[v + half];
      pos += l;
      if (pos > nbits) return r;
      acc = (acc << l) | (uint64_t)codes[v + half];
      nacc += (int)l;
      while (nacc >= 8) {
        nacc -= 8;
        slot[byte++] = (uint8_t)(acc >> nacc);
      }
      acc &= (nacc ? ((uint64_t)1 << nacc) - 1 : 0);
    }
    if (nacc) slot[byte] = (uint8_t)(acc << (8 - nacc));
  }
  return -1;
}

// Unpack: the e codes (symbol - half, int32) of each c-byte slot of slots [t, c], reading
// width-bit windows (zeros past the slot) through the (symbol, length) table of 2^width
// entries. Returns -1, or the first row whose codewords run past its slot.
int64_t lbt_ecsq_unpack(const uint8_t* slots, int64_t t, int64_t c, int64_t e, const int32_t* sym,
                        const int32_t* len, int width, int64_t half, int32_t* out) {
  const int64_t nbits = 8 * c;
  const uint64_t mask = ((uint64_t)1 << width) - 1;
  for (int64_t r = 0; r < t; ++r) {
    const uint8_t* slot = slots + r * c;
    int32_t* o = out + r * e;
    uint64_t acc = 0;  // bits not yet consumed, right-aligned
    int nacc = 0;
    int64_t next = 0, pos = 0;  // next byte to load; bits consumed
    for (int64_t i = 0; i < e; ++i) {
      while (nacc < width) {
        acc = (acc << 8) | (next < c ? slot[next] : 0);
        ++next;
        nacc += 8;
      }
      const uint64_t win = (acc >> (nacc - width)) & mask;
      const int32_t l = len[win];
      o[i] = sym[win] - (int32_t)half;
      nacc -= l;
      acc &= (nacc ? ((uint64_t)1 << nacc) - 1 : 0);
      pos += l;
    }
    if (pos > nbits) return r;
  }
  return -1;
}

// ECSQ rate control (lowbit_tp/codecs/ecsq.py: choose_steps), per row of finite fp32 z [t, e]:
// the largest j in [0, nsteps) whose step d_j = max(bf16(base * table[j]), 2^-126) (base =
// 4 * absmax rounded up to bf16, 1 for a zero row) codes every value within [-half, half]
// in at most `budget` bits of `lengths` (indexed q + half). Fitting is monotone in j (d_j
// never grows, |q| never shrinks, lengths never shrink with |q|), so any bracketed search
// finds the reference's j, whatever its order; j = 0 codes every value as 0 and is taken
// as fitting, as there. Writes d (0 for a zero row) and the codes q (int64).
static inline int64_t ecsq_quantize(float r, float offset, bool nearest) {
  // |r| <= 2^14 here (d >= 4 * absmax * 2^-16); a bound anyway, so a cast is never undefined
  if (!(std::fabs(r) < 0x1p30f)) return r < 0.0f ? -(int64_t(1) << 30) : (int64_t(1) << 30);
  if (nearest) return (int64_t)std::nearbyint(r);
  const float m = std::floor(std::fabs(r) + offset);
  return r < 0.0f ? -(int64_t)m : (r > 0.0f ? (int64_t)m : 0);
}

void lbt_ecsq_steps(const float* z, int64_t t, int64_t e, const float* table, int64_t nsteps,
                    const int64_t* lengths, int64_t half, int64_t budget, float offset, int nearest,
                    float* d_out, int64_t* q_out) {
  const double per = double(budget) / double(e > 0 ? e : 1);
  for (int64_t r = 0; r < t; ++r) {
    const float* zr = z + r * e;
    float amax = 0.0f;
    double ss = 0.0;
    for (int64_t i = 0; i < e; ++i) {
      amax = std::fmax(amax, std::fabs(zr[i]));
      ss += double(zr[i]) * double(zr[i]);
    }
    const float four = amax * 4.0f;
    uint16_t b = f32_to_bf16(four);
    if (bf16_to_f32(b) < four) b = uint16_t(b + 1);
    const float base = bf16_to_f32(b) > 0.0f ? bf16_to_f32(b) : 1.0f;
    auto step = [&](int64_t j) { return std::fmax(bf16_to_f32(f32_to_bf16(base * table[j])), 0x1p-126f); };
    // (fits, coded bits with the codes clamped to [-half, half]) at candidate j
    auto eval = [&](int64_t j, int64_t* used_out) {
      const float d = step(j);
      const bool in_range = std::llabs(ecsq_quantize(amax / d, offset, nearest)) <= half;
      int64_t used = 0;
      for (int64_t i = 0; i < e; ++i) {
        int64_t q = ecsq_quantize(zr[i] / d, offset, nearest);
        q = q < -half ? -half : (q > half ? half : q);
        used += lengths[q + half];
      }
      *used_out = used;
      return in_range && used <= budget;
    };
    // Search order only (the answer is the unique largest fitting j): start from a Gaussian
    // rate guess (a row of rms s codes at about 2.05 - log2(d / s) bits per value), then
    // alternate secant steps (about one bit per value per 64 j) and bisection.
    const double rms = std::sqrt(ss / double(e > 0 ? e : 1));
    double g = 64.0 * std::log2(double(base) / (std::fmax(rms, 1e-30) * std::exp2(2.05 - per)));
    int64_t guess = std::isfinite(g) ? (int64_t)std::llround(std::fmin(std::fmax(g, -1e9), 1e9)) : nsteps / 2;
    int64_t lo = 0, hi = nsteps;  // lo fits (j = 0 codes every value as 0), hi does not
    int64_t last_j = 0, last_used = 0;
    for (int it = 0; hi - lo > 1; ++it) {
      int64_t j;
      if (it == 0) j = guess;
      else if (it % 2 == 1) j = last_j + (int64_t)std::floor(double(budget - last_used) * 64.0 / double(e > 0 ? e : 1));
      else j = lo + (hi - lo) / 2;
      j = j < lo + 1 ? lo + 1 : (j > hi - 1 ? hi - 1 : j);
      int64_t used;
      if (eval(j, &used)) lo = j; else hi = j;
      last_j = j;
      last_used = used;
    }
    const float d = step(lo);
    int64_t* qr = q_out + r * e;
    for (int64_t i = 0; i < e; ++i) qr[i] = ecsq_quantize(zr[i] / d, offset, nearest);
    d_out[r] = amax == 0.0f ? 0.0f : d;
  }
}

// The rotation of the ECSQ codec (the reference's F.fwht with its random signs): `pre` 1 gives
// fwht(x * signs) (the encoder's), 0 gives fwht(x) * signs (the decoder's), fp32 [t, e] rows.
void lbt_ecsq_rotate(const float* x, int64_t t, int64_t e, const float* signs, int pre, int64_t block,
                     float inv_sqrt, float* out) {
  for (int64_t r = 0; r < t; ++r) {
    float* y = out + r * e;
    const float* xr = x + r * e;
    if (pre)
      for (int64_t c = 0; c < e; ++c) y[c] = xr[c] * signs[c];
    else
      std::memcpy(y, xr, sizeof(float) * (size_t)e);
#ifdef LBT_AVX2
    if (!fwht_row_avx2(y, e, block, inv_sqrt))
#endif
      fwht_row(y, e, block, inv_sqrt);
    if (!pre)
      for (int64_t c = 0; c < e; ++c) y[c] = y[c] * signs[c];
  }
}

}  // extern "C"
