/* Fused bf16 kernels for CPU training (see loader.py and __init__.py beside it for why and how they are loaded).
 *
 * bf16 tensors are passed as uint16_t bit patterns; all arithmetic is fp32, and every value that
 * the torch reference rounds to bf16 is rounded here too (round to nearest even), so the
 * results differ from the reference only by the order of fp32 sums and by exp's last bits.
 * Rows are split over the OpenMP threads torch uses (torch's libgomp is the one loaded).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

/* Parallelise a row loop only when there is enough work to pay for waking the threads. */
#define PARALLEL_MIN_ELEMENTS 16384

/* Runs the statements after the arguments for each fixed-size chunk [start, start + len) of each
 * tensor t of a list; inside a parallel region, each tensor's chunks are split over the threads. */
#define LIST_CHUNK 16384
#define FOR_EACH_CHUNK(count, numels, t, start, len, ...)                                       \
    for (int64_t t = 0; t < (count); t++) {                                                      \
        _Pragma("omp for schedule(static) nowait")                                              \
        for (int64_t start = 0; start < (numels)[t]; start += LIST_CHUNK) {                       \
            int64_t len = (numels)[t] - start < LIST_CHUNK ? (numels)[t] - start : LIST_CHUNK;   \
            __VA_ARGS__                                                                          \
        }                                                                                        \
    }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even. NaNs stay NaN without a separate test: every NaN met here is either a bf16
 * value widened (payload in the upper 16 bits) or produced by arithmetic (the default quiet NaN,
 * 0x7fc00000 or 0xffc00000), and adding the rounding bias leaves its upper 16 bits a NaN. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* ------------------------------------------------------------------ RMSNorm
 * y = w * bf16(x * r), r = 1 / sqrt(mean(x^2) + eps) per row, as olmoe_megatron.model.norms.rms_normalize
 * (cast back to bf16 before the weight multiply, as OLMoE and HF's OlmoeRMSNorm do).
 */
void rmsnorm_fwd_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, float *rstd,
                      int64_t rows, int64_t width, float eps) {
#pragma omp parallel for schedule(static) if (rows * width >= PARALLEL_MIN_ELEMENTS)
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *xi = x + i * width;
        uint16_t *yi = y + i * width;
        float sum_sq = 0.0f;
#pragma omp simd reduction(+ : sum_sq)
        for (int64_t j = 0; j < width; j++) {
            float v = bf16_to_f32(xi[j]);
            sum_sq += v * v;
        }
        float r = 1.0f / sqrtf(sum_sq / (float)width + eps);
        rstd[i] = r;
#pragma omp simd
        for (int64_t j = 0; j < width; j++) {
            float n = bf16_to_f32(f32_to_bf16(bf16_to_f32(xi[j]) * r));
            yi[j] = f32_to_bf16(bf16_to_f32(w[j]) * n);
        }
    }
}

/* Gradients of rmsnorm_fwd_bf16. With g = bf16(dy * w) (the bf16 gradient of the normalised rows):
 *   dx = r * g - x * r^3 * sum(g * x) / width      (rounded to bf16)
 *   dw = sum over rows of dy * bf16(x * r)          (fp32, summed per thread then over threads)
 */
