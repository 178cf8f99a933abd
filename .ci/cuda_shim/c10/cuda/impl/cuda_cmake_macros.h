#pragma once
// Stand-in for the header that a CUDA build of torch generates; the CPU wheel lacks it.
// Used only by .ci/check_cuda_compile.sh to compile-check the .cu files against CPU torch headers.
#define C10_CUDA_BUILD_SHARED_LIBS
