// Packing metadata on the CPU: one sequential pass per row (see kernels.h for the conventions).
#include "../kernels.h"

extern "C" void mdt_pack_metadata_cpu(const int64_t* tokens, int64_t rows, int64_t seq, int64_t eod_id,
                                      int64_t* document_ids, int64_t* position_ids, int64_t* docs_per_row) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t* row = tokens + r * seq;
    int64_t document = 0, start = 0;
    for (int64_t i = 0; i < seq; ++i) {
      if (i > 0 && row[i - 1] == eod_id) {  // the token after an EOD starts a document
        ++document;
        start = i;
      }
      document_ids[r * seq + i] = document;
      position_ids[r * seq + i] = i - start;
    }
    docs_per_row[r] = document + 1;
  }
}

extern "C" void mdt_pack_cu_seqlens_cpu(const int64_t* tokens, const int64_t* document_ids,
                                        const int64_t* row_offsets, int64_t rows, int64_t seq, int64_t eod_id,
                                        int32_t* cu_seqlens) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < seq; ++i) {
      const int64_t t = r * seq + i;
      if (i == 0 || tokens[t - 1] == eod_id) cu_seqlens[row_offsets[r] + document_ids[t]] = (int32_t)t;
    }
  }
  cu_seqlens[row_offsets[rows]] = (int32_t)(rows * seq);
}
