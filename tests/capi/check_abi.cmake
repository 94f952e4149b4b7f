# ctest script: abidiff (Debian's abigail-tools) compares libmoex.so with the committed baseline.
# -DLIB=<libmoex.so> -DBASELINE=<capi/abi/libmoex.abi>
# Passes when the ABI is identical or only functions were added; any other change (a struct
# changed, a function removed or changed) fails: when it is intended (e.g. fields appended to a
# size-versioned struct), regenerate the baseline with the target moex_capi_abi_baseline and commit it.
# (No --headers-dir2 here: with it, abidiff 2.2 filters out changes of the public structs.)
find_program(ABIDIFF abidiff)
if(NOT ABIDIFF)
  message("SKIP: abidiff not found (install Debian's abigail-tools); ABI not checked")
  return()
endif()
# Type information comes from DWARF: a library built without -g (Release) cannot be compared.
find_program(READELF readelf)
if(READELF)
  execute_process(COMMAND ${READELF} -S ${LIB} OUTPUT_VARIABLE sections RESULT_VARIABLE rc)
  if(rc EQUAL 0 AND NOT sections MATCHES "\\.debug_info")
    message("SKIP: ${LIB} has no debug info (build RelWithDebInfo or Debug to check the ABI)")
    return()
  endif()
endif()
execute_process(COMMAND ${ABIDIFF} --exported-interfaces-only ${BASELINE} ${LIB}
                OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
message("${out}${err}")
# abidiff's exit status is a bit field: 1 error, 2 usage error, 4 ABI change, 8 incompatible change.
if(rc EQUAL 0)
  message(STATUS "ABI identical to ${BASELINE}")
elseif(rc EQUAL 4 AND out MATCHES "Functions changes summary: 0 Removed, 0 Changed" AND
       out MATCHES "Variables changes summary: 0 Removed, 0 Changed")
  message(STATUS "functions added only (compatible): regenerate the baseline (target moex_capi_abi_baseline)")
else()
  message(FATAL_ERROR "abidiff: the ABI differs from ${BASELINE} (status ${rc}). If intended, regenerate "
                      "the baseline (cmake --build <build> --target moex_capi_abi_baseline) and commit it.")
endif()
