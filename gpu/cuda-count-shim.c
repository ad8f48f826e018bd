/*
 * cuda-count-shim.c: a test shim for the real NVIDIA driver, loaded with LD_PRELOAD.
 *
 * It has the shape of a vGPU/CUDA interception shim (HAMi-core's libvgpu.so and the like): it
 * interposes cuDeviceGetCount on every path by which a program reaches it,
 *   - a direct call (the exported symbol comes before libcuda's in the global scope),
 *   - dlsym(handle, "cuDeviceGetCount") (dlsym itself is interposed; the real one is found with
 *     dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34"), or "GLIBC_2.2.5" on glibc < 2.34),
 *   - cuGetProcAddress / cuGetProcAddress_v2, which the CUDA runtime (libcudart) uses to fetch
 *     every driver entry point: the runtime gets cuGetProcAddress from libcuda with dlsym, so
 *     dlsym hands out this shim's, and this shim's replaces the driver's answer for
 *     "cuDeviceGetCount" (and for "cuGetProcAddress" itself);
 * forwards each call to the real driver (dlopen("libcuda.so.1")), counts the calls, and reports
 * the real count, or VGPU_SHIM_DEVICES if that is set. Every call logs one line to stderr:
 *
 *   [cuda-count-shim] pid=N cuDeviceGetCount -> C (calls=K)
 *
 * (followed by " virtual, real=R" when VGPU_SHIM_DEVICES set the answer), and at exit:
 *
 *   [cuda-count-shim] pid=N exit: cuDeviceGetCount calls=K
 *
 * Build: gcc -O2 -Wall -shared -fPIC -o libcuda-count-shim.so cuda-count-shim.c -ldl -lpthread
 *
 * Limitation shared by every shim that interposes dlsym: dlsym(RTLD_NEXT, name) called by another
 * library is resolved as if this shim had called it (glibc reads the caller's address).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int CUresult;
typedef unsigned long long cuuint64_t;
typedef void *(*dlsym_fn)(void *, const char *);
typedef CUresult (*count_fn)(int *);
typedef CUresult (*gpa_fn)(const char *, void **, int, cuuint64_t);
typedef CUresult (*gpa2_fn)(const char *, void **, int, cuuint64_t, int *);

#define CUDA_SUCCESS 0
#define CUDA_ERROR_INVALID_VALUE 1
#define CUDA_ERROR_NOT_FOUND 500
#define CU_GET_PROC_ADDRESS_SUCCESS 0

static dlsym_fn real_dlsym;
static pthread_once_t dlsym_once = PTHREAD_ONCE_INIT;
static pthread_once_t driver_once = PTHREAD_ONCE_INIT;
static void *libcuda;
/* Filled from libcuda's exports, or from the driver's cuGetProcAddress answers. */
static _Atomic(count_fn) real_count;
static _Atomic(gpa_fn) real_gpa;
static _Atomic(gpa2_fn) real_gpa2;
static atomic_long calls;

CUresult cuDeviceGetCount(int *count);
CUresult cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags);
CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags,
                             int *symbolStatus);

/* One line to stderr with a single write(2): no stdio lock, safe at exit and from any thread. */
static void say(const char *fmt, ...)
{
    char buf[256];
    int n = snprintf(buf, sizeof buf, "[cuda-count-shim] pid=%ld ", (long)getpid());
    va_list ap;

    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof buf - (size_t)n, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 2)
        n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    int saved = errno;
    ssize_t w = write(STDERR_FILENO, buf, (size_t)n);
    (void)w;
    errno = saved;
}

static void find_real_dlsym(void)
{
    real_dlsym = (dlsym_fn)dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34");
    if (!real_dlsym)
        real_dlsym = (dlsym_fn)dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.2.5");
    if (!real_dlsym) {
        say("cannot find the real dlsym");
        abort();
    }
}

static void open_driver(void)
{
    pthread_once(&dlsym_once, find_real_dlsym);
    libcuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!libcuda) {
        say("dlopen(libcuda.so.1) failed: %s", dlerror());
        return;
    }
    count_fn c = NULL;
    gpa_fn g = NULL;
    gpa2_fn g2 = NULL;
    atomic_compare_exchange_strong(&real_count, &c,
                                   (count_fn)real_dlsym(libcuda, "cuDeviceGetCount"));
    atomic_compare_exchange_strong(&real_gpa, &g, (gpa_fn)real_dlsym(libcuda, "cuGetProcAddress"));
    atomic_compare_exchange_strong(&real_gpa2, &g2,
                                   (gpa2_fn)real_dlsym(libcuda, "cuGetProcAddress_v2"));
}

/* Remember `fn` as the real function if none is known yet (first answer wins). */
#define REMEMBER(slot, type, fn)                                                                 \
    do {                                                                                         \
        type expected_ = NULL;                                                                   \
        if ((fn) != NULL)                                                                        \
            atomic_compare_exchange_strong(&(slot), &expected_, (type)(fn));                     \
    } while (0)

