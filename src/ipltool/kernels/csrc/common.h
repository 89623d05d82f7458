// Shared by the CUDA build (ops.cu) and any host build of the same arithmetic: the
// element-wise cores are plain inline functions, so the exact code the GPU runs can
// also be compiled for the CPU and checked against the native PyTorch ops there.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define IPL_HD __host__ __device__ __forceinline__
#else
#define IPL_HD inline
#endif
