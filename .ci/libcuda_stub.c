/* A no-device stand-in for libcuda.so.1, for running Legate / cuPyNumeric in CPU-only mode on
 * machines without an NVIDIA driver (CI). Every driver call reports CUDA_ERROR_NO_DEVICE (100);
 * the error-name/string and version queries answer properly, and cuGetProcAddress hands out a
 * valid function for every symbol so that no caller dereferences NULL. Never put this library
 * on LD_LIBRARY_PATH where a real driver is installed. */
#include <stddef.h>
#include <string.h>

typedef int CUresult;
enum { CUDA_SUCCESS = 0, CUDA_ERROR_NO_DEVICE = 100 };

CUresult cuInit(unsigned int flags) { (void)flags; return CUDA_ERROR_NO_DEVICE; }
CUresult cuDeviceGetCount(int *count) { if (count) *count = 0; return CUDA_ERROR_NO_DEVICE; }
CUresult cuDriverGetVersion(int *version) { if (version) *version = 13000; return CUDA_SUCCESS; }
CUresult cuMemFreeHost(void *p) { (void)p; return CUDA_ERROR_NO_DEVICE; }
CUresult cuMemFree_v2(unsigned long long p) { (void)p; return CUDA_ERROR_NO_DEVICE; }

CUresult cuGetErrorName(CUresult error, const char **name) {
  if (name) *name = error == CUDA_SUCCESS ? "CUDA_SUCCESS" : "CUDA_ERROR_NO_DEVICE";
  return CUDA_SUCCESS;
}

CUresult cuGetErrorString(CUresult error, const char **text) {
  if (text) *text = error == CUDA_SUCCESS ? "no error" : "no CUDA-capable device is detected";
  return CUDA_SUCCESS;
}

static CUresult no_device(void) { return CUDA_ERROR_NO_DEVICE; }

static void *lookup(const char *symbol) {
  if (symbol && strcmp(symbol, "cuGetErrorName") == 0) return (void *)cuGetErrorName;
  if (symbol && strcmp(symbol, "cuGetErrorString") == 0) return (void *)cuGetErrorString;
  if (symbol && strcmp(symbol, "cuDriverGetVersion") == 0) return (void *)cuDriverGetVersion;
  return (void *)no_device;
}

CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, unsigned long long flags) {
  (void)version; (void)flags;
  if (pfn) *pfn = lookup(symbol);
  return CUDA_SUCCESS;
}

CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, unsigned long long flags,
                             int *status) {
  (void)version; (void)flags;
  if (pfn) *pfn = lookup(symbol);
  if (status) *status = 0; /* CU_GET_PROC_ADDRESS_SUCCESS */
  return CUDA_SUCCESS;
}
