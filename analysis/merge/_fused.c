/* The merge's inner loop in one pass: a weighted float32 sum of one block of every input,
 * rounded once to the output dtype (loaded with ctypes by analysis/fused.py).
 *
 * Why C: numpy makes one pass over memory per operation (widen, shift, weigh, add, round),
 * five or six passes per input element; this makes one, keeping a chunk of the accumulator
 * in the L1 cache while every input's chunk is added to it. Averaging 8 x 220M bfloat16
 * checkpoints takes ~0.15 s of arithmetic here against ~0.67 s in numpy on 2 cores.
 *
 * The arithmetic is analysis/streaming.py's contract, element by element and in input order:
 *
 *     acc = 0.0f + w[0] * x[0];  acc = acc + w[i] * x[i];  out = acc rounded once
 *
 * Each step is one correctly rounded IEEE float32 operation. It must be compiled with
 * -ffp-contract=off (setup.py passes it): a fused multiply-add rounds w*x+acc once instead
 * of twice and would change the bits. analysis/fused.py checks the loaded kernel against
 * numpy on special values before using it, so a kernel built with other flags is refused,
 * not trusted. bfloat16 rounding is to nearest, ties to even, and a NaN becomes 0xFFFF,
 * as torch's vectorised conversion writes it. float16 is converted both ways as numpy converts it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Dtype codes shared with analysis/fused.py. */
enum { KIND_BFLOAT16 = 0, KIND_FLOAT32 = 1, KIND_FLOAT16 = 2 };

/* Accumulator elements per chunk: 4 KiB of floats, which stay in L1 while the inputs stream past. */
#define CHUNK 1024

/* One build runs well on every x86-64: the loader picks the widest vector unit the CPU has.
 * (-DCKPT_SINGLE_TARGET builds one variant for the flags given: the tests check each one.) */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(CKPT_SINGLE_TARGET)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

