// Package consumer (C++): the installed C++ headers and moex::moex work, and agree with the C ABI:
// one MoE layer through moex::MoeLayerExecutor and through moex_executor_forward_f32 give the same
// output on the same model. usage: consumer_cxx <model dir>
#include <cmath>
#include <cstdio>
#include <moex.h>
#include <moex/moex.hpp>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  if (moex_model_write_demo(argv[1], nullptr) != MOEX_OK) return 1;
  auto opened = moex::open_expert_store(argv[1]);
  if (!opened) {
    std::fprintf(stderr, "consumer_cxx: %s\n", opened.status().to_string().c_str());
    return 1;
  }
  auto ex = moex::MoeLayerExecutor<>::create(opened->store, {});
  if (!ex) return 1;
  const std::size_t n = 3, h = opened->store.spec().shape.hidden;
  std::vector<float> x(n * h), y_cxx(n * h), y_c(n * h);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 11) / 11.f - 0.5f;
  if (!ex->forward(0, x.data(), n, y_cxx.data()).is_ok()) return 1;

  moex_model* model = nullptr;
  moex_executor* cex = nullptr;
  if (moex_model_open(argv[1], nullptr, nullptr, nullptr, &model) != MOEX_OK ||
      moex_executor_create(model, nullptr, &cex) != MOEX_OK ||
      moex_executor_forward_f32(cex, 0, x.data(), n, y_c.data()) != MOEX_OK) {
    std::fprintf(stderr, "consumer_cxx: %s\n", moex_last_error_message());
    return 1;
  }
  double worst = 0, scale = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    worst = std::fmax(worst, std::fabs(double(y_cxx[i]) - y_c[i]));
    scale = std::fmax(scale, std::fabs(double(y_c[i])));
  }
  moex_executor_destroy(cex);
  moex_model_destroy(model);
  // Same code, same data: equal up to the thread split of the expert compute.
  constexpr double kRelTol = 1e-5;
  std::printf("consumer_cxx: C++ and C API outputs differ by %.3g (relative)\n", worst / scale);
  return scale > 0 && worst / scale <= kRelTol ? 0 : 1;
}
