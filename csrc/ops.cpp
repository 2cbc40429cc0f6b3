// torch binding of the megatron-domain kernels: checks inputs, allocates outputs and calls the
// CPU (csrc/cpu) or, when built WITH_CUDA, the CUDA (csrc/cuda) entry point of kernels.h.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <atomic>
#include <vector>

#include "cpu/attention_backward.h"
#include "cpu/attention_forward.h"
#include "cpu/cross_entropy_rows.h"
#include "kernels.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#define MDT_CUDA_CHECK(call)                                                       \
  do {                                                                             \
    const int err_ = (call);                                                       \
    TORCH_CHECK(err_ == 0, "megatron_domain CUDA kernel failed: error code ", err_); \
  } while (0)
#endif

namespace {

bool built_with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

// How many threads at::parallel_for runs `tasks` tasks on in this build: torch's intra-op
// threads when the extension was compiled with -fopenmp (INTRA_OP_PARALLEL; torch's CPU builds
// use OpenMP), 1 when not: then every CPU kernel here ran on one core.
int64_t intra_op_threads_used(int64_t tasks) {
  std::vector<std::atomic<int>> seen(at::get_num_threads());
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    if (begin < end) seen[at::get_thread_num() % seen.size()].store(1);  // OpenMP: one chunk per thread
  });
  int64_t used = 0;
  for (const auto& flag : seen) used += flag.load();
  return used;
}

void check_cuda_available(const torch::Tensor& t, const char* op) {
  TORCH_CHECK(!t.is_cuda() || built_with_cuda(), op,
              ": the tensors are on CUDA but the megatron_domain extension was built without CUDA; "
              "rebuild it on a machine with a CUDA torch or choose the 'cpp' backend with CPU tensors");
}

// tokens [B, S] int64 -> (document_ids [B, S], position_ids [B, S], cu_seqlens [docs + 1] int32)
std::vector<torch::Tensor> pack_metadata(torch::Tensor tokens, int64_t eod_id) {
  TORCH_CHECK(tokens.dim() == 2, "pack_metadata: tokens must be [batch, seq], got ", tokens.dim(), " dims");
  TORCH_CHECK(tokens.scalar_type() == torch::kInt64, "pack_metadata: tokens must be int64");
  check_cuda_available(tokens, "pack_metadata");
  tokens = tokens.contiguous();
  const int64_t rows = tokens.size(0), seq = tokens.size(1);
  auto document_ids = torch::empty_like(tokens);
  auto position_ids = torch::empty_like(tokens);
  auto docs_per_row = torch::empty({rows}, tokens.options());
  if (!tokens.is_cuda()) {
    mdt_pack_metadata_cpu(tokens.data_ptr<int64_t>(), rows, seq, eod_id, document_ids.data_ptr<int64_t>(),
                          position_ids.data_ptr<int64_t>(), docs_per_row.data_ptr<int64_t>());
  } else {
#ifdef WITH_CUDA
    MDT_CUDA_CHECK(mdt_pack_metadata_cuda(tokens.data_ptr<int64_t>(), rows, seq, eod_id,
                                          document_ids.data_ptr<int64_t>(), position_ids.data_ptr<int64_t>(),
                                          docs_per_row.data_ptr<int64_t>(),
                                          c10::cuda::getCurrentCUDAStream().stream()));
#endif
  }
  // row offsets into cu_seqlens: exclusive cumsum of documents per row (one small host sync for the size)
  auto row_offsets = torch::zeros({rows + 1}, tokens.options());
  row_offsets.narrow(0, 1, rows).copy_(docs_per_row.cumsum(0));
  const int64_t documents = row_offsets[rows].item<int64_t>();
  auto cu_seqlens = torch::empty({documents + 1}, tokens.options().dtype(torch::kInt32));
  if (!tokens.is_cuda()) {
    mdt_pack_cu_seqlens_cpu(tokens.data_ptr<int64_t>(), document_ids.data_ptr<int64_t>(),
                            row_offsets.data_ptr<int64_t>(), rows, seq, eod_id, cu_seqlens.data_ptr<int32_t>());
  } else {
#ifdef WITH_CUDA
    MDT_CUDA_CHECK(mdt_pack_cu_seqlens_cuda(tokens.data_ptr<int64_t>(), document_ids.data_ptr<int64_t>(),
                                            row_offsets.data_ptr<int64_t>(), rows, seq, eod_id,
                                            cu_seqlens.data_ptr<int32_t>(),
                                            c10::cuda::getCurrentCUDAStream().stream()));
#endif
  }
  return {document_ids, position_ids, cu_seqlens};
}

