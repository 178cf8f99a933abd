#pragma once
// NVFP4 arithmetic shared by the CPU reference and the CUDA kernels, so that both produce the same bits.
//
// Everything here follows docs/nvfp4.md, 'Scale computation' (TransformerEngine's default, non
// fast-math path): FP32 throughout, the block scale as amax_b * (S_enc * fl32(1/6)), the element scale from the
// *quantized* block scale, E2M1 round-to-nearest-even with saturation. Every product below is a single
// IEEE multiply: no expression has the shape a*b+c with an inexact product, so FMA contraction by nvcc
// cannot change a result (the one a*b+c, in stochastic rounding, has an exact product).
//
// The functions are plain C++ (bit manipulation, no intrinsics) so that g++ and nvcc compile the same
// source; nothing depends on the host's rounding mode beyond the IEEE default.
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#endif

#if defined(__CUDACC__)
#define NVFP4_HD __host__ __device__ __forceinline__
#else
#define NVFP4_HD inline
#endif

namespace vlcore::nvfp4 {

constexpr int kBlock = 16;                   // elements per scale block (1x16, or 16x16 tiles)
constexpr float kE2m1Max = 6.0f;
constexpr float kE4m3Max = 448.0f;
constexpr float kFp4Fp8Max = 2688.0f;        // 6 * 448: maps the tensor amax onto the largest code x scale
constexpr uint32_t kDefaultSignMask = 0xD7E8u;  // TE's fixed wgrad RHT signs: bit i set where s_i = -1

NVFP4_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

NVFP4_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// Round to nearest integer, ties to even (the default rounding mode on both sides).
NVFP4_HD float round_half_even(float f) {
#if defined(__CUDA_ARCH__)
  return rintf(f);
#else
  return std::nearbyint(f);
#endif
}

NVFP4_HD bool is_nan(float f) { return (float_bits(f) & 0x7FFFFFFFu) > 0x7F800000u; }

// fmaxf/fminf semantics (a NaN operand is dropped), spelled out so host and device agree.
NVFP4_HD float max_drop_nan(float a, float b) {
  if (is_nan(a)) return b;
  if (is_nan(b)) return a;
  return a > b ? a : b;
}
NVFP4_HD float min_drop_nan(float a, float b) {
  if (is_nan(a)) return b;
  if (is_nan(b)) return a;
  return a < b ? a : b;
}

NVFP4_HD float abs_f(float f) { return bits_float(float_bits(f) & 0x7FFFFFFFu); }

// FP32 -> BF16 -> FP32, round to nearest even (NaN stays NaN), as torch's .to(torch.bfloat16).
NVFP4_HD float round_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if (is_nan(f)) return bits_float((u | 0x00400000u) & 0xFFFF0000u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return bits_float(u & 0xFFFF0000u);
}

// ---------------------------------------------------------------------------------------------------------
// E4M3 ("fn": bias 7, max 448, no Inf) block scales. Inputs are >= 0 (amax products) or NaN.

// RNE with saturation to 448, like __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3). Returns the byte.
// sm_89 and later have the conversion in hardware (cvt.rn.satfinite.e4m3x2.f32: RNE, NaN -> 0x7F, |v| >=
// 448 and Inf -> 448 with the sign), which gives the same byte as the software path below for every input.
NVFP4_HD uint8_t e4m3_from_float_satfinite(float v) {
  if (is_nan(v)) return 0x7F;  // one NaN byte whatever the sign and payload, on every path
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  uint16_t pair;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(0.0f), "f"(v));
  return static_cast<uint8_t>(pair & 0xFFu);  // the second source operand goes to the low byte
#else
  const uint32_t u = float_bits(v);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const float a = abs_f(v);
  if (a >= kE4m3Max) return sign | 0x7E;      // also Inf: satfinite
  if (a < 0.015625f) {                        // below 2^-6: subnormal, step 2^-9 (code 8 = 2^-6 itself)
    const float q = round_half_even(a * 512.0f);  // exact product
    return sign | static_cast<uint8_t>(q);
  }
  // Normal: keep 3 of the 23 mantissa bits, RNE on the 20 dropped bits; a carry bumps the exponent.
  uint32_t m = float_bits(a);
  m += 0x7FFFFu + ((m >> 20) & 1u);
  const uint32_t code = (m >> 20) - ((127u - 7u) << 3);
  return sign | static_cast<uint8_t>(code > 0x7Eu ? 0x7Eu : code);  // 464..: would be 480, saturate
#endif
}

