/* Lab stand-in for the driver's libcuda.so.1, also built with -DLAB_STUB as the toolkit's
 * lib64/stubs/libcuda.so. It loads and answers like the real library on a host whose kernel
 * module is not running: version queries work, cuInit finds no device, the rest needs cuInit.
 * No libc calls, so the library loads on any glibc the lab distros ship. */
#ifdef LAB_STUB
#define NOT_READY 34 /* CUDA_ERROR_STUB_LIBRARY: the stub is for linking, never for running */
#define INIT_RESULT 34
#else
#define NOT_READY 3 /* CUDA_ERROR_NOT_INITIALIZED: cuInit never succeeded */
#define INIT_RESULT 100 /* CUDA_ERROR_NO_DEVICE */
#endif
#ifndef LAB_CUDA_VERSION
#define LAB_CUDA_VERSION 0
#endif

int cuInit(unsigned int flags) { (void)flags; return INIT_RESULT; }

int cuDriverGetVersion(int *version)
{
#ifdef LAB_STUB
    (void)version;
    return NOT_READY;
#else
    if (!version)
        return 1; /* CUDA_ERROR_INVALID_VALUE */
    *version = LAB_CUDA_VERSION;
    return 0;
#endif
}

int cuDeviceGetCount(int *count)
{
    if (count)
        *count = 0;
    return NOT_READY;
}

static const char *error_name(int e)
{
    switch (e) {
    case 0: return "CUDA_SUCCESS";
    case 1: return "CUDA_ERROR_INVALID_VALUE";
    case 3: return "CUDA_ERROR_NOT_INITIALIZED";
    case 34: return "CUDA_ERROR_STUB_LIBRARY";
    case 100: return "CUDA_ERROR_NO_DEVICE";
    default: return 0;
    }
}

static const char *error_string(int e)
{
    switch (e) {
    case 0: return "no error";
    case 1: return "invalid argument";
    case 3: return "initialization error";
    case 34: return "CUDA driver is a stub library";
    case 100: return "no CUDA-capable device is detected";
    default: return 0;
    }
}

int cuGetErrorName(int e, const char **s)
{
    if (!s)
        return 1;
    *s = error_name(e);
    return *s ? 0 : 1;
}

int cuGetErrorString(int e, const char **s)
{
    if (!s)
        return 1;
    *s = error_string(e);
    return *s ? 0 : 1;
}

/* Extra arguments from callers are harmless: the x86-64 ABI leaves them to the caller. */
#define NEEDS_INIT(name) int name(void) { return NOT_READY; }
NEEDS_INIT(cuDeviceGet)
NEEDS_INIT(cuDeviceGetName)
NEEDS_INIT(cuDeviceGetAttribute)
NEEDS_INIT(cuDeviceTotalMem_v2)
NEEDS_INIT(cuDevicePrimaryCtxRetain)
NEEDS_INIT(cuCtxCreate_v2)
NEEDS_INIT(cuCtxGetCurrent)
NEEDS_INIT(cuCtxSetCurrent)
NEEDS_INIT(cuMemAlloc_v2)
NEEDS_INIT(cuMemFree_v2)
NEEDS_INIT(cuMemGetInfo_v2)
NEEDS_INIT(cuModuleLoadData)
NEEDS_INIT(cuModuleUnload)
NEEDS_INIT(cuModuleGetFunction)
NEEDS_INIT(cuLaunchKernel)
