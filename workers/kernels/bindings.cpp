// The engine's CPU kernels as one Python module (workers/kernels/__init__.py builds it).
#include <torch/extension.h>

#include <optional>
#include <tuple>

torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& kv_cache,
                           const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                           double scale, bool bf16_dot);
bool paged_decode_has_bf16_dot();
torch::Tensor small_linear(const torch::Tensor& x, const torch::Tensor& weight,
                           const std::optional<torch::Tensor>& bias);
torch::Tensor silu_mul(const torch::Tensor& gate, const torch::Tensor& up);
bool pairs_linear_available();
bool prefill_attention_available();
torch::Tensor prefill_attention(const torch::Tensor& q, const torch::Tensor& kv_cache,
                                const torch::Tensor& block_table, int64_t context_len,
                                double scale, bool amx);
torch::Tensor pairs_pack(const torch::Tensor& weight);
torch::Tensor pairs_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t N,
                           const std::optional<torch::Tensor>& bias, bool amx);
bool pairs_linear_amx_available();
int64_t panels_width();
torch::Tensor panels_pack(const torch::Tensor& weight);
torch::Tensor panels_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t N,
                            const std::optional<torch::Tensor>& bias);
void rope_write_kv(torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& signed_sin,
                   const torch::Tensor& positions, torch::Tensor& kv_cache,
                   const torch::Tensor& slots, int64_t heads, int64_t kv_heads);
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(const torch::Tensor& x,
                                                      const std::optional<torch::Tensor>& residual,
                                                      const torch::Tensor& weight, double eps);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "Decode attention over the paged KV cache (CPU)",
        py::arg("q"), py::arg("kv_cache"), py::arg("block_tables"), py::arg("context_lens"),
        py::arg("scale"), py::arg("bf16_dot") = true);
  m.def("paged_decode_has_bf16_dot", &paged_decode_has_bf16_dot,
        "Whether bfloat16 heads of 64 or 128 can run on AVX512-BF16 dot products here");
  m.def("small_linear", &small_linear, "x w^T (+ bias) for one or two rows of x (CPU)");
  m.def("pairs_linear_available", &pairs_linear_available,
        "Whether pairs_linear is compiled in (AVX512-BF16)");
  m.def("pairs_pack", &pairs_pack, "A bfloat16 weight [N, K] in pairs_linear's layout");
  m.def("pairs_linear", &pairs_linear,
        "x w^T (+ bias) for bfloat16 rows of x, from pairs_pack(w) (CPU, AVX512-BF16; steps of "
        "a few rows or more on AMX where the CPU has it, unless amx is False)",
        py::arg("x"), py::arg("packed"), py::arg("out_features"), py::arg("bias"),
        py::arg("amx") = true);
  m.def("pairs_linear_amx_available", &pairs_linear_amx_available,
        "Whether pairs_linear runs steps of a few rows or more on AMX here");
  m.def("panels_width", &panels_width, "Output columns of a panel in panels_pack's layout");
  m.def("panels_pack", &panels_pack, "A float32 weight [N, K] in panels_linear's layout");
  m.def("panels_linear", &panels_linear,
        "x w^T (+ bias) for float32 rows of x, from panels_pack(w) (CPU)", py::arg("x"),
        py::arg("packed"), py::arg("out_features"), py::arg("bias"));
  m.def("prefill_attention_available", &prefill_attention_available,
        "Whether prefill_attention is compiled in (AVX512-BF16)");
  m.def("prefill_attention", &prefill_attention,
        "Causal attention of a prefill chunk over the paged KV cache (CPU, bfloat16; products on "
        "AMX where the CPU has it, unless amx is False)",
        py::arg("q"), py::arg("kv_cache"), py::arg("block_table"), py::arg("context_len"),
        py::arg("scale"), py::arg("amx") = true);
  m.def("silu_mul", &silu_mul, "silu(gate) * up, rows read in place (CPU)");
  m.def("rope_write_kv", &rope_write_kv,
        "RoPE of queries and keys in place in the q/k/v rows, keys and values into the cache "
        "(CPU)",
        py::arg("qkv"), py::arg("cos"), py::arg("signed_sin"), py::arg("positions"),
        py::arg("kv_cache"), py::arg("slots"), py::arg("heads"), py::arg("kv_heads"));
  m.def("add_rms_norm", &add_rms_norm, "(rms_norm(x + residual) * weight, x + residual) (CPU)");
}
