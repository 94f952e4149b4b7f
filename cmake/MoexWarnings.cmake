# moex_warnings: an INTERFACE target linked PRIVATE by every moex target (never directory-wide).
add_library(moex_warnings INTERFACE)
set_target_properties(moex_warnings PROPERTIES EXPORT_NAME warnings)
target_compile_options(moex_warnings INTERFACE
  $<$<COMPILE_LANG_AND_ID:CXX,GNU,Clang>:-Wall -Wextra -Wpedantic -Wshadow -Wconversion
    -Wno-sign-conversion -Wno-missing-field-initializers -Wnon-virtual-dtor -Wcast-align -Woverloaded-virtual>
  $<$<COMPILE_LANG_AND_ID:C,GNU,Clang>:-Wall -Wextra -Wpedantic>
  $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall>)
