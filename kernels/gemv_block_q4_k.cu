// Instantiations of the block-format GEMV family for q4_k weights (kernels/gemv_block.cuh).
#include "gemv_block.cuh"

MOEX_INSTANTIATE_GEMV_BLOCK(moex::Precision::kQ4_K)