void check_segments(const torch::Tensor& segment_ids, int64_t tokens, int64_t pairs) {
  TORCH_CHECK(segment_ids.dim() == 1 && segment_ids.size(0) == tokens,
              "dpo_loss: segment_ids must be [tokens] like the log-probs, got ", segment_ids.sizes());
  TORCH_CHECK(segment_ids.scalar_type() == torch::kInt64, "dpo_loss: segment_ids must be int64");
  if (tokens > 0) {
    TORCH_CHECK(segment_ids.max().item<int64_t>() < 2 * pairs, "dpo_loss: a segment id is >= 2 * num_pairs (",
                2 * pairs, "); ids are 2p (chosen) and 2p + 1 (rejected) of pair p, or -1");
  }
}

// policy, reference [T] (any float, summed in fp32), segment_ids [T] ->
// (policy_sums [2P], reference_sums [2P], losses [P], dloss_dh [P])
std::vector<torch::Tensor> dpo_forward(torch::Tensor policy, torch::Tensor reference, torch::Tensor segment_ids,
                                       int64_t pairs, double beta, double label_smoothing, int64_t loss_type) {
  TORCH_CHECK(policy.dim() == 1 && reference.sizes() == policy.sizes(),
              "dpo_loss: policy and reference log-probs must both be [tokens]");
  TORCH_CHECK(loss_type >= 0 && loss_type <= 3,
              "dpo_loss: loss_type must be 0 (sigmoid), 1 (ipo), 2 (hinge) or 3 (robust)");
  check_cuda_available(policy, "dpo_loss");
  const int64_t tokens = policy.size(0);
  check_segments(segment_ids, tokens, pairs);
  auto p = policy.to(torch::kFloat32).contiguous();
  auto r = reference.to(torch::kFloat32).contiguous();
  auto s = segment_ids.contiguous();
  auto opts = p.options();
  auto policy_sums = torch::empty({2 * pairs}, opts), reference_sums = torch::empty({2 * pairs}, opts);
  auto losses = torch::empty({pairs}, opts), dloss_dh = torch::empty({pairs}, opts);
  if (!p.is_cuda()) {
    mdt_dpo_forward_cpu(p.data_ptr<float>(), r.data_ptr<float>(), s.data_ptr<int64_t>(), tokens, pairs, (float)beta,
                        (float)label_smoothing, (int)loss_type, policy_sums.data_ptr<float>(),
                        reference_sums.data_ptr<float>(), losses.data_ptr<float>(), dloss_dh.data_ptr<float>());
  } else {
#ifdef WITH_CUDA
    MDT_CUDA_CHECK(mdt_dpo_forward_cuda(p.data_ptr<float>(), r.data_ptr<float>(), s.data_ptr<int64_t>(), tokens,
                                        pairs, (float)beta, (float)label_smoothing, (int)loss_type,
                                        policy_sums.data_ptr<float>(), reference_sums.data_ptr<float>(),
                                        losses.data_ptr<float>(), dloss_dh.data_ptr<float>(),
                                        c10::cuda::getCurrentCUDAStream().stream()));
#endif
  }
  return {policy_sums, reference_sums, losses, dloss_dh};
}

