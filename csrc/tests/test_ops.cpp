// The library as a libtorch user links it: the ops are reachable through the dispatcher by name.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <optional>

int main() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("mixprec::unscale_and_check_", "")
                .typed<void(at::TensorList, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, bool)>();
  at::Tensor g = at::arange(1, 101, at::kFloat).to(at::kHalf);
  g[7] = INFINITY;
  at::Tensor inv = at::full({1}, 0.25f), found = at::zeros({1}), norm = at::zeros({1});
  std::vector<at::Tensor> grads{g};
  op.call(grads, inv, found, norm, std::nullopt, false);
  const bool ok = found.item<float>() == 1.f && g[0].item<float>() == 0.25f && g[99].item<float>() == 25.f &&
                  std::isinf(norm.item<float>());
  std::printf("%s: unscale_and_check_ through the dispatcher\n", ok ? "ok" : "FAIL");
  return ok ? 0 : 1;
}
