// The routed experts' gated FFN for CPU training, forward and backward: the `cpp` expert backend, built on first use
// by smoe/kernels/cpp_experts.py and registered as torch.ops.smoe_experts.*. The spec is smoe/kernels/reference.py
// with the layer's gather and combine (smoe/moe/dispatch.py); tests/test_backends.py checks the parity, forward and
// backward.
//
// Why it exists: a fine-grained MoE runs a few dozen to a few hundred experts of 16-512 rows each. Splitting each
// small GEMM over the threads (what torch.mm does) pays a barrier per GEMM that costs as much as the GEMM on 2
// cores, and each of the dozen ops an expert needs costs a Python call. Here every expert is one task: its GEMMs
// and its gated activation run back to back on one thread while its rows are hot in cache, and the threads take
// experts, largest first, from a shared counter. An expert too large to share out that way (more rows than a
// thread's share of the call) runs first, on its own, with every thread inside its GEMMs. The maths are ATen's own
// ops (mm, silu / gelu and their backward, mul), so each expert computes what the reference computes.
//
// Two entry points: rows already sorted by expert (forward / backward: the backend seam), or the unsorted tokens
// (forward_tokens / backward_tokens: the layer's fused path), where each task gathers its expert's token rows itself
// and writes its weighted outputs to their assignments' slots; a token's K slots are then summed, as the layer's
// combine does. No (rows x D) copy of the tokens is made or kept for the backward.
//
// Legend: N tokens, K assignments per token, A = N*K assignments (token-major: assignment a belongs to token a / K),
// R rows sorted by expert (expert e owns rows offs[e] to offs[e+1]; row r is assignment order[r]), D model dim,
// E experts, F expert hidden dim, c rows of one expert; w_gate_up stacks the gate (first F rows) and up (last F
// rows) projections.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

void check(const at::Tensor& x, int64_t rows, const at::Tensor& offs, const at::Tensor& w_gate_up,
           const at::Tensor& w_down) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous fp32 (rows, D)");
  TORCH_CHECK(w_gate_up.dim() == 3 && w_down.dim() == 3 && w_gate_up.scalar_type() == at::kFloat &&
                  w_down.scalar_type() == at::kFloat && w_gate_up.is_contiguous() && w_down.is_contiguous(),
              "weights: contiguous fp32 (E, 2F, D) and (E, D, F)");
  const int64_t E = w_gate_up.size(0), F = w_down.size(2), D = x.size(1);
  TORCH_CHECK(w_gate_up.size(1) == 2 * F && w_gate_up.size(2) == D && w_down.size(0) == E && w_down.size(1) == D,
              "weights: shapes (E, 2F, D) and (E, D, F) that agree with x's D");
  TORCH_CHECK(offs.scalar_type() == at::kLong && offs.dim() == 1 && offs.numel() == E + 1 && offs.is_contiguous(),
              "offs: int64 (E + 1,) row offsets");
  const int64_t* o = offs.data_ptr<int64_t>();
  bool sorted = o[0] == 0 && o[E] == rows;
  for (int64_t e = 0; e < E; ++e) sorted = sorted && o[e] <= o[e + 1];
  TORCH_CHECK(sorted, "offs: non-decreasing row offsets from 0 to the row count");
}

// Where the unsorted path's rows come from and go to: row r is assignment order[r] of token order[r] / K, weighted
// by weights[order[r]].
struct Tokens {
  const int64_t* order;
  const float* weights;
  int64_t K;
};

Tokens tokens(const at::Tensor& x_ND, const at::Tensor& weights_A, const at::Tensor& order_R, int64_t R) {
  const int64_t N = x_ND.size(0), A = weights_A.numel();
  TORCH_CHECK(weights_A.scalar_type() == at::kFloat && weights_A.dim() == 1 && weights_A.is_contiguous() &&
                  (N ? A % N == 0 : A == 0),
              "weights: contiguous fp32 (N * K,), K assignments per token");
  TORCH_CHECK(order_R.scalar_type() == at::kLong && order_R.dim() == 1 && order_R.numel() == R &&
                  order_R.is_contiguous() && R <= A,
              "order: int64 (R,) assignment of each row");
  const int64_t* order = order_R.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(order[r] >= 0 && order[r] < A, "order: assignments in [0, N * K)");
  return {order, weights_A.data_ptr<float>(), N ? A / N : 1};
}

