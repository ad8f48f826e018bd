//go:build ignore
// (keeps "go build" of main.go from compiling this file into the Go program; build.sh builds it)

/*
 * vgpu-test-shim.c: a stand-in for a vGPU/CUDA interception shim (HAMi-core and the like), built
 * as libvgpu-test-shim.so and loaded with LD_PRELOAD.
 *
 * It makes cuDeviceGetCount report the number of devices in the environment variable
 * VGPU_TEST_DEVICES (default 1), however the program reaches the function:
 *   - a direct call (the exported symbol interposes the driver's),
 *   - dlopen("libcuda.so.1") + dlsym(handle, "cuDeviceGetCount") (dlsym itself is interposed; the
 *     real one is found with dlvsym(RTLD_NEXT, "dlsym", <glibc version>), as real shims do),
 *   - cuGetProcAddress / cuGetProcAddress_v2 (the driver's answer is replaced).
 * Every call logs "[vgpu-test-shim] cuDeviceGetCount() pid=N count=M" to stderr; loading the shim
 * logs "[vgpu-test-shim] loaded pid=N".
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int CUresult;
typedef unsigned long long cuuint64_t;
typedef void *(*dlsym_fn)(void *, const char *);
typedef CUresult (*gpa_fn)(const char *, void **, int, cuuint64_t);
typedef CUresult (*gpa2_fn)(const char *, void **, int, cuuint64_t, int *);

#define CUDA_SUCCESS 0
#define CUDA_ERROR_INVALID_VALUE 1
#define CUDA_ERROR_NOT_FOUND 500

static dlsym_fn real_dlsym;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static gpa_fn real_gpa;
static gpa2_fn real_gpa2;

static void find_real_dlsym(void)
{
    static const char *versions[] = {"GLIBC_2.34", "GLIBC_2.2.5", "GLIBC_2.17", "GLIBC_2.0"};

    for (size_t i = 0; i < sizeof versions / sizeof versions[0] && !real_dlsym; i++)
        real_dlsym = (dlsym_fn)dlvsym(RTLD_NEXT, "dlsym", versions[i]);
    if (!real_dlsym) {
        fprintf(stderr, "[vgpu-test-shim] cannot find the real dlsym\n");
        abort();
    }
}

__attribute__((constructor)) static void shim_loaded(void)
{
    fprintf(stderr, "[vgpu-test-shim] loaded pid=%ld\n", (long)getpid());
}

CUresult cuDeviceGetCount(int *count)
{
    const char *v = getenv("VGPU_TEST_DEVICES");
    int n = v && *v ? atoi(v) : 1;

    if (!count)
        return CUDA_ERROR_INVALID_VALUE;
    *count = n;
    fprintf(stderr, "[vgpu-test-shim] cuDeviceGetCount() pid=%ld count=%d\n", (long)getpid(), n);
    return CUDA_SUCCESS;
}

static void *replacement(const char *symbol)
{
    if (strcmp(symbol, "cuDeviceGetCount") == 0)
        return (void *)cuDeviceGetCount;
    return NULL;
}

CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags,
                             int *symbolStatus)
{
    CUresult rc;

    pthread_once(&once, find_real_dlsym);
    if (!real_gpa2)
        real_gpa2 = (gpa2_fn)real_dlsym(RTLD_NEXT, "cuGetProcAddress_v2");
    if (!symbol || !pfn)
        return CUDA_ERROR_INVALID_VALUE;
    if (replacement(symbol)) {
        *pfn = replacement(symbol);
        if (symbolStatus)
            *symbolStatus = 0;
        return CUDA_SUCCESS;
    }
    if (!real_gpa2)
        return CUDA_ERROR_NOT_FOUND;
    rc = real_gpa2(symbol, pfn, cudaVersion, flags, symbolStatus);
    if (rc == CUDA_SUCCESS && strncmp(symbol, "cuGetProcAddress", 16) == 0) {
        real_gpa2 = (gpa2_fn)*pfn;
        *pfn = (void *)cuGetProcAddress_v2;
    }
    return rc;
}

CUresult cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags)
{
    CUresult rc;

    pthread_once(&once, find_real_dlsym);
    if (!real_gpa)
        real_gpa = (gpa_fn)real_dlsym(RTLD_NEXT, "cuGetProcAddress");
    if (symbol && pfn && replacement(symbol)) {
        *pfn = replacement(symbol);
        return CUDA_SUCCESS;
    }
    if (!real_gpa)
        return CUDA_ERROR_NOT_FOUND;
    rc = real_gpa(symbol, pfn, cudaVersion, flags);
    if (rc == CUDA_SUCCESS && symbol && strncmp(symbol, "cuGetProcAddress", 16) == 0) {
        /* the driver hands out its _v2 entry point; hand out ours */
        if (!real_gpa2)
            real_gpa2 = (gpa2_fn)*pfn;
        *pfn = (void *)cuGetProcAddress_v2;
    }
    return rc;
}

void *dlsym(void *handle, const char *symbol)
{
    void *real;

    pthread_once(&once, find_real_dlsym);
    if (replacement(symbol))
        return replacement(symbol);
    if (strcmp(symbol, "cuGetProcAddress") == 0 || strcmp(symbol, "cuGetProcAddress_v2") == 0) {
        /* The library may be loaded RTLD_LOCAL, out of RTLD_NEXT's reach: keep the handle's. */
        real = real_dlsym(handle, symbol);
        if (!real)
            return NULL;
        if (symbol[16] == '\0') {
            real_gpa = (gpa_fn)real;
            return (void *)cuGetProcAddress;
        }
        real_gpa2 = (gpa2_fn)real;
        return (void *)cuGetProcAddress_v2;
    }
    return real_dlsym(handle, symbol);
}
