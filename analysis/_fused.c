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
 * as torch's vectorised conversion writes it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Dtype codes shared with analysis/fused.py. */
enum { KIND_BFLOAT16 = 0, KIND_FLOAT32 = 1 };

/* Accumulator elements per chunk: 4 KiB of floats, which stay in L1 while the inputs stream past. */
#define CHUNK 1024

/* One build runs well on every x86-64: the loader picks the widest vector unit the CPU has.
 * (-DCKPT_SINGLE_TARGET builds one variant for the flags given: the tests check each one.) */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(CKPT_SINGLE_TARGET)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

static inline float load_bfloat16(const void *row, size_t j) {
    uint32_t bits = (uint32_t)((const uint16_t *)row)[j] << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline float load_float32(const void *row, size_t j) {
    return ((const float *)row)[j];
}

static inline void store_bfloat16(void *out, size_t j, float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
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

/* The weighted sum of n inputs of count elements each; 0 when done, -1 for a dtype code it lacks. */
int ckpt_fused_average(const void *x, int in_kind, size_t n, size_t count, const float *w, void *out,
                       int out_kind) {
    if (n == 0)
        return -1;
    if (in_kind == KIND_BFLOAT16 && out_kind == KIND_BFLOAT16)
        bfloat16_to_bfloat16(x, n, count, w, out);
    else if (in_kind == KIND_BFLOAT16 && out_kind == KIND_FLOAT32)
        bfloat16_to_float32(x, n, count, w, out);
    else if (in_kind == KIND_FLOAT32 && out_kind == KIND_BFLOAT16)
        float32_to_bfloat16(x, n, count, w, out);
    else if (in_kind == KIND_FLOAT32 && out_kind == KIND_FLOAT32)
        float32_to_float32(x, n, count, w, out);
    else
        return -1;
    return 0;
}

/* An importable (empty) module, so that the package's finders locate the built file. */
static struct PyModuleDef fused_module = {PyModuleDef_HEAD_INIT, "_fused",
                                          "The merge's fused averaging kernel (called through ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&fused_module); }