// Runs fn(e) for every non-empty expert. Experts with more rows than a thread's share run one at a time with every
// thread in their ops; the rest are tasks the threads take, largest first, so the last ones to finish are small.
template <class Fn>
void for_each_expert(const at::Tensor& offs, Fn&& fn) {
  const int64_t* o = offs.data_ptr<int64_t>();
  const int64_t E = offs.numel() - 1, total = o[E], threads = at::get_num_threads();
  std::vector<int64_t> order;
  for (int64_t e = 0; e < E; ++e)
    if (o[e + 1] > o[e]) order.push_back(e);
  std::stable_sort(order.begin(), order.end(),
                   [o](int64_t a, int64_t b) { return o[a + 1] - o[a] > o[b + 1] - o[b]; });
  size_t first = 0;
  for (; first < order.size() && (o[order[first] + 1] - o[order[first]]) * threads > total; ++first)
    fn(order[first]);
  std::atomic<size_t> next{first};
  const at::ThreadLocalState caller;  // pool threads start from defaults (grad mode on, autograd keys included)
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard same_state(caller);
    for (size_t i; (i = next.fetch_add(1)) < order.size();) fn(order[i]);
  });
}

// The token rows of rows [s, s + c), each times its assignment's weight if `weighted`.
at::Tensor gather(const at::Tensor& src_ND, const Tokens& t, int64_t s, int64_t c, bool weighted) {
  const int64_t D = src_ND.size(1);
  at::Tensor out_cD = at::empty({c, D}, src_ND.options());
  const float* src = src_ND.data_ptr<float>();
  float* out = out_cD.data_ptr<float>();
  for (int64_t i = 0; i < c; ++i) {
    const int64_t a = t.order[s + i];
    const float* row = src + a / t.K * D;
    if (weighted) {
      const float w = t.weights[a];
      for (int64_t d = 0; d < D; ++d) out[i * D + d] = row[d] * w;
    } else {
      std::memcpy(out + i * D, row, D * sizeof(float));
    }
  }
  return out_cD;
}

// Rows [s, s + c) of v into their assignments' slots of dst_AD, each times its weight if `weighted`.
void scatter(const at::Tensor& v_cD, const Tokens& t, int64_t s, at::Tensor& dst_AD, bool weighted) {
  const int64_t c = v_cD.size(0), D = v_cD.size(1);
  const float* v = v_cD.data_ptr<float>();
  float* dst = dst_AD.data_ptr<float>();
  for (int64_t i = 0; i < c; ++i) {
    const int64_t a = t.order[s + i];
    if (weighted) {
      const float w = t.weights[a];
      for (int64_t d = 0; d < D; ++d) dst[a * D + d] = v[i * D + d] * w;
    } else {
      std::memcpy(dst + a * D, v + i * D, D * sizeof(float));
    }
  }
}

// Each token's sum over its K slots (zero-filled where a dropped or padding assignment wrote nothing).
at::Tensor sum_slots(const at::Tensor& v_AD, int64_t K) {
  return v_AD.view({-1, K, v_AD.size(1)}).sum(1);
}

at::Tensor slots(const at::Tensor& like, int64_t A, int64_t R) {
  // Every slot is written when every assignment has a row; otherwise the others must read zero.
  return R == A ? at::empty({A, like.size(1)}, like.options()) : at::zeros({A, like.size(1)}, like.options());
}

// a . b over n floats. The scalar loop is a chain of dependent adds (the build does not reorder float sums), four
// cycles each; eight lanes of partial sums take it off the chain.
float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (float lane : lanes) sum += lane;
#endif
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

