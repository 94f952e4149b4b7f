#include "moex.h"

extern "C" uint32_t moex_version_number(void) { return MOEX_VERSION_NUMBER; }
