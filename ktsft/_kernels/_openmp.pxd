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
    #endif
    """
    bint KTSFT_OPENMP
    int omp_get_max_threads() noexcept nogil
    int omp_get_thread_num() noexcept nogil