void rmsnorm_bwd_bf16(const uint16_t *dy, const uint16_t *x, const uint16_t *w, const float *rstd,
                      uint16_t *dx, float *dw, int64_t rows, int64_t width) {
    int num_threads = (rows * width >= PARALLEL_MIN_ELEMENTS) ? omp_get_max_threads() : 1;
    float *partial = calloc((size_t)num_threads * (size_t)width, sizeof(float));
#pragma omp parallel num_threads(num_threads)
    {
        float *acc = partial + (size_t)omp_get_thread_num() * (size_t)width;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) {
            const uint16_t *dyi = dy + i * width;
            const uint16_t *xi = x + i * width;
            uint16_t *dxi = dx + i * width;
            float r = rstd[i];
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t j = 0; j < width; j++) {
                float d = bf16_to_f32(dyi[j]);
                float v = bf16_to_f32(xi[j]);
                float g = bf16_to_f32(f32_to_bf16(d * bf16_to_f32(w[j])));
                dot += g * v;
                acc[j] += d * bf16_to_f32(f32_to_bf16(v * r));
            }
            float c = r * r * r * dot / (float)width;
#pragma omp simd
            for (int64_t j = 0; j < width; j++) {
                float g = bf16_to_f32(f32_to_bf16(bf16_to_f32(dyi[j]) * bf16_to_f32(w[j])));
                dxi[j] = f32_to_bf16(r * g - bf16_to_f32(xi[j]) * c);
            }
        }
    }
    memset(dw, 0, (size_t)width * sizeof(float));
    for (int t = 0; t < num_threads; t++)
        for (int64_t j = 0; j < width; j++) dw[j] += partial[(size_t)t * (size_t)width + j];
    free(partial);
}

/* ------------------------------------------------------------------ exp and SiLU
 * exp on [-87.3, 88.7] (Cephes' polynomial, ~1 ulp), vectorisable; NaN stays NaN. Below -87.3 it
 * returns exp(-87.3) ~ 1e-38 instead of a denormal or 0: nothing in a softmax sum or a sigmoid can
 * tell the difference.
 */
static inline float exp_f32(float x) {
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.7f ? 88.7f : x;
    /* round to nearest integer by the 1.5 * 2^23 trick (a floorf call blocks vectorisation here) */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r) + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

/* ------------------------------------------------------------------ vocab-parallel cross-entropy
 * Megatron's _VocabParallelCrossEntropy on bf16 logits without materialising them in fp32:
 *   pass 1: row max;  (all-reduce MAX over TP)
 *   pass 2: sum(exp(l - max)) and the target's l - max (0 where the target is on another rank);
 *           (all-reduce SUM over TP; loss = log(sum) - predicted)
 *   backward: dl = g * (exp(l - max) / sum - [j == target]), rounded to bf16.
 */
void ce_max_bf16(const uint16_t *logits, float *row_max, int64_t rows, int64_t vocab) {
#pragma omp parallel for schedule(static) if (rows * vocab >= PARALLEL_MIN_ELEMENTS)
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *li = logits + i * vocab;
        float m = -INFINITY;
        int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
        for (int64_t j = 0; j < vocab; j++) {
            float v = bf16_to_f32(li[j]);
            m = v > m ? v : m;
            nan |= v != v;
        }
        row_max[i] = nan ? NAN : m;
    }
}

void ce_sum_exp_bf16(const uint16_t *logits, const float *row_max, const int64_t *target, float *sum_exp,
                     float *predicted, int64_t rows, int64_t vocab, int64_t vocab_start) {
#pragma omp parallel for schedule(static) if (rows * vocab >= PARALLEL_MIN_ELEMENTS)
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *li = logits + i * vocab;
        float m = row_max[i];
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < vocab; j++) s += exp_f32(bf16_to_f32(li[j]) - m);
        sum_exp[i] = s;
        int64_t t = target[i] - vocab_start;
        predicted[i] = (t >= 0 && t < vocab) ? bf16_to_f32(li[t]) - m : 0.0f;
    }
}

static void ce_grad_row(const uint16_t *restrict li, uint16_t *restrict gi, int64_t vocab, float m, float scale) {
#pragma omp simd
    for (int64_t j = 0; j < vocab; j++) gi[j] = f32_to_bf16(scale * exp_f32(bf16_to_f32(li[j]) - m));
}

