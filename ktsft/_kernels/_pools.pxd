# NUMA thread pools (threadpool_count > 1): the CPU set each pool's threads
# are pinned to while they run a phase, and the atomic task cursor they share.
# Which CPUs and experts a pool has is decided in Python (ktsft/_numa.py);
# this only carries it out.  A thread's own affinity is saved when it enters
# a pool and restored when it leaves, so the calling (Python) thread and the
# OpenMP workers come out of a call as they went in.
from libc.stdint cimport int32_t, int64_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <stdlib.h>
    #ifdef __linux__
    #include <sched.h>

    /* Pool p's CPUs: a cpu_set_t each.  CPUs >= CPU_SETSIZE are refused in
       Python (ktsft/_numa.py), so every set is the fixed glibc size. */
    typedef struct { int n; cpu_set_t *set; } kt_pools;

    static kt_pools *kt_pools_new(int n, const int32_t *cpus, const int32_t *offs)
    {
        kt_pools *p = (kt_pools *)malloc(sizeof(kt_pools));
        if (!p) return NULL;
        p->n = n;
        p->set = (cpu_set_t *)calloc((size_t)n, sizeof(cpu_set_t));
        if (!p->set) { free(p); return NULL; }
        for (int i = 0; i < n; ++i)
            for (int32_t j = offs[i]; j < offs[i + 1]; ++j)
                if (cpus[j] >= 0 && cpus[j] < CPU_SETSIZE) CPU_SET(cpus[j], &p->set[i]);
        return p;
    }

    static void kt_pools_free(kt_pools *p)
    {
        if (p) { free(p->set); free(p); }
    }

    /* The calling thread's affinity while it is in a pool.  sched_*affinity
       with pid 0 act on the calling thread only.  A failure (the CPUs left
       the process's cpuset since the pools were made) leaves the thread
       where it is: the pool then runs unpinned, with the same results. */
    static __thread cpu_set_t kt_saved_mask;
    static __thread int kt_pinned;

    static void kt_pool_enter(const kt_pools *p, int pool)
    {
        kt_pinned = 0;
        if (!p || pool < 0 || pool >= p->n) return;
        if (sched_getaffinity(0, sizeof(cpu_set_t), &kt_saved_mask) != 0) return;
        kt_pinned = sched_setaffinity(0, sizeof(cpu_set_t), &p->set[pool]) == 0;
    }

    static void kt_pool_leave(void)
    {
        if (kt_pinned) sched_setaffinity(0, sizeof(cpu_set_t), &kt_saved_mask);
        kt_pinned = 0;
    }

    /* The CPU the calling thread runs on (a test of the pinning). */
    static int kt_current_cpu(void) { return sched_getcpu(); }
    #else  /* no thread affinity to set: pools schedule as on Linux, unpinned */
    typedef struct { int n; } kt_pools;
    static kt_pools *kt_pools_new(int n, const int32_t *cpus, const int32_t *offs)
    {
        (void)cpus; (void)offs;
        kt_pools *p = (kt_pools *)malloc(sizeof(kt_pools));
        if (p) p->n = n;
        return p;
    }
    static void kt_pools_free(kt_pools *p) { free(p); }
    static void kt_pool_enter(const kt_pools *p, int pool) { (void)p; (void)pool; }
    static void kt_pool_leave(void) {}
    static int kt_current_cpu(void) { return -1; }
    #endif

    static inline int64_t kt_fetch_add(int64_t *p, int64_t v)
    {
        return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
    }
    """
    ctypedef struct kt_pools:
        int n
    kt_pools *kt_pools_new(int n, const int32_t *cpus, const int32_t *offs) noexcept nogil
    void kt_pools_free(kt_pools *p) noexcept nogil
    void kt_pool_enter(const kt_pools *p, int pool) noexcept nogil
    void kt_pool_leave() noexcept nogil
    int kt_current_cpu() noexcept nogil
    int64_t kt_fetch_add(int64_t *p, int64_t v) noexcept nogil
