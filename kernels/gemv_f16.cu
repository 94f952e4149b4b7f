// Instantiations of the dequant_gemv / grouped expert family for f16 weights.
#include "gemv.cuh"

MOEX_INSTANTIATE_GEMV(moex::Precision::kF16, 0)
