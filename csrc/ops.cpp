// Schemas of the kernel-level ops of the extension fastmask._C. The public ops (fastmask::masked_linear, ...)
// are defined in Python (fastmask/ops) and route to these when the "cpu" or "cuda" backend is chosen.
// CPU impls live in csrc/cpu, CUDA impls in csrc/cuda; both register with TORCH_LIBRARY_IMPL(fastmask, ...).
//
// Common arguments: logits is a float32 2-D grid over the weight (weight element (r, c) is gated by logit
// (r / bh, c / bw)); estimator is an index into fastmask.ref.ESTIMATORS; the noise of logit j is
// philox_uniform(seed, offset + j) (csrc/philox.h).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmask, m) {
  // Fills out (float32, contiguous) with philox_uniform(seed, offset + i).
  m.def("_uniform_fill(Tensor(a!) out, int seed, int offset) -> ()");
  // Fills out (float32, contiguous) with the Gumbel noise -log(-log u) of u = philox_uniform(seed, offset + i)
  // clamped to [1e-6, 1 - 1e-6] (about 1 ulp from torch's logs; the learned N:M masks' noise). CPU only.
  m.def("_gumbel_fill(Tensor(a!) out, int seed, int offset) -> ()");
  // Gates z (float32, shaped like logits).
  m.def(
      "_gate_fwd(Tensor logits, int estimator, int seed, int offset, float beta, float gamma, float zeta, "
      "float tau, bool training, bool inverse) -> Tensor");
  // d(loss)/d(logits) (float32) from d(loss)/d(gates); regenerates the noise.
  m.def(
      "_gate_bwd(Tensor grad_gates, Tensor logits, int estimator, int seed, int offset, float beta, float gamma, "
      "float zeta, float tau, bool training, bool inverse) -> Tensor");
  // W * m in the weight's dtype and layout (contiguous), the product taken in float32 and rounded once.
  m.def(
      "_masked_weight(Tensor weight, Tensor logits, int bh, int bw, int estimator, int seed, int offset, "
      "float beta, float gamma, float zeta, float tau, bool training, bool inverse) -> Tensor");
  // _masked_weight and the gates' slopes dz/dl (compute dtype, shaped like logits) from the same pass: what the
  // "keep" memory policy's forward keeps, so that its backward evaluates no gate. CPU only (CUDA: composed).
  m.def(
      "_masked_weight_slope(Tensor weight, Tensor logits, int bh, int bw, int estimator, int seed, int offset, "
      "float beta, float gamma, float zeta, float tau, bool training, bool inverse) -> (Tensor, Tensor)");
  // From grad_wm = d(loss)/d(W * m) (float32, weight layout): grad_logits (float32, the block sums of
  // grad_wm * W times dz/dl) and, if needs_weight_grad, grad_weight = grad_wm * m in the weight dtype
  // (else an empty tensor).
  m.def(
      "_mask_grad(Tensor grad_wm, Tensor weight, Tensor logits, int bh, int bw, int estimator, int seed, "
      "int offset, float beta, float gamma, float zeta, float tau, bool training, bool inverse, "
      "bool needs_weight_grad) -> (Tensor, Tensor)");
  // _mask_grad and _masked_weight in ONE pass over the weight (each gate regenerated once): (grad_logits,
  // grad_weight or empty, W * m). The backward runs the dWm GEMM first, then this, then dx = dy (W * m), so a
  // per-weight step evaluates its gates twice (forward, backward) instead of three times. CPU only for now.
  m.def(
      "_mask_grad_masked_weight(Tensor grad_wm, Tensor weight, Tensor logits, int bh, int bw, int estimator, "
      "int seed, int offset, float beta, float gamma, float zeta, float tau, bool training, bool inverse, "
      "bool needs_weight_grad) -> (Tensor, Tensor, Tensor)");
}

// A Python module named fastmask._C so that `import fastmask._C` loads the library and runs the
// registrations above (the extension-cpp pattern; no pybind11 bindings are needed).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
