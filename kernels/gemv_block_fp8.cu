// Instantiations of the block-format GEMV family for fp8 weights (kernels/gemv_block.cuh).
#include "gemv_block.cuh"

MOEX_INSTANTIATE_GEMV_BLOCK(moex::Precision::kFp8E4M3)
