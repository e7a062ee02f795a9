/* kprune's exact selection on the CPU (lib/pruning/selection.py, lib/pruning/pruner.py).
 *
 * kprune_histogram: the two radix-histogram passes that find the k-th key.
 * kprune_select_store: the pass after them, when every key equal to the threshold is
 * selected: the mask bits (key <= threshold, 8 to a byte, least significant bit first)
 * and the zeroing of each selected weight and its optimizer states, in one pass.
 *
 * Keys are int32. Pass 1 counts every key by its top 16 bits (bin = (key >> 16) + 32768);
 * pass 2 counts, by their low 16 bits, only the keys whose top 16 bits are `high`. Each
 * pass reads the keys once and writes nothing else: what torch's version (shift, add,
 * compare, gather, bincount with its own min/max passes) did in several.
 *
 * `threads` POSIX threads each count a contiguous range into their own 65,536 bins,
 * which are then added into `hist` (int64, 65,536 bins, not cleared here).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BINS 65536
#define MAX_THREADS 64

typedef struct {
    const int32_t *keys;
    int64_t begin, end;
    int low_pass;
    int32_t high;
    int64_t *hist;
} hist_work;

static void *count(void *arg)
{
    hist_work *w = arg;
    const int32_t *restrict k = w->keys;
    int64_t *restrict h = w->hist;
    if (!w->low_pass) {
        for (int64_t i = w->begin; i < w->end; i++)
            h[(k[i] >> 16) + 32768]++;
    } else {
        const int32_t high = w->high;
        for (int64_t i = w->begin; i < w->end; i++)
            if ((k[i] >> 16) == high)
                h[k[i] & 0xFFFF]++;
    }
    return NULL;
}

int kprune_histogram(const int32_t *keys, int64_t n, int low_pass, int32_t high, int64_t *hist, int threads)
{
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads < 1 || n < (int64_t)1 << 18)  /* a thread's own bins cost more than it saves below this */
        threads = 1;
    hist_work work[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int64_t *own = threads > 1 ? calloc((size_t)(threads - 1) * BINS, sizeof(int64_t)) : NULL;
    if (threads > 1 && own == NULL)
        threads = 1;
    int64_t per = (n + threads - 1) / threads;
    for (int i = 0; i < threads; i++) {
        int64_t begin = per * i < n ? per * i : n, end = per * (i + 1) < n ? per * (i + 1) : n;
        work[i] = (hist_work){keys, begin, end, low_pass, high, i == 0 ? hist : own + (int64_t)(i - 1) * BINS};
    }
    int started = 1;
    for (; started < threads; started++)
        if (pthread_create(&ids[started], NULL, count, &work[started]) != 0)
            break;
    count(&work[0]);
    for (int i = started; i < threads; i++)  /* a thread that could not start: its range here */
        count(&work[i]);
    for (int i = 1; i < started; i++)
        pthread_join(ids[i], NULL);
    for (int i = 1; i < threads; i++)
        for (int b = 0; b < BINS; b++)
            hist[b] += own[(int64_t)(i - 1) * BINS + b];
    free(own);
    return 0;
}

typedef struct {
    const int32_t *keys;
    int64_t n, begin, end;          /* element range, begin a multiple of 8 */
    int32_t threshold;
    uint8_t *bits;
    float *const *targets;          /* the weight and its optimizer states, zeroed where selected */
    int ntargets;
} select_work;

#define BLOCK 4096                  /* elements per block: its keys stay in L1 for the zeroing loops */

static void *select_store(void *arg)
{
    const select_work *w = arg;
    const int32_t *restrict k = w->keys;
    const int32_t thr = w->threshold;
    for (int64_t b0 = w->begin; b0 < w->end; b0 += BLOCK) {
        int64_t b1 = b0 + BLOCK < w->end ? b0 + BLOCK : w->end;
        for (int64_t i = b0; i < b1; i += 8) {
            uint8_t byte = 0;
            for (int j = 0; j < 8 && i + j < w->n; j++)
                byte |= (uint8_t)((k[i + j] <= thr) << j);
            w->bits[i / 8] = byte;
        }
        for (int t = 0; t < w->ntargets; t++) {
            float *restrict x = w->targets[t];
            for (int64_t i = b0; i < b1; i++)
                x[i] = k[i] <= thr ? 0.0f : x[i];
        }
    }
    return NULL;
}

int kprune_select_store(const int32_t *keys, int64_t n, int32_t threshold, uint8_t *bits, float *const *targets,
                        int ntargets, int threads)
{
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads < 1 || n < (int64_t)1 << 16)
        threads = 1;
    select_work work[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int64_t per = (n + threads - 1) / threads;
    per = (per + 63) / 64 * 64;     /* whole bytes of bits and whole cache lines per thread */
    for (int i = 0; i < threads; i++) {
        int64_t begin = per * i < n ? per * i : n, end = per * (i + 1) < n ? per * (i + 1) : n;
        work[i] = (select_work){keys, n, begin, end, threshold, bits, targets, ntargets};
    }
    int started = 1;
    for (; started < threads; started++)
        if (pthread_create(&ids[started], NULL, select_store, &work[started]) != 0)
            break;
    select_store(&work[0]);
    for (int i = started; i < threads; i++)
        select_store(&work[i]);
    for (int i = 1; i < started; i++)
        pthread_join(ids[i], NULL);
    return 0;
}