void gated_act_out(at::Tensor& a_cF, const at::Tensor& h_c2F, bool gelu) {
  const int64_t F = a_cF.size(1);
  const at::Tensor gate = h_c2F.narrow(1, 0, F), up = h_c2F.narrow(1, F, F);
  if (gelu) {
    at::gelu_out(a_cF, gate, "tanh");
  } else {
    at::silu_out(a_cF, gate);
  }
  a_cF.mul_(up);
}

// One expert's forward: h = x W_gate_up^T (kept), y = (act(gate) * up) W_down^T written into y_cD.
void expert_forward(const at::Tensor& x_cD, at::Tensor h_c2F, at::Tensor y_cD, const at::Tensor& w_gate_up_2FD,
                    const at::Tensor& w_down_DF, bool gelu) {
  at::mm_out(h_c2F, x_cD, w_gate_up_2FD.t());
  at::Tensor a_cF = at::empty({x_cD.size(0), w_down_DF.size(1)}, x_cD.options());
  gated_act_out(a_cF, h_c2F, gelu);
  at::mm_out(y_cD, a_cF, w_down_DF.t());
}

struct Needs {
  bool x, gate_up, down;
};

// One expert's backward from dy_cD: the weight gradients into their slices, and dh (c, 2F) returned for dx.
at::Tensor expert_backward(const at::Tensor& dy_cD, const at::Tensor& x_cD, const at::Tensor& h_c2F,
                           const at::Tensor& w_down_DF, bool gelu, Needs needs, at::Tensor dw_gate_up_2FD,
                           at::Tensor dw_down_DF) {
  const int64_t F = w_down_DF.size(1);
  const at::Tensor gate = h_c2F.narrow(1, 0, F), up = h_c2F.narrow(1, F, F);
  const at::Tensor act_cF = gelu ? at::gelu(gate, "tanh") : at::silu(gate);
  if (needs.down) at::mm_out(dw_down_DF, dy_cD.t(), act_cF * up);
  const at::Tensor da_cF = at::mm(dy_cD, w_down_DF);
  at::Tensor dh_c2F = at::empty({dy_cD.size(0), 2 * F}, dy_cD.options());
  at::Tensor dgate = dh_c2F.narrow(1, 0, F), dup = dh_c2F.narrow(1, F, F);
  if (gelu) {
    at::gelu_backward_out(dgate, da_cF * up, gate, "tanh");
  } else {
    at::silu_backward_out(dgate, da_cF * up, gate);
  }
  at::mul_out(dup, da_cF, act_cF);
  if (needs.gate_up) at::mm_out(dw_gate_up_2FD, dh_c2F.t(), x_cD);
  return dh_c2F;
}

// Weight gradients as asked for (an empty tensor stands for one not asked for); an expert without rows gets zeros,
// every other slice is written once by its task.
std::tuple<at::Tensor, at::Tensor> weight_grads(const at::Tensor& offs, const at::Tensor& w_gate_up,
                                                const at::Tensor& w_down, Needs needs) {
  const int64_t* o = offs.data_ptr<int64_t>();
  at::Tensor none = at::empty({0}, w_down.options());
  at::Tensor dw_gate_up = needs.gate_up ? at::empty_like(w_gate_up) : none;
  at::Tensor dw_down = needs.down ? at::empty_like(w_down) : none;
  for (int64_t e = 0; e + 1 < offs.numel(); ++e) {
    if (o[e + 1] > o[e]) continue;
    if (needs.gate_up) dw_gate_up.select(0, e).zero_();
    if (needs.down) dw_down.select(0, e).zero_();
  }
  return {dw_gate_up, dw_down};
}

at::Tensor select_or_none(const at::Tensor& t, int64_t e) { return t.numel() ? t.select(0, e) : t; }

