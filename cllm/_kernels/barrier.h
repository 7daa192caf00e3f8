/* A barrier for the threads of one OpenMP team that meet many times in a short while: a decoding step's threads
   meet about ten times a layer, a few microseconds of work apart, where a barrier that puts its threads to sleep
   (OpenMP's, once their short spin runs out) costs tens of microseconds to wake them. A waiting
   thread spins for a while, then yields its CPU, so that a team sharing the machine with other work still
   progresses. Centralized and sense-reversing: the last thread to arrive resets the count, then opens the phase. */
#ifndef CLLM_BARRIER_H
#define CLLM_BARRIER_H

#include <sched.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CLLM_PAUSE() _mm_pause()
#else
#define CLLM_PAUSE() ((void)0)
#endif

typedef struct {
    int arrived;
    int phase;
} spin_barrier;

enum { SPINS_BEFORE_YIELD = 128 }; /* a few microseconds of pause instructions */

static inline void spin_barrier_wait(spin_barrier *b, int threads) {
    if (threads <= 1) return;
    int phase = __atomic_load_n(&b->phase, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&b->arrived, 1, __ATOMIC_ACQ_REL) == threads) {
        __atomic_store_n(&b->arrived, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->phase, phase + 1, __ATOMIC_RELEASE);
        return;
    }
    for (long spins = 0; __atomic_load_n(&b->phase, __ATOMIC_ACQUIRE) == phase; spins++) {
        if (spins < SPINS_BEFORE_YIELD)
            CLLM_PAUSE();
        else
            sched_yield();
    }
}

#endif
