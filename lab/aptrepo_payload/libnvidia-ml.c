/* Lab stand-in for libnvidia-ml.so.1: NVML cannot start without the kernel module, which is
 * why the real nvidia-smi exits 9 on such a host. */
#ifndef LAB_DRIVER_VERSION
#error "LAB_DRIVER_VERSION must be defined"
#endif
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_DRIVER_NOT_LOADED 9

int nvmlInit_v2(void) { return NVML_ERROR_DRIVER_NOT_LOADED; }
int nvmlInit(void) { return NVML_ERROR_DRIVER_NOT_LOADED; }
int nvmlInitWithFlags(unsigned int flags) { (void)flags; return NVML_ERROR_DRIVER_NOT_LOADED; }
int nvmlShutdown(void) { return NVML_ERROR_UNINITIALIZED; }
int nvmlDeviceGetCount_v2(unsigned int *count) { (void)count; return NVML_ERROR_UNINITIALIZED; }
int nvmlDeviceGetHandleByIndex_v2(void) { return NVML_ERROR_UNINITIALIZED; }
int nvmlSystemGetDriverVersion(char *buf, unsigned int len) { (void)buf; (void)len; return NVML_ERROR_UNINITIALIZED; }

/* Works without nvmlInit, as the real one does; copied by hand to stay free of libc. */
int nvmlSystemGetNVMLVersion(char *buf, unsigned int len)
{
    const char *v = LAB_DRIVER_VERSION;
    unsigned int i;
    for (i = 0; v[i]; i++)
        if (i + 1 >= len)
            return NVML_ERROR_INSUFFICIENT_SIZE;
    for (i = 0; v[i]; i++)
        buf[i] = v[i];
    buf[i] = 0;
    return 0;
}

const char *nvmlErrorString(int e)
{
    switch (e) {
    case 0: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case 18: return "Driver/library version mismatch";
    default: return "Unknown Error";
    }
}
