/* Lab stand-in for libcudart: every call that needs the driver fails with
 * cudaErrorInsufficientDriver (35), so `import cpm_kernels` raises exactly as on a host with a
 * toolkit and no working driver (UPSTREAM §4). The real runtime says cudaErrorNoDevice (100)
 * when the driver's userspace is present; the stand-in does not look for it. */
#ifndef LAB_CUDART_VERSION
#error "LAB_CUDART_VERSION must be defined"
#endif
#define NO_DRIVER 35

static int last_error;

int cudaRuntimeGetVersion(int *v)
{
    if (!v)
        return 1;
    *v = LAB_CUDART_VERSION;
    return 0;
}

/* 0 is what the real runtime reports when no driver can be found. */
int cudaDriverGetVersion(int *v)
{
    if (!v)
        return 1;
    *v = 0;
    return 0;
}

int cudaGetDeviceCount(int *count)
{
    if (count)
        *count = 0;
    return last_error = NO_DRIVER;
}

int cudaGetLastError(void) { int e = last_error; last_error = 0; return e; }
int cudaPeekAtLastError(void) { return last_error; }

const char *cudaGetErrorString(int e)
{
    switch (e) {
    case 0: return "no error";
    case 1: return "invalid argument";
    case 35: return "CUDA driver version is insufficient for CUDA runtime version";
    case 100: return "no CUDA-capable device is detected";
    default: return "unrecognized error code";
    }
}

const char *cudaGetErrorName(int e)
{
    switch (e) {
    case 0: return "cudaSuccess";
    case 1: return "cudaErrorInvalidValue";
    case 35: return "cudaErrorInsufficientDriver";
    case 100: return "cudaErrorNoDevice";
    default: return "cudaErrorUnknown";
    }
}

/* Extra arguments from callers are harmless: the x86-64 ABI leaves them to the caller. */
#define NEEDS_DRIVER(name) int name(void) { return last_error = NO_DRIVER; }
NEEDS_DRIVER(cudaGetDevice)
NEEDS_DRIVER(cudaSetDevice)
NEEDS_DRIVER(cudaGetDeviceProperties)
NEEDS_DRIVER(cudaDeviceGetAttribute)
NEEDS_DRIVER(cudaDeviceSynchronize)
NEEDS_DRIVER(cudaMalloc)
NEEDS_DRIVER(cudaFree)
NEEDS_DRIVER(cudaMallocHost)
NEEDS_DRIVER(cudaFreeHost)
NEEDS_DRIVER(cudaMemGetInfo)
NEEDS_DRIVER(cudaMemcpy)
NEEDS_DRIVER(cudaMemcpyAsync)
NEEDS_DRIVER(cudaMemsetAsync)
NEEDS_DRIVER(cudaStreamCreate)
NEEDS_DRIVER(cudaStreamCreateWithFlags)
NEEDS_DRIVER(cudaStreamCreateWithPriority)
NEEDS_DRIVER(cudaStreamDestroy)
NEEDS_DRIVER(cudaStreamSynchronize)
NEEDS_DRIVER(cudaStreamWaitEvent)
NEEDS_DRIVER(cudaEventCreate)
NEEDS_DRIVER(cudaEventDestroy)
NEEDS_DRIVER(cudaEventRecord)
NEEDS_DRIVER(cudaLaunchKernel)
NEEDS_DRIVER(cudaGetFuncBySymbol)
