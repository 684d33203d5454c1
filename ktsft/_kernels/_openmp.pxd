# The only door to OpenMP in ktsft.  Built without OpenMP, the stubs keep
# every call valid and prange runs serially.
cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define KTSFT_OPENMP 1
    #else
    #define KTSFT_OPENMP 0
    static inline int omp_get_max_threads(void) { return 1; }
    static inline int omp_get_thread_num(void) { return 0; }
    static inline int omp_get_num_threads(void) { return 1; }
    #endif
    #include <errno.h>
    #include <pthread.h>
    #include <stdlib.h>

    /* GNU OpenMP exits the process ("Thread creation failed") when it
       cannot create a team's threads (an address-space or process limit).
       ktsft_probe_threads creates n threads with the stack size libgomp
       uses (0: the default attributes), all alive at once, then joins
       them: 0 when they could be made, else the error of the first that
       could not.  The caller then raises instead of entering the region. */
    typedef struct { pthread_mutex_t mu; pthread_cond_t cv; int go; } ktsft_probe_gate;

    static void *ktsft_probe_wait(void *arg)
    {
        ktsft_probe_gate *g = (ktsft_probe_gate *)arg;
        pthread_mutex_lock(&g->mu);
        while (!g->go) pthread_cond_wait(&g->cv, &g->mu);
        pthread_mutex_unlock(&g->mu);
        return NULL;
    }

    static int ktsft_probe_threads(int n, size_t stack)
    {
        if (n <= 0) return 0;
        pthread_t *t = (pthread_t *)malloc((size_t)n * sizeof(pthread_t));
        if (!t) return ENOMEM;
        pthread_attr_t attr;
        int err = pthread_attr_init(&attr);
        if (!err && stack) err = pthread_attr_setstacksize(&attr, stack);
        ktsft_probe_gate g = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};
        int made = 0;
        while (!err && made < n) {
            err = pthread_create(&t[made], &attr, ktsft_probe_wait, &g);
            if (!err) ++made;
        }
        pthread_mutex_lock(&g.mu);
        g.go = 1;
        pthread_cond_broadcast(&g.cv);
        pthread_mutex_unlock(&g.mu);
        for (int i = 0; i < made; ++i) pthread_join(t[i], NULL);
        pthread_attr_destroy(&attr);
        free(t);
        return err;
    }
    """
    bint KTSFT_OPENMP
    int omp_get_max_threads() noexcept nogil
    int omp_get_thread_num() noexcept nogil
    int omp_get_num_threads() noexcept nogil
    int ktsft_probe_threads(int n, size_t stack) noexcept nogil