void ce_grad_bf16(const uint16_t *logits, const float *row_max, const float *sum_exp, const int64_t *target,
                  const float *grad_loss, uint16_t *grad_logits, int64_t rows, int64_t vocab, int64_t vocab_start) {
#pragma omp parallel for schedule(static) if (rows * vocab >= PARALLEL_MIN_ELEMENTS)
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *li = logits + i * vocab;
        uint16_t *gi = grad_logits + i * vocab;
        float m = row_max[i];
        float inv = 1.0f / sum_exp[i];
        float g = grad_loss[i];
        ce_grad_row(li, gi, vocab, m, g * inv);
        int64_t t = target[i] - vocab_start;
        if (t >= 0 && t < vocab) gi[t] = f32_to_bf16(g * (exp_f32(bf16_to_f32(li[t]) - m) * inv - 1.0f));
    }
}

/* ------------------------------------------------------------------ SwiGLU experts with router probabilities
 * fc1_out rows are [gate (width) | up (width)]. Forward, as PaddedOrStackedSwiGLUExperts' torch code rounds:
 *   act = bf16(bf16(silu(gate)) * up),  scaled = bf16(act * p)   (p: the row's fp32 probability)
 * Backward, given d = d(scaled):
 *   dp = sum(d * act) (fp32),  da = bf16(d * p),
 *   d(gate) = bf16(da * up * silu'(gate)),  d(up) = bf16(da * silu(gate))
 */
static void swiglu_probs_fwd_row(const uint16_t *restrict gate, const uint16_t *restrict up, uint16_t *restrict out,
                                 int64_t width, float p) {
#pragma omp simd
    for (int64_t j = 0; j < width; j++) {
        float g = bf16_to_f32(gate[j]);
        float silu = bf16_to_f32(f32_to_bf16(g * sigmoid_f32(g)));
        float act = bf16_to_f32(f32_to_bf16(silu * bf16_to_f32(up[j])));
        out[j] = f32_to_bf16(act * p);
    }
}

void swiglu_probs_fwd_bf16(const uint16_t *fc1_out, const float *probs, uint16_t *scaled, int64_t rows,
                           int64_t width) {
#pragma omp parallel for schedule(static) if (rows * width >= PARALLEL_MIN_ELEMENTS)
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *gate = fc1_out + i * 2 * width;
        swiglu_probs_fwd_row(gate, gate + width, scaled + i * width, width, probs[i]);
    }
}

static float swiglu_probs_bwd_row(const uint16_t *restrict gate, const uint16_t *restrict up,
                                  const uint16_t *restrict d, uint16_t *restrict d_gate, uint16_t *restrict d_up,
                                  int64_t width, float p) {
    float dp = 0.0f;
#pragma omp simd reduction(+ : dp)
    for (int64_t j = 0; j < width; j++) {
        float g = bf16_to_f32(gate[j]);
        float u = bf16_to_f32(up[j]);
        float sig = sigmoid_f32(g);
        float silu = g * sig;
        float act = bf16_to_f32(f32_to_bf16(bf16_to_f32(f32_to_bf16(silu)) * u));
        float dj = bf16_to_f32(d[j]);
        dp += dj * act;
        float da = bf16_to_f32(f32_to_bf16(dj * p));
        d_gate[j] = f32_to_bf16(da * u * (sig + silu * (1.0f - sig)));
        d_up[j] = f32_to_bf16(da * silu);
    }
    return dp;
}

void swiglu_probs_bwd_bf16(const uint16_t *grad_scaled, const uint16_t *fc1_out, const float *probs,
                           uint16_t *grad_fc1_out, float *grad_probs, int64_t rows, int64_t width) {
#pragma omp parallel for schedule(static) if (rows * width >= PARALLEL_MIN_ELEMENTS)
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *gate = fc1_out + i * 2 * width;
        uint16_t *d_gate = grad_fc1_out + i * 2 * width;
        grad_probs[i] = swiglu_probs_bwd_row(gate, gate + width, grad_scaled + i * width, d_gate, d_gate + width,
                                             width, probs[i]);
    }
}

