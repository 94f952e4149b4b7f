// Instantiations of the dequant_gemv / grouped expert family for int4 weights, groups 32/64/128.
#include "gemv.cuh"

MOEX_INSTANTIATE_GEMV(moex::Precision::kInt4, 32)
MOEX_INSTANTIATE_GEMV(moex::Precision::kInt4, 64)
MOEX_INSTANTIATE_GEMV(moex::Precision::kInt4, 128)
