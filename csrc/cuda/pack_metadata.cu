// Packing metadata on the GPU (plain CUDA, no ATen): one block per packed row.
// Each thread owns a contiguous slice of the row; a first pass counts the slice's EODs and
// finds its last document start, a block-wide exclusive scan (over the threads, in shared
// memory) carries both across slices, and a second pass writes document and position ids.
#include <cuda_runtime.h>

#include "../kernels.h"

namespace {

constexpr int kThreads = 256;

__global__ void pack_metadata_kernel(const int64_t* __restrict__ tokens, int64_t seq, int64_t eod_id,
                                     int64_t* __restrict__ document_ids, int64_t* __restrict__ position_ids,
                                     int64_t* __restrict__ docs_per_row) {
  __shared__ int64_t eods_before[kThreads];   // EODs in the slices of threads < t (exclusive scan)
  __shared__ int64_t start_before[kThreads];  // last document start in slices of threads < t (max scan)
  const int64_t row = blockIdx.x;
  const int64_t* row_tokens = tokens + row * seq;
  const int64_t per_thread = (seq + kThreads - 1) / kThreads;
  const int64_t begin = min(seq, (int64_t)threadIdx.x * per_thread);
  const int64_t end = min(seq, begin + per_thread);

  int64_t eods = 0, last_start = 0;
  for (int64_t i = begin; i < end; ++i) {
    if (i == 0 || row_tokens[i - 1] == eod_id) last_start = i;
    eods += row_tokens[i] == eod_id;
  }
  eods_before[threadIdx.x] = eods;
  start_before[threadIdx.x] = last_start;
  __syncthreads();
  // Hillis-Steele inclusive scans over the threads, then shift to exclusive
  for (int offset = 1; offset < kThreads; offset <<= 1) {
    int64_t add = 0, prev_start = 0;
    if (threadIdx.x >= offset) {
      add = eods_before[threadIdx.x - offset];
      prev_start = start_before[threadIdx.x - offset];
    }
    __syncthreads();
    eods_before[threadIdx.x] += add;
    start_before[threadIdx.x] = max(start_before[threadIdx.x], prev_start);
    __syncthreads();
  }
  int64_t document = threadIdx.x == 0 ? 0 : eods_before[threadIdx.x - 1];
  int64_t start = threadIdx.x == 0 ? 0 : start_before[threadIdx.x - 1];
  for (int64_t i = begin; i < end; ++i) {
    if (i > 0 && row_tokens[i - 1] == eod_id) {
      // an EOD at i - 1 inside this slice was not yet counted in `document`
      if (i - 1 >= begin) ++document;
      start = i;
    }
    document_ids[row * seq + i] = document;
    position_ids[row * seq + i] = i - start;
  }
  if (threadIdx.x == kThreads - 1) {
    // documents = EODs in row[0 : seq - 1] + 1 (an EOD in the last position ends the last document)
    docs_per_row[row] = eods_before[kThreads - 1] - (row_tokens[seq - 1] == eod_id) + 1;
  }
}

__global__ void cu_seqlens_kernel(const int64_t* __restrict__ tokens, const int64_t* __restrict__ document_ids,
                                  const int64_t* __restrict__ row_offsets, int64_t rows, int64_t seq, int64_t eod_id,
                                  int32_t* __restrict__ cu_seqlens) {
  const int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (t >= rows * seq) return;
  const int64_t row = t / seq, i = t % seq;
  if (i == 0 || tokens[t - 1] == eod_id) cu_seqlens[row_offsets[row] + document_ids[t]] = (int32_t)t;
  if (t == 0) cu_seqlens[row_offsets[rows]] = (int32_t)(rows * seq);
}

}  // namespace

extern "C" int mdt_pack_metadata_cuda(const int64_t* tokens, int64_t rows, int64_t seq, int64_t eod_id,
                                      int64_t* document_ids, int64_t* position_ids, int64_t* docs_per_row,
                                      void* stream) {
  if (rows == 0 || seq == 0) return 0;
  pack_metadata_kernel<<<(unsigned)rows, kThreads, 0, (cudaStream_t)stream>>>(tokens, seq, eod_id, document_ids,
                                                                              position_ids, docs_per_row);
  return (int)cudaGetLastError();
}

extern "C" int mdt_pack_cu_seqlens_cuda(const int64_t* tokens, const int64_t* document_ids,
                                        const int64_t* row_offsets, int64_t rows, int64_t seq, int64_t eod_id,
                                        int32_t* cu_seqlens, void* stream) {
  const int64_t total = rows * seq;
  if (total == 0) return 0;
  const unsigned blocks = (unsigned)((total + kThreads - 1) / kThreads);
  cu_seqlens_kernel<<<blocks, kThreads, 0, (cudaStream_t)stream>>>(tokens, document_ids, row_offsets, rows, seq,
                                                                   eod_id, cu_seqlens);
  return (int)cudaGetLastError();
}
