// Instantiations of the dequant_gemv / grouped expert family for bf16 weights.
#include "gemv.cuh"

MOEX_INSTANTIATE_GEMV(moex::Precision::kBF16, 0)