NVFP4_HD float e4m3_to_float(uint8_t b) {
  const uint32_t e = (b >> 3) & 0xFu, m = b & 0x7u;
  float mag;
  if (e == 0xF && m == 0x7) {
    mag = bits_float(0x7FC00000u);
  } else if (e == 0) {
    mag = static_cast<float>(m) * 0.001953125f;  // m * 2^-9
  } else {
    mag = bits_float(((e + 127u - 7u) << 23) | (m << 20));
  }
  return (b & 0x80) ? -mag : mag;
}

// ---------------------------------------------------------------------------------------------------------
// E2M1 elements: code = s e1 e0 m, magnitudes 0 0.5 1 1.5 2 3 4 6.

NVFP4_HD float e2m1_to_float(uint8_t code) {
  const uint8_t mag = code & 0x7;
  const float v = mag < 4 ? 0.5f * mag : (mag == 4 ? 2.0f : (mag == 5 ? 3.0f : (mag == 6 ? 4.0f : 6.0f)));
  return (code & 0x8) ? -v : v;
}

// RNE on the code with saturation: midpoints go to the even code (0.25->0, 0.75->1, 1.25->1, 1.75->2,
// 2.5->2, 3.5->4, 5->4), |s| > 6 -> 6. The sign bit is kept, so a negative value that rounds to zero is
// code 0x8 (-0). NaN -> +6 (code 0x7), the convention TE documents for its software conversion.
NVFP4_HD uint8_t e2m1_rne(float s) {
  if (is_nan(s)) return 0x7;
  const float a = abs_f(s);
  uint8_t mag;
  if (a <= 0.25f) mag = 0;
  else if (a < 0.75f) mag = 1;
  else if (a <= 1.25f) mag = 2;
  else if (a < 1.75f) mag = 3;
  else if (a <= 2.5f) mag = 4;
  else if (a < 3.5f) mag = 5;
  else if (a <= 5.0f) mag = 6;
  else mag = 7;
  return static_cast<uint8_t>(mag | ((float_bits(s) >> 28) & 0x8u));
}

// Stochastic rounding with 8 random bits (TE's software fallback of cvt.rs.satfinite.e2m1x4):
// t = |s| + u * step(|s|), u = r8 / 256, then round t down to the grid, clamp to 6. Rounds up with
// probability (distance to the lower grid point) / step, to within 1/256. u * step is exact (a power of
// two times k/256), so t has one rounding, the same with or without FMA. NaN -> +6.
NVFP4_HD uint8_t e2m1_stochastic(float s, uint32_t r8) {
  if (is_nan(s)) return 0x7;
  const float a = abs_f(s);
  const float u = static_cast<float>(r8 & 0xFFu) * 0.00390625f;
  const float step_a = a >= 4.0f ? 2.0f : (a >= 2.0f ? 1.0f : 0.5f);
  const float t = a + u * step_a;
  uint8_t mag;
  if (t >= 6.0f) mag = 7;
  else if (t >= 4.0f) mag = 6;
  else if (t >= 3.0f) mag = 5;
  else if (t >= 2.0f) mag = 4;
  else if (t >= 1.5f) mag = 3;
  else if (t >= 1.0f) mag = 2;
  else if (t >= 0.5f) mag = 1;
  else mag = 0;
  return static_cast<uint8_t>(mag | ((float_bits(s) >> 28) & 0x8u));
}

// Byte select of PTX prmt / __byte_perm: byte n of the result is byte ((s >> 4n) & 7) of y:x (x bytes 0-3).
NVFP4_HD uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, s);
#else
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t r = 0;
  for (int n = 0; n < 4; ++n) r |= static_cast<uint32_t>((v >> (8 * ((s >> (4 * n)) & 7u))) & 0xFFu) << (8 * n);
  return r;
#endif
}

// Four E2M1 codes (nibbles of `q`, element j in bits 4j..4j+3) as BF16 bit patterns, exact: element 0/1 in
// the low/high half of `w01`, 2/3 in `w23`. Two table lookups of 8 bytes (low and high byte of the BF16
// magnitude, indexed by the 3 magnitude bits) and the sign bit moved to bit 15 of its half.
NVFP4_HD void e2m1x4_to_bf16x4(uint32_t q, uint32_t& w01, uint32_t& w23) {
  const uint32_t sel = q & 0x7777u;
  const uint32_t lo = byte_perm(0xC0800000u, 0xC0804000u, sel);  // 0 .5 1 1.5 | 2 3 4 6: low bytes
  const uint32_t hi = byte_perm(0x3F3F3F00u, 0x40404040u, sel);  // high bytes
  w01 = byte_perm(lo, hi, 0x5140u) | ((q << 12) & 0x8000u) | ((q << 24) & 0x80000000u);
  w23 = byte_perm(lo, hi, 0x7362u) | ((q << 4) & 0x8000u) | ((q << 16) & 0x80000000u);
}

