// Torch-free kernel of the CPU bandwidth ceiling (mixprec::_stream_bench_): plain streaming over byte arrays.
#pragma once
#include <cstdint>

namespace mixprec::cpu {

// One array's part of one block.
struct ByteSpan {
  uint8_t* data;
  int64_t size;
};

// XOR-folds every byte of the read spans into one accumulator, then fills every write span with that
// accumulator (so each write depends on all the reads and neither can be optimized away). Returns the fold.
// A span that appears in both lists is read and then written, as an in-place kernel does; one only in the write
// list is written with non-temporal stores (the AVX2 kernel), as the kernels write their write-only arrays.
uint64_t stream_block(const ByteSpan* reads, int n_reads, const ByteSpan* writes, int n_writes, bool use_avx2);

}  // namespace mixprec::cpu
