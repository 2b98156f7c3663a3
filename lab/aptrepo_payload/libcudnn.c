/* Lab stand-in for libcudnn (8 or 9): version queries work, a handle needs a GPU. */
#if !defined(LAB_CUDNN_VERSION) || !defined(LAB_CUDART_VERSION) || !defined(LAB_NOT_INITIALIZED)
#error "LAB_CUDNN_VERSION, LAB_CUDART_VERSION and LAB_NOT_INITIALIZED must be defined"
#endif

unsigned long cudnnGetVersion(void) { return LAB_CUDNN_VERSION; }
unsigned long cudnnGetCudartVersion(void) { return LAB_CUDART_VERSION; }
int cudnnCreate(void **handle) { (void)handle; return LAB_NOT_INITIALIZED; }
int cudnnDestroy(void *handle) { (void)handle; return LAB_NOT_INITIALIZED; }

const char *cudnnGetErrorString(int s)
{
    if (s == 0)
        return "CUDNN_STATUS_SUCCESS";
    if (s == LAB_NOT_INITIALIZED)
        return "CUDNN_STATUS_NOT_INITIALIZED";
    return "CUDNN_UNKNOWN_STATUS_FOUND";
}