// One 16-element block: codes q0 (elements 0-7) and q1 (8-15), the E4M3 scale byte -> e2m1 x scale as 8
// words of BF16 pairs (element 2i in the low half of word i). Exact: the product has at most 6
// significant bits and lies in [2^-10, 2688] (or is 0, or NaN for the NaN scale byte), which BF16 holds,
// so the BF16 multiply on the device and the FP32 multiply on the host give the same bits.
NVFP4_HD void decode_block16_bf16(uint32_t q0, uint32_t q1, uint8_t scale, uint32_t* out) {
  uint32_t e[8];
  e2m1x4_to_bf16x4(q0, e[0], e[1]);
  e2m1x4_to_bf16x4(q0 >> 16, e[2], e[3]);
  e2m1x4_to_bf16x4(q1, e[4], e[5]);
  e2m1x4_to_bf16x4(q1 >> 16, e[6], e[7]);
  const float sb = e4m3_to_float(scale);
#if defined(__CUDA_ARCH__)
  const uint32_t sb_bits = float_bits(sb) >> 16;  // exact: an E4M3 value has 4 significant bits
  const __nv_bfloat162 s2 = __halves2bfloat162(__ushort_as_bfloat16(static_cast<unsigned short>(sb_bits)),
                                               __ushort_as_bfloat16(static_cast<unsigned short>(sb_bits)));
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const __nv_bfloat162 p = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&e[i]), s2);
    out[i] = *reinterpret_cast<const uint32_t*>(&p);
  }
#else
  for (int i = 0; i < 8; ++i) {
    const float lo = bits_float(e[i] << 16) * sb, hi = bits_float(e[i] & 0xFFFF0000u) * sb;
    out[i] = (float_bits(lo) >> 16) | (float_bits(hi) & 0xFFFF0000u);
  }
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Scales (docs/nvfp4.md, 'Scale computation').

// S_enc = fminf(2688 / amax, FLT_MAX), 1 when amax == 0 or the quotient is 0 (amax = Inf). A NaN or
// negative amax (only a caller-supplied one can be) gives NaN: every block scale becomes the E4M3 NaN
// byte, so the copy decodes to NaN instead of to silently wrong values.
NVFP4_HD float global_encode_scale(float amax) {
  if (is_nan(amax) || amax < 0.0f) return bits_float(0x7FC00000u);
  float s = min_drop_nan(kFp4Fp8Max / amax, FLT_MAX);
  if (amax == 0.0f || s == 0.0f) s = 1.0f;
  return s;
}

// 1 / v correctly rounded to FP32 (IEEE division; __frcp_rn is the same rounding, cheaper on the device).
NVFP4_HD float reciprocal_rn(float v) {
#if defined(__CUDA_ARCH__)
  return __frcp_rn(v);
#else
  return 1.0f / v;
#endif
}

// S_dec = 1 / S_enc. TE computes it in double and rounds once to float; the FP32 reciprocal is the same
// float for every input: for a float s that is not a power of two, 1/s is at least 2^-49 (relative) away
// from every midpoint between floats (s * midpoint would otherwise be an odd multiple of a power of two
// equal to 1), while rounding to double moves it by at most 2^-53, so both round to the same side. The
// test compares the two formulas over all positive floats' reciprocals that the amax can produce.
NVFP4_HD float global_decode_scale(float s_enc) { return reciprocal_rn(s_enc); }

struct BlockScale {
  uint8_t e4m3;   // stored byte
  float encode;   // enc_b: multiplies each element before the E2M1 conversion
};

NVFP4_HD BlockScale block_scale(float block_amax, float s_enc, float s_dec) {
  const float one_sixth = 1.0f / 6.0f;  // fl32(1/6), folded at compile time on both sides
  const float scaled = s_enc * one_sixth;
  BlockScale out;
  out.e4m3 = e4m3_from_float_satfinite(block_amax * scaled);
  const float sb = e4m3_to_float(out.e4m3);
  out.encode = min_drop_nan(reciprocal_rn(sb * s_dec), FLT_MAX);  // 1/0 = Inf -> FLT_MAX for an all-zero block
  return out;
}

// Decode factor of the tensor: amax * (1/2688) (TE dequantize).
NVFP4_HD float decode_factor(float amax) { return amax * (1.0f / kFp4Fp8Max); }

// Index of scale (row, col) of an R x C scale matrix in the swizzled 128x4 layout (cuBLAS / TE
// gemm_swizzled_scale_idx): 512-byte tiles ordered row-major, (r, c) at (r%32)*16 + (r%128/32)*4 + c%4.
NVFP4_HD int64_t swizzled_scale_index(int64_t row, int64_t col, int64_t scale_cols) {
  const int64_t tiles_per_row = (scale_cols + 3) / 4;
  const int64_t tile = (row / 128) * tiles_per_row + col / 4;
  const int64_t r = row % 128;
  return tile * 512 + (r % 32) * 16 + (r / 32) * 4 + col % 4;
}