// grad_losses [P], dloss_dh [P], segment_ids [T] -> grad of the policy token log-probs [T] fp32
torch::Tensor dpo_backward(torch::Tensor grad_losses, torch::Tensor dloss_dh, torch::Tensor segment_ids) {
  check_cuda_available(segment_ids, "dpo_loss");
  auto g = grad_losses.to(torch::kFloat32).contiguous();
  auto d = dloss_dh.contiguous();
  auto s = segment_ids.contiguous();
  const int64_t tokens = s.size(0);
  auto grad_policy = torch::empty({tokens}, d.options());
  if (!s.is_cuda()) {
    mdt_dpo_backward_cpu(g.data_ptr<float>(), d.data_ptr<float>(), s.data_ptr<int64_t>(), tokens,
                         grad_policy.data_ptr<float>());
  } else {
#ifdef WITH_CUDA
    MDT_CUDA_CHECK(mdt_dpo_backward_cuda(g.data_ptr<float>(), d.data_ptr<float>(), s.data_ptr<int64_t>(), tokens,
                                         grad_policy.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()));
#endif
  }
  return grad_policy;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron-domain packing, fused DPO-loss, CPU attention forward / backward and cross-entropy-row kernels (C++ CPU; CUDA when built WITH_CUDA)";
  m.def("has_cuda", &built_with_cuda, "whether this build includes the CUDA kernels");
  m.def("intra_op_threads_used", &intra_op_threads_used,
        "threads at::parallel_for spreads `tasks` tasks over (1 when built without OpenMP)");
  m.def("pack_metadata", &pack_metadata, "tokens [B, S], eod_id -> document_ids, position_ids, cu_seqlens");
  m.def("dpo_forward", &dpo_forward, "policy, reference, segment_ids, pairs, beta, label_smoothing, loss_type");
  m.def("dpo_backward", &dpo_backward, "grad_losses, dloss_dh, segment_ids -> grad_policy");
  m.def("attention_backward_supported", &mdt::attention_backward_supported,
        "whether attention_backward runs q's dtype / head dim on this CPU");
  m.def("attention_forward", &mdt::attention_forward,
        "q, k, v, mask (bool or None), is_causal, scale, matmuls ('auto' | 'brgemm' | 'avx512_bf16') -> out, lse "
        "(CPU, bf16; sequence-major memory)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("mask"), pybind11::arg("is_causal"),
        pybind11::arg("scale"), pybind11::arg("matmuls") = "auto");
  m.def("attention_backward_matmuls", &mdt::attention_backward_matmuls,
        "the matmuls attention_backward runs here by default: 'brgemm' (AMX), 'avx512_bf16', or 'none'");
  m.def("attention_backward", &mdt::attention_backward,
        "grad_out, q, k, v, out, lse, mask (bool or None), is_causal, scale, matmuls ('auto' | 'brgemm' | "
        "'avx512_bf16') -> grad_q, grad_k, grad_v (CPU, bf16)",
        pybind11::arg("grad_out"), pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("out"),
        pybind11::arg("lse"), pybind11::arg("mask"), pybind11::arg("is_causal"), pybind11::arg("scale"),
        pybind11::arg("matmuls") = "auto");
  m.def("cross_entropy_rows_supported", &mdt::cross_entropy_rows_supported,
        "whether the cross-entropy row kernels run on this CPU");
  m.def("cross_entropy_rows", &mdt::cross_entropy_rows,
        "logits [n, V] (fp32|bf16), targets [n], grad_weights ([n] or None) -> stats [4, n]; with grad_weights the "
        "logits become the gradient");
  m.def("cross_entropy_rows_gradient_", &mdt::cross_entropy_rows_gradient_,
        "logits [n, V] (in place), lse [n], targets [n], grad_logp [n] -> the cross-entropy gradient");
  m.def("accumulate_bf16_", &mdt::accumulate_bf16_, "dst (fp32) += src (bf16, same shape)");
}
