/* moex/experimental.h: opted in with MOEX_EXPERIMENTAL. In builds without the CUDA execution
 * backend every CUDA entry point answers MOEX_ERR_UNSUPPORTED (or INVALID_ARGUMENT for bad input). */
#define MOEX_EXPERIMENTAL 1
#include "moex/experimental.h"

#include "capi_test.h"

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  char dir[4096];
  snprintf(dir, sizeof dir, "%s/demo-model", argv[1]);
  int32_t n = -1;
  CHECK_STATUS(moex_experimental_cuda_device_count(&n), MOEX_OK);
  CHECK(n == 0);
  CHECK_STATUS(moex_experimental_cuda_device_count(NULL), MOEX_ERR_INVALID_ARGUMENT);
  moex_cuda_params cp;
  memset(&cp, 0xAB, sizeof cp);
  moex_experimental_cuda_params_init_size(&cp, sizeof cp);
  CHECK(cp.struct_size == sizeof cp && cp.device == 0 && cp.flags == 0 && cp.stream == NULL);

  CHECK_STATUS(moex_model_write_demo(dir, NULL), MOEX_OK);
  moex_model* model = NULL;
  CHECK_STATUS(moex_model_open(dir, NULL, NULL, NULL, &model), MOEX_OK);
  moex_executor_params ep;
  moex_executor_params_init(&ep);
  ep.backend = MOEX_BACKEND_CUDA;
  moex_executor* ex = (moex_executor*)(void*)&cp;
  CHECK_STATUS(moex_experimental_executor_create_cuda(model, &ep, &cp, &ex), MOEX_ERR_UNSUPPORTED);
  CHECK(ex == NULL);
  CHECK_STATUS(moex_experimental_executor_create_cuda(NULL, &ep, &cp, &ex), MOEX_ERR_INVALID_ARGUMENT);
  cp.flags = 1;
  CHECK_STATUS(moex_experimental_executor_create_cuda(model, &ep, &cp, &ex), MOEX_ERR_UNSUPPORTED);
  cp.flags = 0;
  cp.device = -1;
  CHECK_STATUS(moex_experimental_executor_create_cuda(model, &ep, &cp, &ex), MOEX_ERR_INVALID_ARGUMENT);
  cp.device = 0;
  ep.backend = MOEX_BACKEND_CPU;
  CHECK_STATUS(moex_experimental_executor_create_cuda(model, &ep, &cp, &ex), MOEX_ERR_INVALID_ARGUMENT);
  /* The public path refuses CUDA as before. */
  ep.backend = MOEX_BACKEND_CUDA;
  CHECK_STATUS(moex_executor_create(model, &ep, &ex), MOEX_ERR_UNSUPPORTED);
  moex_executor_params_init(&ep);
  CHECK_STATUS(moex_executor_create(model, &ep, &ex), MOEX_OK);
  CHECK_STATUS(moex_experimental_executor_set_cuda_stream(ex, NULL), MOEX_ERR_INVALID_ARGUMENT); /* a CPU executor */
  CHECK_STATUS(moex_experimental_executor_set_cuda_stream(NULL, NULL), MOEX_ERR_INVALID_ARGUMENT);
  moex_executor_destroy(ex);
  moex_model_destroy(model);
  return test_summary("capi_experimental_test");
}