/* ------------------------------------------------------------------ attention softmax
 * Rows of fp32 scores (already scaled) -> bf16 probabilities; with `causal`, row i of each
 * [s_q, s_k] block sees keys 0..i + (s_k - s_q) and the rest are exact zeros. Backward, with the
 * flash recurrence's row term (rowsum(dO * O) = rowsum(P * dP)):  dS = bf16(P * (dP - row)).
 */
static void softmax_row(const float *restrict x, uint16_t *restrict p, float *restrict e, int64_t n, int64_t visible) {
    float m = -INFINITY;
    int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t j = 0; j < visible; j++) {
        m = x[j] > m ? x[j] : m;
        nan |= x[j] != x[j];
    }
    if (nan) m = NAN;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < visible; j++) {
        e[j] = exp_f32(x[j] - m);
        s += e[j];
    }
    float inv = 1.0f / s;
#pragma omp simd
    for (int64_t j = 0; j < visible; j++) p[j] = f32_to_bf16(e[j] * inv);
    for (int64_t j = visible; j < n; j++) p[j] = 0;
}

void softmax_fwd_f32_bf16(const float *scores, uint16_t *probs, int64_t blocks, int64_t s_q, int64_t s_k,
                          int causal) {
    int64_t rows = blocks * s_q;
#pragma omp parallel if (rows * s_k >= PARALLEL_MIN_ELEMENTS)
    {
        float *e = malloc((size_t)s_k * sizeof(float)); /* exp(x - max) of one row, computed once */
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            int64_t i = r % s_q;
            int64_t visible = causal ? i + 1 + (s_k - s_q) : s_k;
            if (visible > s_k) visible = s_k;
            if (visible < 0) visible = 0;
            softmax_row(scores + r * s_k, probs + r * s_k, e, s_k, visible);
        }
        free(e);
    }
}

static void softmax_bwd_row(const float *restrict grad_probs, const uint16_t *restrict p, uint16_t *restrict out,
                            int64_t n, float row) {
#pragma omp simd
    for (int64_t j = 0; j < n; j++) out[j] = f32_to_bf16(bf16_to_f32(p[j]) * (grad_probs[j] - row));
}

void softmax_bwd_bf16(const float *grad_probs, const uint16_t *probs, const float *row_term, uint16_t *grad_scores,
                      int64_t rows, int64_t s_k) {
#pragma omp parallel for schedule(static) if (rows * s_k >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++)
        softmax_bwd_row(grad_probs + r * s_k, probs + r * s_k, grad_scores + r * s_k, s_k, row_term[r]);
}

/* ------------------------------------------------------------------ gradient accumulation
 * dst[t] (fp32) += src[t] (bf16) for a list of tensors: weight gradients into their fp32 main_grad
 * without torch's mixed-dtype add (which first copies src to a temporary fp32 tensor), in one call.
 */
static void add_bf16_to_f32_range(float *restrict dst, const uint16_t *restrict src, int64_t n) {
#pragma omp simd
    for (int64_t j = 0; j < n; j++) dst[j] += bf16_to_f32(src[j]);
}

void add_bf16_to_f32(int64_t count, float *const *dst, const uint16_t *const *src, const int64_t *numels) {
    int64_t total = 0;
    for (int64_t t = 0; t < count; t++) total += numels[t];
#pragma omp parallel if (total >= 4 * PARALLEL_MIN_ELEMENTS)
    FOR_EACH_CHUNK(count, numels, t, start, len, add_bf16_to_f32_range(dst[t] + start, src[t] + start, len);)
}

/* ------------------------------------------------------------------ AdamW with bf16 model weights
 * One pass per parameter over its fp32 main weight, fp32 gradient and the two moments, writing the
 * updated main weight, the moments and (where model16[t] is not NULL) the bf16 model weight. This
 * replaces clipping (grad * grad_scale), torch's fused AdamW and Megatron's main -> model copy:
 * three passes over the weights, one here. The update is torch's AdamW (decoupled decay):
 *   p *= 1 - lr * wd;  m += (1 - b1) (g - m);  v = b2 v + (1 - b2) g^2;
 *   p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
 */
