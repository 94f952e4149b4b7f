/* Must NOT compile: moex/experimental.h without MOEX_EXPERIMENTAL stops with #error. */
#include "moex/experimental.h"
int main(void) { return 0; }
