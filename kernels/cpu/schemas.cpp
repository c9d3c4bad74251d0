// The schemas of every saliency op, defined once. The CPU kernels register in their own files
// (reward.cpp, layer_saliency.cpp); the CUDA kernels (Triton) and the fake implementations used
// by torch.compile register from Python, in saliency_r1/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(saliency, m) {
  // Where the fake (meta) implementations live, so torch can name the module to import.
  m.set_python_module("saliency_r1.ops");
  // Box-overlap reward of upsampled saliency maps (docs/method.md section 4). Returns float32 [B].
  // check: raise on bad argument values; false gives NaN for the bad rollouts instead (no host sync on CUDA).
  m.def(
      "reward(Tensor maps, Tensor map_sizes, Tensor image_sizes, Tensor boxes, Tensor box_counts, "
      "Tensor valid, bool check=True) -> Tensor");
  // One layer's saliency S(a, i) of docs/method.md section 3, summed over heads. Returns [B, A, N]
  // (float64 for float64 inputs, else float32); the caller sums over layers.
  m.def(
      "layer_saliency(Tensor q_think, Tensor lse_think, Tensor q_answer, Tensor lse_answer, "
      "Tensor k_think, Tensor k_image, Tensor v_image, Tensor u_answer, Tensor lengths, "
      "float scale, str path=\"cot\") -> Tensor");
}

// Read (as bytes, without loading the library) by saliency_r1/ops.py, so that a library built for
// another torch is reported with both versions instead of an undefined-symbol error.
extern "C" __attribute__((used, visibility("default"))) const char saliency_r1_build_info[] =
    "saliency_r1 built with torch " SALIENCY_TORCH_VERSION ";";
