// The engine's CPU kernels as one Python module (workers/kernels/__init__.py builds it).
#include <torch/extension.h>

#include <optional>

torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& kv_cache,
                           const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                           double scale);
torch::Tensor small_linear(const torch::Tensor& x, const torch::Tensor& weight,
                           const std::optional<torch::Tensor>& bias);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "Decode attention over the paged KV cache (CPU)");
  m.def("small_linear", &small_linear, "x w^T (+ bias) for one or two rows of x (CPU)");
}
