// storage.cuh: storage types and their conversions to the math type (ARCHITECTURE.md,
// principle 8). bfloat16 and float16 are 16-bit structs converted by integer arithmetic,
// not by cuda_bf16.h or the GPU's cvt instructions, so the host build and every GPU give
// the same bits (cvt.rn.f16.f32 would replace a NaN's payload where NumPy keeps it).
// Loads are exact. Stores round to nearest even exactly as ml_dtypes (float32 ->
// bfloat16) and NumPy (float32 -> float16) do, or, for bfloat16, stochastically from a
// counter-based hash of (seed, step, element index): no generator state to checkpoint.
// The NumPy twin of every function here is in fusedopt/precision.py.
#pragma once

#include "common.cuh"

// The storage types of a build (fusedopt/_kernels.py, storage_prelude); a unit that names
// only the math type FUSEDOPT_T stores everything in it. Defined once here, for fused.cu,
// reduce.cu and host.cpp alike.
#ifndef FUSEDOPT_P
#define FUSEDOPT_P FUSEDOPT_T
#endif
#ifndef FUSEDOPT_G
#define FUSEDOPT_G FUSEDOPT_T
#endif
#ifndef FUSEDOPT_S
#define FUSEDOPT_S FUSEDOPT_T
#endif

typedef unsigned short fo_u16;
typedef unsigned int fo_u32;
typedef unsigned long long fo_u64;
static_assert(sizeof(fo_u16) == 2 && sizeof(fo_u32) == 4 && sizeof(fo_u64) == 8,
              "storage.cuh needs 16-, 32- and 64-bit unsigned types");

// Storage only: the kernels never compute on these, they load them into float.
struct fo_bf16 { fo_u16 bits; };
struct fo_f16 { fo_u16 bits; };

// The arithmetic type of each storage type: float for everything narrower than double.
template <typename S> struct fo_math { typedef float type; };
template <> struct fo_math<double> { typedef double type; };

FO_HD fo_u32 fo_float_bits(float x) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(x);
#else
    fo_u32 u;
    __builtin_memcpy(&u, &x, sizeof u);
    return u;
#endif
}

FO_HD float fo_bits_float(fo_u32 u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float x;
    __builtin_memcpy(&x, &u, sizeof x);
    return x;
#endif
}

// ---------------------------------------------------------------- loads (exact)
// bfloat16 is the top half of a float32, NaN payloads included.
FO_HD float fo_bf16_to_float(fo_u16 h) { return fo_bits_float((fo_u32)h << 16); }

FO_HD float fo_f16_to_float(fo_u16 h) {
    fo_u32 sign = (fo_u32)(h & 0x8000u) << 16;
    fo_u32 exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    if (exponent == 0x1fu)  // inf, or NaN with its payload shifted up (as NumPy does)
        return fo_bits_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent != 0)  // rebias 15 -> 127
        return fo_bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
    // Zero or subnormal: mantissa * 2^-24 is exact in float32 (and a normal number there,
    // so a flush-to-zero build could not lose it either).
    float magnitude = (float)mantissa * 0x1p-24f;
    return fo_bits_float(sign | fo_float_bits(magnitude));
}

// ------------------------------------------------ stores: round to nearest even
// Adding 0x7fff plus the kept half's lowest bit rounds ties to even; a carry out of the
// mantissa moves to the next binade and past the largest finite value to inf, as IEEE
// requires. NaN becomes the quiet NaN of its sign (ml_dtypes drops the payload too).
FO_HD fo_u16 fo_float_to_bf16_rn(float x) {
    fo_u32 u = fo_float_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (fo_u16)(((u >> 16) & 0x8000u) | 0x7fc0u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (fo_u16)(u >> 16);
}

// Keep `kept` = value >> shift, rounding the dropped low `shift` bits to nearest even.
FO_HD fo_u32 fo_round_shift(fo_u32 value, int shift) {
    fo_u32 kept = value >> shift;
    fo_u32 dropped = value & ((1u << shift) - 1u), half = 1u << (shift - 1);
    return kept + ((dropped > half || (dropped == half && (kept & 1u))) ? 1u : 0u);
}

FO_HD fo_u16 fo_float_to_f16_rn(float x) {
    fo_u32 u = fo_float_bits(x);
    fo_u32 sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) {
        // NaN: NumPy keeps the top 10 payload bits, and sets the lowest one if those are
        // all zero so that the result is still a NaN rather than inf.
        fo_u32 payload = (a >> 13) & 0x3ffu;
        return (fo_u16)(sign | 0x7c00u | (payload ? payload : 1u));
    }
    // From 65520 = 0x477ff000, halfway between 65504 (the largest float16) and 2^16,
    // everything rounds to inf (the tie to the even 2^16). Checked first so that larger
    // exponents never reach the 5-bit field below; inf itself lands here too.
    if (a >= 0x477ff000u) return (fo_u16)(sign | 0x7c00u);
    if (a >= 0x38800000u)  // a normal float16 (>= 2^-14): rebias 127 -> 15, keep 10 bits
        return (fo_u16)(sign | fo_round_shift(a - 0x38000000u, 13));
    // Subnormal float16, units of 2^-24. At most half a unit (2^-25) rounds to zero;
    // below 2^-26 the shift would pass 31 bits, so stop there.
    if (a < 0x32800000u) return (fo_u16)sign;
    fo_u32 exponent = a >> 23, mantissa = (a & 0x7fffffu) | 0x800000u;
    // value = mantissa * 2^(exponent - 150) = (mantissa >> (126 - exponent)) units;
    // rounding up from 0x3ff units gives 0x400, the smallest normal: still right.
    return (fo_u16)(sign | fo_round_shift(mantissa, 126 - (int)exponent));
}

