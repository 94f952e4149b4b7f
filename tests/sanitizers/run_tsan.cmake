# Configures, builds and runs the concurrency tests with ThreadSanitizer in BUILD_DIR.
execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${BUILD_DIR} -DCMAKE_BUILD_TYPE=Debug
                        -DCMAKE_CXX_COMPILER=${CXX} "-DCMAKE_CXX_FLAGS=-fsanitize=thread -O1 -g1"
                        -DMOEX_ENABLE_CUDA=OFF -DMOEX_BUILD_BENCH=OFF -DMOEX_BUILD_EXAMPLES=OFF -DMOEX_TSAN_TEST=OFF
                        -DMOEX_INSTALL=OFF
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "tsan configure failed")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build ${BUILD_DIR} -j 2 --target moex_test_core moex_test_adaptive
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "tsan build failed")
endif()
foreach(t moex_test_core moex_test_adaptive)
  execute_process(COMMAND ${BUILD_DIR}/tests/${t} --test-suite=concurrency
                  RESULT_VARIABLE rc)
  if(rc)
    message(FATAL_ERROR "${t} failed under ThreadSanitizer")
  endif()
endforeach()
