// Instantiations of the int8-activation (dp4a) GEMV for int8 weights, groups 32/64/128.
#include "gemv_q8.cuh"

MOEX_INSTANTIATE_GEMV_Q8(moex::Precision::kInt8, 32)
MOEX_INSTANTIATE_GEMV_Q8(moex::Precision::kInt8, 64)
MOEX_INSTANTIATE_GEMV_Q8(moex::Precision::kInt8, 128)