static void adamw_range(float *restrict p, const float *restrict grad, float *restrict m, float *restrict v,
                        uint16_t *restrict p16, int64_t n, float beta1, float beta2, float eps, float decay,
                        float step_size, float bc2_sqrt, float grad_scale) {
#pragma omp simd
    for (int64_t j = 0; j < n; j++) {
        float g = grad[j] * grad_scale;
        float w = p[j] * decay;
        float mj = m[j] + (1.0f - beta1) * (g - m[j]);
        float vj = beta2 * v[j] + (1.0f - beta2) * g * g;
        w -= step_size * mj / (sqrtf(vj) / bc2_sqrt + eps);
        m[j] = mj;
        v[j] = vj;
        p[j] = w;
        if (p16) p16[j] = f32_to_bf16(w);
    }
}

void adamw_bf16_step(int64_t count, float *const *main_params, float *const *grads, float *const *exp_avgs,
                     float *const *exp_avg_sqs, uint16_t *const *model_params, const int64_t *numels, float lr,
                     float beta1, float beta2, float eps, float weight_decay, float bias_correction1,
                     float bias_correction2, float grad_scale) {
    float decay = 1.0f - lr * weight_decay;
    float step_size = lr / bias_correction1;
    float bc2_sqrt = sqrtf(bias_correction2);
#pragma omp parallel
    FOR_EACH_CHUNK(count, numels, t, start, len,
                   adamw_range(main_params[t] + start, grads[t] + start, exp_avgs[t] + start, exp_avg_sqs[t] + start,
                               model_params[t] ? model_params[t] + start : NULL, len, beta1, beta2, eps, decay,
                               step_size, bc2_sqrt, grad_scale);)
}

/* ------------------------------------------------------------------ rotary position embedding
 * Megatron's unfused RoPE on bf16 [s, rows, d] (rows = batch * heads, rotate-half layout), with the
 * same bf16 roundings: with c, s the bf16 cos/sin tables of each position and h = d / 2,
 *   y[j]   = bf16(bf16(x[j] c[j]) - bf16(x[j+h] s[j]))
 *   y[j+h] = bf16(bf16(x[j+h] c[j+h]) + bf16(x[j] s[j+h]))
 * Backward (the transpose): dx[j] = bf16(bf16(dy[j] c[j]) + bf16(dy[j+h] s[j+h])),
 *                           dx[j+h] = bf16(bf16(dy[j+h] c[j+h]) - bf16(dy[j] s[j])).
 */
static inline float round_bf16(float v) { return bf16_to_f32(f32_to_bf16(v)); }

static void rope_row(const uint16_t *restrict x, const uint16_t *restrict c, const uint16_t *restrict s,
                     uint16_t *restrict y, int64_t half, int backward) {
    float sign = backward ? -1.0f : 1.0f;
#pragma omp simd
    for (int64_t j = 0; j < half; j++) {
        float x1 = bf16_to_f32(x[j]), x2 = bf16_to_f32(x[j + half]);
        float c1 = bf16_to_f32(c[j]), c2 = bf16_to_f32(c[j + half]);
        float s1 = bf16_to_f32(s[j]), s2 = bf16_to_f32(s[j + half]);
        /* forward: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2; backward: dx1 = d1 c1 + d2 s2, dx2 = d2 c2 - d1 s1 */
        float a1 = backward ? round_bf16(x2 * s2) : round_bf16(x2 * s1);
        float a2 = backward ? round_bf16(x1 * s1) : round_bf16(x1 * s2);
        y[j] = f32_to_bf16(round_bf16(x1 * c1) - sign * a1);
        y[j + half] = f32_to_bf16(round_bf16(x2 * c2) + sign * a2);
    }
}