// Rows sorted by expert -> (y, h): the backend seam.
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x_RD, const at::Tensor& offs, const at::Tensor& w_gate_up,
                                           const at::Tensor& w_down, bool gelu) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ops inside are this kernel's, not autograd's
  check(x_RD, x_RD.size(0), offs, w_gate_up, w_down);
  const int64_t R = x_RD.size(0), D = x_RD.size(1), F = w_down.size(2);
  const int64_t* o = offs.data_ptr<int64_t>();
  at::Tensor h_R2F = at::empty({R, 2 * F}, x_RD.options()), y_RD = at::empty({R, D}, x_RD.options());
  for_each_expert(offs, [&](int64_t e) {
    const int64_t s = o[e], c = o[e + 1] - s;
    expert_forward(x_RD.narrow(0, s, c), h_R2F.narrow(0, s, c), y_RD.narrow(0, s, c), w_gate_up.select(0, e),
                   w_down.select(0, e), gelu);
  });
  return {y_RD, h_R2F};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& dy_RD, const at::Tensor& x_RD,
                                                        const at::Tensor& h_R2F, const at::Tensor& offs,
                                                        const at::Tensor& w_gate_up, const at::Tensor& w_down,
                                                        bool gelu, bool need_x, bool need_gate_up, bool need_down) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check(x_RD, x_RD.size(0), offs, w_gate_up, w_down);
  TORCH_CHECK(dy_RD.sizes() == x_RD.sizes() && dy_RD.scalar_type() == at::kFloat && dy_RD.is_contiguous(),
              "dy: contiguous fp32 shaped like x");
  TORCH_CHECK(h_R2F.size(0) == x_RD.size(0) && h_R2F.size(1) == 2 * w_down.size(2) && h_R2F.is_contiguous(),
              "h: (R, 2F)");
  const Needs needs{need_x, need_gate_up, need_down};
  const int64_t* o = offs.data_ptr<int64_t>();
  at::Tensor dx_RD = need_x ? at::empty_like(x_RD) : at::empty({0}, x_RD.options());
  auto [dw_gate_up, dw_down] = weight_grads(offs, w_gate_up, w_down, needs);
  for_each_expert(offs, [&](int64_t e) {
    const int64_t s = o[e], c = o[e + 1] - s;
    const at::Tensor dh_c2F = expert_backward(dy_RD.narrow(0, s, c), x_RD.narrow(0, s, c), h_R2F.narrow(0, s, c),
                                              w_down.select(0, e), gelu, needs, select_or_none(dw_gate_up, e),
                                              select_or_none(dw_down, e));
    if (need_x) {
      at::Tensor dx_cD = dx_RD.narrow(0, s, c);
      at::mm_out(dx_cD, dh_c2F, w_gate_up.select(0, e));
    }
  });
  return {dx_RD, dw_gate_up, dw_down};
}