// ------------------------------------------------ stores: stochastic (bfloat16)
#define FO_GOLDEN 0x9e3779b97f4a7c15ull  // 2^64 / golden ratio, odd: splitmix64's increment

// splitmix64's finaliser (Steele, Lea & Flood 2014, Stafford's "Mix13" constants): a
// bijection of 64-bit words in which every input bit affects every output bit.
FO_HD fo_u64 fo_mix64(fo_u64 z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// 64 random bits for the group of four elements 4*group .. 4*group + 3 at step `step` of
// a run seeded `seed`. Within a step the groups walk splitmix64's stream from a
// seed-derived start, so no two groups of a step share an input; a second round mixes
// the step in. One word serves four elements (16 bits each) because the hash, not the
// memory traffic, is what a stochastic store adds: about 75 integer instructions per
// word in sm_90 code, 20 of them the seed's mix, which a grid-stride loop hoists; so
// under 20 per element. A pure function of its arguments: any executor, any launch
// geometry, the same bits.
FO_HD fo_u64 fo_random_word(fo_u64 seed, fo_u64 step, fo_u64 group) {
    fo_u64 h = fo_mix64(fo_mix64(seed + FO_GOLDEN) + group * FO_GOLDEN);
    return fo_mix64(h ^ (step * FO_GOLDEN));
}

// Element `index`'s 16 bits of its group's word (lowest quarter for index % 4 == 0).
// A kernel handling four aligned elements computes the word once and calls this four
// times; fo_dither does both for a lone element.
FO_HD fo_u32 fo_dither_of(fo_u64 word, fo_u64 index) {
    return (fo_u32)(word >> (16u * (fo_u32)(index & 3u))) & 0xffffu;
}

FO_HD fo_u32 fo_dither(fo_u64 seed, fo_u64 step, fo_u64 index) {
    return fo_dither_of(fo_random_word(seed, step, index >> 2), index);
}

// Round x to one of its two bfloat16 neighbours, away from zero with probability
// (distance from the neighbour nearer zero) / (gap): adding a uniform 16-bit `dither`
// below the kept half carries into it exactly that often, so E[result] = x for every
// finite x. Magnitudes that round above the largest bfloat16 become inf (as to-nearest
// does from 0x7f7f8000 on). inf and NaN are stored as by fo_float_to_bf16_rn.
FO_HD fo_u16 fo_float_to_bf16_sr(float x, fo_u32 dither) {
    fo_u32 u = fo_float_bits(x);
    if ((u & 0x7fffffffu) >= 0x7f800000u) return fo_float_to_bf16_rn(x);
    return (fo_u16)((u + (dither & 0xffffu)) >> 16);
}

// ------------------------------------------------------------ what kernels call
// float g = fo_load(grad[i]);  fo_store(param[i], p);  whatever the storage types.
FO_HD float fo_load(float x) { return x; }
FO_HD double fo_load(double x) { return x; }
FO_HD float fo_load(fo_bf16 x) { return fo_bf16_to_float(x.bits); }
FO_HD float fo_load(fo_f16 x) { return fo_f16_to_float(x.bits); }

FO_HD void fo_store(float& dst, float x) { dst = x; }
FO_HD void fo_store(double& dst, double x) { dst = x; }
FO_HD void fo_store(fo_bf16& dst, float x) { dst.bits = fo_float_to_bf16_rn(x); }
FO_HD void fo_store(fo_f16& dst, float x) { dst.bits = fo_float_to_f16_rn(x); }

// `step` is the optimizer's iteration count before the step (0 on the first step),
// `index` the element's position in the flat buffer: what the NumPy reference passes.
FO_HD void fo_store_stochastic(fo_bf16& dst, float x, fo_u64 seed, fo_u64 step,
                               fo_u64 index) {
    dst.bits = fo_float_to_bf16_sr(x, fo_dither(seed, step, index));
}

// ------------------------------------------------- runs of elements (the kernels')
// A param store's rounding: to nearest, or stochastic for bfloat16 params without a
// master copy (Hyper.stochastic_rounding), from the run's seed and the step's count.
struct FoRounding {
    int stochastic;
    fo_u64 seed;
    fo_u64 step;  // StepState.iterations before the step (0 on the first)
};

template <typename S>
FO_HD void fo_store_param(S& dst, typename fo_math<S>::type x, const FoRounding&, fo_u64) {
    fo_store(dst, x);
}
FO_HD void fo_store_param(fo_bf16& dst, float x, const FoRounding& r, fo_u64 index) {
    if (r.stochastic) fo_store_stochastic(dst, x, r.seed, r.step, index);
    else fo_store(dst, x);
}

// The value a state slot of storage S holds once x is stored in it (rounded to nearest
// once when S is narrower than T; x itself otherwise): what use_ema's average is after
// its store, so an overwrite copies the average as stored (kernels/options.cuh).
template <typename S, typename T>
FO_HD T fo_stored(T x) {
    S s;
    fo_store(s, x);
    return (T)fo_load(s);
}

// The value params of storage P hold once x is stored at flat position `index` with
// rounding r (to nearest, or stochastically): what use_ema averages without a master.
template <typename P>
FO_HD typename fo_math<P>::type fo_param_stored(typename fo_math<P>::type x,
                                                const FoRounding& r, fo_u64 index) {
    P s;
    fo_store_param(s, x, r, index);
    return fo_load(s);
}

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
// The raw type of one access to N consecutive elements of storage type S: what
// the GPU loads or stores in one instruction (the vector path of fused.cu and
// reduce.cu, N = 16 / sizeof(math type), so float math moves 16-byte vectors of
// float32 buffers and 8-byte ones of 16-bit buffers).
template <typename S, int N> struct fo_raw;
template <typename S> struct fo_raw<S, 1> { typedef S type; };
template <> struct fo_raw<float, 4> { typedef float4 type; };
template <> struct fo_raw<double, 2> { typedef double2 type; };
template <> struct fo_raw<fo_bf16, 4> { typedef uint2 type; };
template <> struct fo_raw<fo_f16, 4> { typedef uint2 type; };

// N elements of S as one access; x[] is what the math type's lanes convert from.
template <typename S, int N>
union fo_lanes {
    typename fo_raw<S, N>::type raw;
    S x[N];
};

// out[k] = element k of src (N consecutive elements, one access), in the math type.
template <int N, typename S, typename T>
FO_HD void fo_load_run(const S* src, T* out) {
    fo_lanes<S, N> v;
    v.raw = fo_load(reinterpret_cast<const typename fo_raw<S, N>::type*>(src));
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = fo_load(v.x[k]);
}

template <int N, typename S, typename T>
FO_HD void fo_store_run(S* dst, const T* in) {
    fo_lanes<S, N> v;
#pragma unroll
    for (int k = 0; k < N; ++k) fo_store(v.x[k], in[k]);
    fo_store(reinterpret_cast<typename fo_raw<S, N>::type*>(dst), v.raw);
}

// The params' rounding of N elements into lanes: element `index` (its flat position)
// is v.x[0].
template <int N, typename S, typename T>
FO_HD void fo_round_param_lanes(fo_lanes<S, N>& v, const T* in, const FoRounding& r,
                                fo_u64 index) {
#pragma unroll
    for (int k = 0; k < N; ++k) fo_store_param(v.x[k], in[k], r, index + k);
}

// bfloat16 params: stochastic rounding hashes once per aligned group of four elements
// (fo_random_word), the same bits as fo_store_stochastic element by element.
template <int N>
FO_HD void fo_round_param_lanes(fo_lanes<fo_bf16, N>& v, const float* in, const FoRounding& r,
                                fo_u64 index) {
    fo_u64 word = 0;
#pragma unroll
    for (int k = 0; k < N; ++k) {
        const fo_u64 i = index + (fo_u64)k;
        if (!r.stochastic) {
            fo_store(v.x[k], in[k]);
            continue;
        }
        if (k == 0 || (i & 3u) == 0) word = fo_random_word(r.seed, r.step, i >> 2);
        v.x[k].bits = fo_float_to_bf16_sr(in[k], fo_dither_of(word, i));
    }
}

// The params' store: element `index` (its flat position) is dst[0].
template <int N, typename S, typename T>
FO_HD void fo_store_param_run(S* dst, const T* in, const FoRounding& r, fo_u64 index) {
    fo_lanes<S, N> v;
    fo_round_param_lanes<N>(v, in, r, index);
    fo_store(reinterpret_cast<typename fo_raw<S, N>::type*>(dst), v.raw);
}

// x[k] <- the value params of storage S hold once x[k] is stored (fo_param_stored, N at
// a time: the same bits as fo_store_param_run writes).
template <int N, typename S, typename T>
FO_HD void fo_param_stored_run(T* x, const FoRounding& r, fo_u64 index) {
    fo_lanes<S, N> v;
    fo_round_param_lanes<N>(v, x, r, index);
#pragma unroll
    for (int k = 0; k < N; ++k) x[k] = fo_load(v.x[k]);
}
#endif  // __CUDACC__: the runs are the GPU kernels' (host.cpp converts chunks in loops of its own)
