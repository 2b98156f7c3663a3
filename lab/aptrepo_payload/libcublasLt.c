/* Lab stand-in for libcublasLt: version queries work, a handle cannot be made without a
 * driver (CUBLAS_STATUS_NOT_INITIALIZED). */
#ifndef LAB_CUBLAS_VERSION
#error "LAB_CUBLAS_VERSION must be defined"
#endif
#define NOT_INITIALIZED 1

unsigned long cublasLtGetVersion(void) { return LAB_CUBLAS_VERSION; }
unsigned long cublasLtGetCudartVersion(void) { return LAB_CUDART_VERSION; }

const char *cublasLtGetStatusString(int s)
{
    switch (s) {
    case 0: return "CUBLAS_STATUS_SUCCESS";
    case NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    default: return "CUBLAS_STATUS_UNKNOWN";
    }
}

/* Extra arguments from callers are harmless: the x86-64 ABI leaves them to the caller. */
#define NEEDS_DRIVER(name) int name(void) { return NOT_INITIALIZED; }
NEEDS_DRIVER(cublasLtCreate)
NEEDS_DRIVER(cublasLtDestroy)
NEEDS_DRIVER(cublasLtMatmul)
NEEDS_DRIVER(cublasLtMatmulDescCreate)
NEEDS_DRIVER(cublasLtMatmulDescSetAttribute)
NEEDS_DRIVER(cublasLtMatmulDescDestroy)
NEEDS_DRIVER(cublasLtMatrixLayoutCreate)
NEEDS_DRIVER(cublasLtMatrixLayoutDestroy)
NEEDS_DRIVER(cublasLtMatrixLayoutSetAttribute)
NEEDS_DRIVER(cublasLtMatrixTransform)
NEEDS_DRIVER(cublasLtMatrixTransformDescCreate)
NEEDS_DRIVER(cublasLtMatrixTransformDescDestroy)
NEEDS_DRIVER(cublasLtMatrixTransformDescSetAttribute)