void rope_bf16(const uint16_t *x, const uint16_t *cos_table, const uint16_t *sin_table, uint16_t *y, int64_t seq,
               int64_t rows, int64_t dim, int backward) {
    int64_t total = seq * rows;
#pragma omp parallel for schedule(static) if (total * dim >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < total; r++) {
        int64_t pos = r / rows;
        rope_row(x + r * dim, cos_table + pos * dim, sin_table + pos * dim, y + r * dim, dim / 2, backward);
    }
}

/* ------------------------------------------------------------------ router top-k
 * mask[i, j] = 1 for the k largest scores of row i (ties: the lower expert index first; NaN counts as
 * the largest value, as torch.topk orders it).
 */
void topk_mask_f32(const float *scores, uint8_t *mask, int64_t rows, int64_t width, int64_t k) {
    if (k > width) k = width;
#pragma omp parallel if (rows * width >= PARALLEL_MIN_ELEMENTS)
    {
        int64_t *top = malloc((size_t)(k > 0 ? k : 1) * sizeof(int64_t)); /* indices, best first */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) {
            const float *row = scores + i * width;
            uint8_t *out = mask + i * width;
            int64_t filled = 0;
            for (int64_t j = 0; j < width; j++) {
                float v = row[j];
                int v_nan = v != v;
                /* position of j among the kept ones: after every kept value it does not beat */
                int64_t pos = filled;
                while (pos > 0) {
                    float b = row[top[pos - 1]];
                    int beats = (v_nan && b == b) || (!v_nan && b == b && v > b);
                    if (!beats) break;
                    pos--;
                }
                if (pos >= k) continue;
                int64_t last = filled < k ? filled : k - 1;
                for (int64_t q = last; q > pos; q--) top[q] = top[q - 1];
                top[pos] = j;
                if (filled < k) filled++;
            }
            for (int64_t j = 0; j < width; j++) out[j] = 0;
            for (int64_t q = 0; q < filled; q++) out[top[q]] = 1;
        }
        free(top);
    }
}

/* ------------------------------------------------------------------ gradient norm
 * Sum of squares of fp32 tensors, accumulated in double (per thread, then over threads).
 */
static float sum_squares_range(const float *restrict x, int64_t n) {
    float part = 0.0f;
#pragma omp simd reduction(+ : part)
    for (int64_t j = 0; j < n; j++) part += x[j] * x[j];
    return part;
}

double sum_squares_f32(int64_t count, float *const *tensors, const int64_t *numels) {
    double total = 0.0;
#pragma omp parallel reduction(+ : total)
    FOR_EACH_CHUNK(count, numels, t, start, len, total += (double)sum_squares_range(tensors[t] + start, len);)
    return total;
}

/* ------------------------------------------------------------------ expert row padding
 * Tokens arrive grouped by expert; expert e's `counts[e]` rows go to the start of its `padded[e]`
 * rows and the rest are zeroed (only those: the real rows are written once). `unpad` is the
 * inverse gather (padded rows -> the tokens' rows).
 */
void pad_rows(const uint8_t *src, uint8_t *dst, const int64_t *counts, const int64_t *padded, int64_t experts,
              int64_t row_bytes, int unpad) {
    int64_t *src_start = malloc((size_t)experts * sizeof(int64_t));
    int64_t *dst_start = malloc((size_t)experts * sizeof(int64_t));
    int64_t s = 0, d = 0;
    for (int64_t e = 0; e < experts; e++) {
        src_start[e] = s;
        dst_start[e] = d;
        s += counts[e];
        d += padded[e];
    }
#pragma omp parallel for schedule(dynamic, 1) if (d * row_bytes >= 8 * PARALLEL_MIN_ELEMENTS)
    for (int64_t e = 0; e < experts; e++) {
        size_t real = (size_t)(counts[e] * row_bytes);
        if (unpad) {
            memcpy(dst + src_start[e] * row_bytes, src + dst_start[e] * row_bytes, real);
        } else {
            memcpy(dst + dst_start[e] * row_bytes, src + src_start[e] * row_bytes, real);
            memset(dst + (dst_start[e] + counts[e]) * row_bytes, 0, (size_t)((padded[e] - counts[e]) * row_bytes));
        }
    }
    free(src_start);
    free(dst_start);
}

