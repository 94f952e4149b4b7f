// route_topk: launcher and argument checks.
#include "kernels.hpp"
#include "router.cuh"

MOEX_NAMESPACE_BEGIN
namespace cuda {

Status route_topk(const RouterArgs& a, cudaStream_t stream) noexcept {
  if (!a.logits || !a.idx || !a.weight) return invalid_argument("route_topk: null pointer");
  if (a.experts == 0 || a.experts > 32u * detail::kRouterPerLane)
    return unsupported("route_topk: experts must be 1..256");
  if (a.k == 0 || a.k > kMaxTopK || a.k > a.experts) return invalid_argument("route_topk: bad k");
  if (a.ld < a.experts) return invalid_argument("route_topk: ld < experts");
  if (a.n_group == 0 || a.n_group > 32 || a.experts % a.n_group != 0)
    return invalid_argument("route_topk: n_group must be 1..32 and divide experts");
  if (a.topk_group == 0 || a.topk_group > a.n_group)
    return invalid_argument("route_topk: topk_group must be in 1..n_group");
  if (a.n_group > 1 && a.k > a.topk_group * (a.experts / a.n_group))
    return invalid_argument("route_topk: k exceeds the experts of the kept groups");
  if (a.tokens == 0) return Status::ok();
  detail::RouterParams p{a.logits, a.ld,          a.tokens,  a.experts, a.k,          a.score == RouterScore::kSigmoid,
                         a.bias,   a.renormalize, a.scaling, a.n_group, a.topk_group, a.idx,
                         a.weight};
  const unsigned blocks = (a.tokens + detail::kRouterWarps - 1) / detail::kRouterWarps;
  detail::route_topk_kernel<<<blocks, detail::kRouterWarps * 32, 0, stream>>>(p);
  return cuda_status(cudaGetLastError(), "route_topk launch");
}

}  // namespace cuda
MOEX_NAMESPACE_END