static inline float float_from_bits(uint32_t bits) {
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline uint32_t bits_from_float(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

static inline float load_bfloat16(const void *row, size_t j) {
    return float_from_bits((uint32_t)((const uint16_t *)row)[j] << 16);
}

static inline float load_float32(const void *row, size_t j) {
    return ((const float *)row)[j];
}

/* float16 -> float32, exact. The magnitude's bits shifted into a float32 and scaled by 2^112
 * (an exact multiplication) rebias the exponent of normal numbers and normalise subnormal ones;
 * infinities and NaN keep their payload (shifted), as numpy converts them. */
static inline float load_float16(const void *row, size_t j) {
    uint32_t half = ((const uint16_t *)row)[j];
    uint32_t sign = (half & 0x8000u) << 16;
    uint32_t magnitude = half & 0x7FFFu;
    uint32_t finite = bits_from_float(float_from_bits(magnitude << 13) * 0x1p112f);
    uint32_t special = 0x7F800000u | ((magnitude & 0x3FFu) << 13);
    return float_from_bits(sign | (magnitude >= 0x7C00u ? special : finite));
}

/* float32 -> float16, to nearest, ties to even. Normal results: rebias the exponent and round the
 * mantissa from 23 to 10 bits with integers (a carry rolls into the exponent, as it should);
 * subnormal results: the magnitude in units of 2^-24, rounded by adding 2^23 in float32 (exact
 * up to the rounding, which is the IEEE one); at or past 65520: infinity. NaN: numpy's bits. */
static inline void store_float16(void *out, size_t j, float value) {
    uint32_t bits = bits_from_float(value);
    uint32_t sign = (bits >> 16) & 0x8000u;
    uint32_t magnitude = bits & 0x7FFFFFFFu;
    uint32_t rebiased = magnitude - 0x38000000u;
    uint32_t normal = (rebiased + 0xFFFu + ((rebiased >> 13) & 1u)) >> 13;
    uint32_t subnormal = bits_from_float(float_from_bits(magnitude) * 0x1p24f + 0x1p23f) - 0x4B000000u;
    uint32_t nan = 0x7C00u | ((magnitude >> 13) & 0x3FFu);
    nan += nan == 0x7C00u;    /* a payload lost to the shift must not turn the NaN into infinity */
    uint32_t result = magnitude > 0x7F800000u   ? nan
                      : magnitude >= 0x477FF000u ? 0x7C00u
                      : magnitude >= 0x38800000u ? normal
                                                 : subnormal;
    ((uint16_t *)out)[j] = (uint16_t)(sign | result);
}

static inline void store_bfloat16(void *out, size_t j, float value) {
    uint32_t bits = bits_from_float(value);
    uint16_t rounded = (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    ((uint16_t *)out)[j] = value != value ? (uint16_t)0xFFFFu : rounded;
}

static inline void store_float32(void *out, size_t j, float value) {
    ((float *)out)[j] = value;
}

/* x holds n rows of count elements back to back (oldest input first); out gets count elements. */
#define DEFINE_KERNEL(NAME, IN_BYTES, LOAD, STORE)                                          \
    VECTOR_CLONES static void NAME(const char *x, size_t n, size_t count, const float *w,   \
                                   void *out) {                                             \
        float acc[CHUNK];                                                                   \
        for (size_t start = 0; start < count; start += CHUNK) {                             \
            size_t m = count - start < CHUNK ? count - start : CHUNK;                       \
            const char *first = x + start * (IN_BYTES);                                     \
            for (size_t j = 0; j < m; j++)                                                  \
                acc[j] = 0.0f + w[0] * LOAD(first, j);                                      \
            for (size_t i = 1; i < n; i++) {                                                \
                const char *row = x + (i * count + start) * (IN_BYTES);                     \
                float weight = w[i];                                                        \
                for (size_t j = 0; j < m; j++)                                              \
                    acc[j] = acc[j] + weight * LOAD(row, j);                                \
            }                                                                               \
            for (size_t j = 0; j < m; j++)                                                  \
                STORE(out, start + j, acc[j]);                                              \
        }                                                                                   \
    }

DEFINE_KERNEL(bfloat16_to_bfloat16, 2, load_bfloat16, store_bfloat16)
DEFINE_KERNEL(bfloat16_to_float32, 2, load_bfloat16, store_float32)
DEFINE_KERNEL(float32_to_bfloat16, 4, load_float32, store_bfloat16)
DEFINE_KERNEL(float32_to_float32, 4, load_float32, store_float32)
DEFINE_KERNEL(bfloat16_to_float16, 2, load_bfloat16, store_float16)
DEFINE_KERNEL(float32_to_float16, 4, load_float32, store_float16)
DEFINE_KERNEL(float16_to_float16, 2, load_float16, store_float16)
DEFINE_KERNEL(float16_to_bfloat16, 2, load_float16, store_bfloat16)
DEFINE_KERNEL(float16_to_float32, 2, load_float16, store_float32)

typedef void (*kernel_fn)(const char *, size_t, size_t, const float *, void *);

/* KERNELS[input kind][output kind] */
static const kernel_fn KERNELS[3][3] = {
    {bfloat16_to_bfloat16, bfloat16_to_float32, bfloat16_to_float16},
    {float32_to_bfloat16, float32_to_float32, float32_to_float16},
    {float16_to_bfloat16, float16_to_float32, float16_to_float16},
};

/* The weighted sum of n inputs of count elements each; 0 when done, -1 for a dtype code it lacks. */
int ckpt_fused_average(const void *x, int in_kind, size_t n, size_t count, const float *w, void *out,
                       int out_kind) {
    if (n == 0 || in_kind < 0 || in_kind > 2 || out_kind < 0 || out_kind > 2)
        return -1;
    KERNELS[in_kind][out_kind](x, n, count, w, out);
    return 0;
}

/* An importable (empty) module, so that the package's finders locate the built file. */
static struct PyModuleDef fused_module = {PyModuleDef_HEAD_INIT, "_fused",
                                          "The merge's fused averaging kernel (called through ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&fused_module); }
