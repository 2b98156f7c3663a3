/* Lab stand-in for libnvrtc: reports its version; it has no compiler behind it, so building a
 * program fails with NVRTC_ERROR_INTERNAL_ERROR (the real one would compile without a GPU). */
#ifndef LAB_NVRTC_MAJOR
#error "LAB_NVRTC_MAJOR and LAB_NVRTC_MINOR must be defined"
#endif
#define INVALID_INPUT 3
#define INTERNAL_ERROR 11

int nvrtcVersion(int *major, int *minor)
{
    if (!major || !minor)
        return INVALID_INPUT;
    *major = LAB_NVRTC_MAJOR;
    *minor = LAB_NVRTC_MINOR;
    return 0;
}

const char *nvrtcGetErrorString(int r)
{
    switch (r) {
    case 0: return "NVRTC_SUCCESS";
    case INVALID_INPUT: return "NVRTC_ERROR_INVALID_INPUT";
    case INTERNAL_ERROR: return "NVRTC_ERROR_INTERNAL_ERROR";
    default: return "NVRTC_ERROR unknown";
    }
}

/* Extra arguments from callers are harmless: the x86-64 ABI leaves them to the caller. */
#define NO_COMPILER(name) int name(void) { return INTERNAL_ERROR; }
NO_COMPILER(nvrtcCreateProgram)
NO_COMPILER(nvrtcCompileProgram)
NO_COMPILER(nvrtcDestroyProgram)
NO_COMPILER(nvrtcGetCUBIN)
NO_COMPILER(nvrtcGetCUBINSize)
NO_COMPILER(nvrtcGetPTX)
NO_COMPILER(nvrtcGetPTXSize)
NO_COMPILER(nvrtcGetProgramLog)
NO_COMPILER(nvrtcGetProgramLogSize)