static int virtual_count(int *out)
{
    const char *v = getenv("VGPU_SHIM_DEVICES");
    char *end;
    long n;

    if (!v || !*v)
        return 0;
    errno = 0;
    n = strtol(v, &end, 10);
    if (errno || *end || n < 0 || n > 1024)
        return 0;
    *out = (int)n;
    return 1;
}

CUresult cuDeviceGetCount(int *count)
{
    long k = atomic_fetch_add(&calls, 1) + 1;
    count_fn real;
    CUresult rc;
    int real_n, virt;

    pthread_once(&driver_once, open_driver);
    real = atomic_load(&real_count);
    if (!real) {
        say("cuDeviceGetCount -> no driver (calls=%ld)", k);
        return CUDA_ERROR_NOT_FOUND;
    }
    if (!count)
        return real(count);
    rc = real(&real_n);
    if (rc != CUDA_SUCCESS) {
        say("cuDeviceGetCount -> error %d (calls=%ld)", rc, k);
        return rc;
    }
    if (virtual_count(&virt)) {
        *count = virt;
        say("cuDeviceGetCount -> %d (calls=%ld) virtual, real=%d", virt, k, real_n);
    } else {
        *count = real_n;
        say("cuDeviceGetCount -> %d (calls=%ld)", real_n, k);
    }
    return CUDA_SUCCESS;
}

/*
 * The driver answered `symbol` with *pfn: replace the answers that lead to cuDeviceGetCount.
 * "cuGetProcAddress" asked with cudaVersion >= 12000 is the _v2 entry point (5 arguments).
 */
static void substitute(const char *symbol, void **pfn, int cudaVersion)
{
    if (!*pfn)
        return;
    if (strcmp(symbol, "cuDeviceGetCount") == 0) {
        REMEMBER(real_count, count_fn, *pfn);
        *pfn = (void *)cuDeviceGetCount;
    } else if (strcmp(symbol, "cuGetProcAddress") == 0 ||
               strcmp(symbol, "cuGetProcAddress_v2") == 0) {
        int v2 = symbol[16] != '\0' || cudaVersion >= 12000 ||
                 *pfn == (void *)atomic_load(&real_gpa2);
        if (*pfn == (void *)atomic_load(&real_gpa))
            v2 = 0;
        if (v2) {
            REMEMBER(real_gpa2, gpa2_fn, *pfn);
            *pfn = (void *)cuGetProcAddress_v2;
        } else {
            REMEMBER(real_gpa, gpa_fn, *pfn);
            *pfn = (void *)cuGetProcAddress;
        }
    }
}

CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags,
                             int *symbolStatus)
{
    gpa2_fn real;
    CUresult rc;

    pthread_once(&driver_once, open_driver);
    real = atomic_load(&real_gpa2);
    if (!real)
        return CUDA_ERROR_NOT_FOUND;
    rc = real(symbol, pfn, cudaVersion, flags, symbolStatus);
    if (rc == CUDA_SUCCESS && symbol && pfn)
        substitute(symbol, pfn, cudaVersion);
    return rc;
}

CUresult cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags)
{
    gpa_fn real;
    CUresult rc;

    pthread_once(&driver_once, open_driver);
    real = atomic_load(&real_gpa);
    if (!real) {
        /* a driver without the old entry point: ask the new one */
        gpa2_fn real2 = atomic_load(&real_gpa2);
        if (!real2)
            return CUDA_ERROR_NOT_FOUND;
        rc = real2(symbol, pfn, cudaVersion, flags, NULL);
    } else {
        rc = real(symbol, pfn, cudaVersion, flags);
    }
    if (rc == CUDA_SUCCESS && symbol && pfn)
        substitute(symbol, pfn, cudaVersion);
    return rc;
}

void *dlsym(void *handle, const char *symbol)
{
    void *real;

    pthread_once(&dlsym_once, find_real_dlsym);
    if (symbol[0] != 'c' || symbol[1] != 'u') /* fast path: not a CUDA name */
        return real_dlsym(handle, symbol);
    if (strcmp(symbol, "cuDeviceGetCount") == 0) {
        real = real_dlsym(handle, symbol);
        if (!real) /* keep the answer for a handle that has no such symbol */
            return NULL;
        if (real != (void *)cuDeviceGetCount)
            REMEMBER(real_count, count_fn, real);
        return (void *)cuDeviceGetCount;
    }
    if (strcmp(symbol, "cuGetProcAddress") == 0) {
        real = real_dlsym(handle, symbol);
        if (!real)
            return NULL;
        if (real != (void *)cuGetProcAddress)
            REMEMBER(real_gpa, gpa_fn, real);
        return (void *)cuGetProcAddress;
    }
    if (strcmp(symbol, "cuGetProcAddress_v2") == 0) {
        real = real_dlsym(handle, symbol);
        if (!real)
            return NULL;
        if (real != (void *)cuGetProcAddress_v2)
            REMEMBER(real_gpa2, gpa2_fn, real);
        return (void *)cuGetProcAddress_v2;
    }
    return real_dlsym(handle, symbol);
}

__attribute__((destructor)) static void shim_exit(void)
{
    say("exit: cuDeviceGetCount calls=%ld", atomic_load(&calls));
}
