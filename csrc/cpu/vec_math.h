// Batch math of the CPU kernels shared across translation units (defined in csrc/cpu/mask_kernels.cpp, where the
// branch-free polynomials and the instruction-set dispatch live).
#pragma once

#include <cstdint>

namespace fastmask {
namespace cpu {

// y[i] = exp(x[i]) for i < n: the Cephes polynomial of the gate kernels (about 1 ulp; x clamped to [-87, 88]),
// vectorised in the instruction set the CPU kernels run (FASTMASK_CPU_ISA caps it). x and y may alias.
using ExpF32Fn = void (*)(const float* x, float* y, int64_t n);
ExpF32Fn exp_f32_kernel();

}  // namespace cpu
}  // namespace fastmask
