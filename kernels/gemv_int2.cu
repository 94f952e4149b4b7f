// Instantiations of the dequant_gemv / grouped expert family for int2 weights, groups 32/64/128.
#include "gemv.cuh"

MOEX_INSTANTIATE_GEMV(moex::Precision::kInt2, 32)
MOEX_INSTANTIATE_GEMV(moex::Precision::kInt2, 64)
MOEX_INSTANTIATE_GEMV(moex::Precision::kInt2, 128)