// ---------------------------------------------------------------------------------------------------------
// 16-point random Hadamard transform: y = x . diag(s) H16 / 4 (R = diag(s) H / 4, R R^T = I).
// The FP32 sums are taken in the order of the 4-stage butterfly (exact whenever the block's dynamic
// range fits the FP32 mantissa, so then equal to any order); the 1/4 is exact.

// F is float for the quantize path; the standalone transform also runs in double (gradcheck).
template <typename F>
NVFP4_HD void walsh_hadamard16(F* v) {
#pragma unroll
  for (int h = 1; h < 16; h <<= 1) {
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      if ((i & h) == 0) {
        const F a = v[i], b = v[i + h];
        v[i] = a + b;
        v[i + h] = a - b;
      }
    }
  }
}

template <typename F>
NVFP4_HD void hadamard16_forward(F* v, uint32_t sign_mask) {
#pragma unroll
  for (int i = 0; i < 16; ++i) v[i] = ((sign_mask >> i) & 1u) ? -v[i] : v[i];
  walsh_hadamard16(v);
#pragma unroll
  for (int i = 0; i < 16; ++i) v[i] = v[i] * F(0.25);
}

// x = y . R^T = y . H16 diag(s) / 4
template <typename F>
NVFP4_HD void hadamard16_inverse(F* v, uint32_t sign_mask) {
  walsh_hadamard16(v);
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const F w = v[i] * F(0.25);
    v[i] = ((sign_mask >> i) & 1u) ? -w : w;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"), counter-based: the bits
// for an element depend only on (seed, offset, orientation, element index), so CPU and CUDA, any thread
// layout, draw the same bits and every element is independent.

struct Philox4 {
  uint32_t x[4];
};

NVFP4_HD void mul_hi_lo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

NVFP4_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mul_hi_lo(0xD2511F53u, ctr.x[0], hi0, lo0);
    mul_hi_lo(0xCD9E8D57u, ctr.x[2], hi1, lo1);
    const Philox4 next = {{hi1 ^ ctr.x[1] ^ k0, lo1, hi0 ^ ctr.x[3] ^ k1, lo0}};
    ctr = next;
  }
  return ctr;
}

// Stochastic-rounding stream (docs/nvfp4.md, 'Stochastic rounding stream'): ONE draw per 16-element
// block. Block `block` is the row-major index of the block in the orientation's output (flat element
// index / 16); counter = (block, orientation, offset), key = seed. Its 16 random bytes go one per
// element: element i of the block takes byte (i % 4) of word (i / 4), i.e. sr_byte(bits, i).
NVFP4_HD Philox4 sr_bits(uint64_t seed, uint64_t offset, int orientation, uint64_t block) {
  const Philox4 ctr = {{static_cast<uint32_t>(block),
                        static_cast<uint32_t>(block >> 32) ^ (orientation ? 0x80000000u : 0u),
                        static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)}};
  return philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

NVFP4_HD uint32_t sr_byte(const Philox4& bits, int i) { return (bits.x[i >> 2] >> (8 * (i & 3))) & 0xFFu; }

// ---------------------------------------------------------------------------------------------------------
// One 16-element block, already transformed (RHT) if requested: codes (packed, low nibble = even
// element) and the scale byte. `rand` is the block's draw (sr_bits) when stochastic.

NVFP4_HD uint8_t quantize_block16(const float* v, float block_amax, float s_enc, float s_dec, bool stochastic,
                                  const Philox4& rand, uint8_t* packed /* 8 bytes */) {
  const BlockScale bs = block_scale(block_amax, s_enc, s_dec);
#pragma unroll
  for (int i = 0; i < 16; i += 2) {
    const float s0 = v[i] * bs.encode, s1 = v[i + 1] * bs.encode;
    const uint8_t c0 = stochastic ? e2m1_stochastic(s0, sr_byte(rand, i)) : e2m1_rne(s0);
    const uint8_t c1 = stochastic ? e2m1_stochastic(s1, sr_byte(rand, i + 1)) : e2m1_rne(s1);
    packed[i / 2] = static_cast<uint8_t>(c0 | (c1 << 4));
  }
  return bs.e4m3;
}

NVFP4_HD float block_abs_max(const float* v) {
  float m = 0.0f;
#pragma unroll
  for (int i = 0; i < 16; ++i) m = max_drop_nan(m, abs_f(v[i]));
  return m;
}

}  // namespace vlcore::nvfp4