/* ------------------------------------------------------------------ attention operands
 * bf16 [B, S, D] with any strides (head dim unit stride) -> contiguous fp32, times `scale`; and the
 * flash backward's row term rowsum(dO * O) read straight from bf16.
 */
static void widen_row(const uint16_t *restrict x, float *restrict y, int64_t n, float scale) {
#pragma omp simd
    for (int64_t j = 0; j < n; j++) y[j] = bf16_to_f32(x[j]) * scale;
}

void bf16_to_f32_bsd(const uint16_t *x, float *y, int64_t blocks, int64_t seq, int64_t dim, int64_t stride_b,
                     int64_t stride_s, float scale) {
    int64_t rows = blocks * seq;
#pragma omp parallel for schedule(static) if (rows * dim >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++)
        widen_row(x + (r / seq) * stride_b + (r % seq) * stride_s, y + r * dim, dim, scale);
}

static float dot_row(const uint16_t *restrict a, const uint16_t *restrict b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; j++) s += bf16_to_f32(a[j]) * bf16_to_f32(b[j]);
    return s;
}

void row_dot_bf16(const uint16_t *a, const uint16_t *b, float *out, int64_t blocks, int64_t seq, int64_t dim,
                  int64_t a_stride_b, int64_t a_stride_s, int64_t b_stride_b, int64_t b_stride_s) {
    int64_t rows = blocks * seq;
#pragma omp parallel for schedule(static) if (rows * dim >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        int64_t i = r / seq, s = r % seq;
        out[r] = dot_row(a + i * a_stride_b + s * a_stride_s, b + i * b_stride_b + s * b_stride_s, dim);
    }
}

/* ------------------------------------------------------------------ MoE unpermute
 * out[t] = sum of the rows r with token[r] == t (bf16 rows, fp32 sum in row order, one rounding):
 * Megatron's unpermute (a bf16 scatter_add into zeros) without its per-add rounding.
 */
static void accumulate_row(float *restrict acc, const uint16_t *restrict row, int64_t n) {
#pragma omp simd
    for (int64_t j = 0; j < n; j++) acc[j] += bf16_to_f32(row[j]);
}

void combine_rows_bf16(const uint16_t *rows, const int64_t *token_of_row, uint16_t *out, int64_t num_rows,
                       int64_t num_tokens, int64_t width) {
    int64_t *start = calloc((size_t)num_tokens + 1, sizeof(int64_t));
    int64_t *order = malloc((size_t)(num_rows > 0 ? num_rows : 1) * sizeof(int64_t));
    for (int64_t r = 0; r < num_rows; r++) start[token_of_row[r] + 1]++;
    for (int64_t t = 0; t < num_tokens; t++) start[t + 1] += start[t];
    int64_t *fill = malloc((size_t)(num_tokens > 0 ? num_tokens : 1) * sizeof(int64_t));
    memcpy(fill, start, (size_t)num_tokens * sizeof(int64_t));
    for (int64_t r = 0; r < num_rows; r++) order[fill[token_of_row[r]]++] = r; /* rows of a token in order */
#pragma omp parallel if (num_tokens * width >= PARALLEL_MIN_ELEMENTS)
    {
        float *acc = malloc((size_t)width * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < num_tokens; t++) {
            for (int64_t j = 0; j < width; j++) acc[j] = 0.0f;
            for (int64_t k = start[t]; k < start[t + 1]; k++) accumulate_row(acc, rows + order[k] * width, width);
            uint16_t *o = out + t * width;
            for (int64_t j = 0; j < width; j++) o[j] = f32_to_bf16(acc[j]);
        }
        free(acc);
    }
    free(fill);
    free(order);
    free(start);
}