// Unsorted tokens -> (y_ND, h, y_RD): each token's weighted sum of its experts' outputs; h and the unweighted expert
// outputs y_RD are kept for the backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_tokens(const at::Tensor& x_ND, const at::Tensor& weights_A,
                                                              const at::Tensor& order_R, const at::Tensor& offs,
                                                              const at::Tensor& w_gate_up, const at::Tensor& w_down,
                                                              bool gelu) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t R = order_R.numel(), A = weights_A.numel(), D = x_ND.size(1), F = w_down.size(2);
  check(x_ND, R, offs, w_gate_up, w_down);
  const Tokens t = tokens(x_ND, weights_A, order_R, R);
  const int64_t* o = offs.data_ptr<int64_t>();
  at::Tensor h_R2F = at::empty({R, 2 * F}, x_ND.options()), y_RD = at::empty({R, D}, x_ND.options());
  at::Tensor y_AD = slots(x_ND, A, R);
  for_each_expert(offs, [&](int64_t e) {
    const int64_t s = o[e], c = o[e + 1] - s;
    const at::Tensor y_cD = y_RD.narrow(0, s, c);
    expert_forward(gather(x_ND, t, s, c, false), h_R2F.narrow(0, s, c), y_cD, w_gate_up.select(0, e),
                   w_down.select(0, e), gelu);
    scatter(y_cD, t, s, y_AD, true);
  });
  return {sum_slots(y_AD, t.K), h_R2F, y_RD};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_tokens(
    const at::Tensor& dy_ND, const at::Tensor& x_ND, const at::Tensor& weights_A, const at::Tensor& order_R,
    const at::Tensor& offs, const at::Tensor& h_R2F, const at::Tensor& y_RD, const at::Tensor& w_gate_up,
    const at::Tensor& w_down, bool gelu, bool need_x, bool need_weights, bool need_gate_up, bool need_down) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t R = order_R.numel(), A = weights_A.numel(), D = x_ND.size(1);
  check(x_ND, R, offs, w_gate_up, w_down);
  const Tokens t = tokens(x_ND, weights_A, order_R, R);
  TORCH_CHECK(dy_ND.sizes() == x_ND.sizes() && dy_ND.scalar_type() == at::kFloat && dy_ND.is_contiguous(),
              "dy: contiguous fp32 shaped like x");
  TORCH_CHECK(h_R2F.size(0) == R && h_R2F.size(1) == 2 * w_down.size(2) && h_R2F.is_contiguous(), "h: (R, 2F)");
  TORCH_CHECK(y_RD.size(0) == R && y_RD.size(1) == D && y_RD.is_contiguous(), "y: (R, D)");
  const Needs needs{need_x, need_gate_up, need_down};
  const int64_t* o = offs.data_ptr<int64_t>();
  at::Tensor dx_AD = need_x ? slots(x_ND, A, R) : at::empty({0}, x_ND.options());
  at::Tensor d_weights_A = need_weights ? at::zeros({A}, weights_A.options()) : at::empty({0}, x_ND.options());
  auto [dw_gate_up, dw_down] = weight_grads(offs, w_gate_up, w_down, needs);
  const float* dy = dy_ND.data_ptr<float>();
  const float* y = y_RD.data_ptr<float>();
  for_each_expert(offs, [&](int64_t e) {
    const int64_t s = o[e], c = o[e + 1] - s;
    if (need_weights) {  // d weight of an assignment: its token's gradient . its expert's output
      float* dw = d_weights_A.data_ptr<float>();
      for (int64_t r = s; r < s + c; ++r) dw[t.order[r]] = dot(dy + t.order[r] / t.K * D, y + r * D, D);
    }
    const at::Tensor dh_c2F = expert_backward(gather(dy_ND, t, s, c, true), gather(x_ND, t, s, c, false),
                                              h_R2F.narrow(0, s, c), w_down.select(0, e), gelu, needs,
                                              select_or_none(dw_gate_up, e), select_or_none(dw_down, e));
    if (need_x) scatter(at::mm(dh_c2F, w_gate_up.select(0, e)), t, s, dx_AD, false);
  });
  return {need_x ? sum_slots(dx_AD, t.K) : dx_AD, d_weights_A, dw_gate_up, dw_down};
}

}  // namespace

TORCH_LIBRARY(smoe_experts, m) {
  m.def("forward(Tensor x, Tensor offs, Tensor w_gate_up, Tensor w_down, bool gelu) -> (Tensor, Tensor)");
  m.def(
      "backward(Tensor dy, Tensor x, Tensor h, Tensor offs, Tensor w_gate_up, Tensor w_down, bool gelu, "
      "bool need_x, bool need_gate_up, bool need_down) -> (Tensor, Tensor, Tensor)");
  m.def(
      "forward_tokens(Tensor x, Tensor weights, Tensor order, Tensor offs, Tensor w_gate_up, Tensor w_down, "
      "bool gelu) -> (Tensor, Tensor, Tensor)");
  m.def(
      "backward_tokens(Tensor dy, Tensor x, Tensor weights, Tensor order, Tensor offs, Tensor h, Tensor y, "
      "Tensor w_gate_up, Tensor w_down, bool gelu, bool need_x, bool need_weights, bool need_gate_up, "
      "bool need_down) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(smoe_experts, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
  m.impl("forward_tokens", &forward_tokens);
  m.impl("backward_tokens", &backward_tokens);
}
