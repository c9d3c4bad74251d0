// CPU kernel of saliency::layer_saliency (docs/method.md section 3): one layer's S(a, i), summed over heads.
//
// Per rollout (at::parallel_for over rollouts), every head at once through batched ATen matmuls:
// grouped-query attention is a reshape, not a copy of K/V per query head: query head h = kv * g + j,
// so the [H, rows, d] queries viewed as [H_kv, g * rows, d] meet their kv head's keys in one bmm.
// The [H, T, n] think-to-image probabilities are materialised per chunk of image tokens only, with
// the chunk sized so that the per-rollout working set stays near kChunkElements values.
// bf16/fp16 inputs are computed in fp32, fp64 inputs in fp64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

namespace {

// Values of the largest per-rollout intermediate ([H, max(T, A), chunk]): 4M floats = 16 MiB.
constexpr int64_t kChunkElements = int64_t{1} << 22;

void check_shapes(const at::Tensor& q_think, const at::Tensor& lse_think, const at::Tensor& q_answer,
                  const at::Tensor& lse_answer, const at::Tensor& k_think, const at::Tensor& k_image,
                  const at::Tensor& v_image, const at::Tensor& u_answer, const at::Tensor& lengths,
                  const std::string& path) {
  TORCH_CHECK_VALUE(path == "cot" || path == "direct" || path == "both",
                    "path must be one of 'cot', 'direct', 'both', got '", path, "'");
  TORCH_CHECK_VALUE(q_think.dim() == 4, "q_think must be [B, H, T, d], got shape ", q_think.sizes());
  TORCH_CHECK_VALUE(lse_think.dim() == 3, "lse_think must be [B, H, T], got shape ", lse_think.sizes());
  TORCH_CHECK_VALUE(q_answer.dim() == 4, "q_answer must be [B, H, A, d], got shape ", q_answer.sizes());
  TORCH_CHECK_VALUE(lse_answer.dim() == 3, "lse_answer must be [B, H, A], got shape ", lse_answer.sizes());
  TORCH_CHECK_VALUE(k_think.dim() == 4, "k_think must be [B, H_kv, T, d], got shape ", k_think.sizes());
  TORCH_CHECK_VALUE(k_image.dim() == 4, "k_image must be [B, H_kv, N, d], got shape ", k_image.sizes());
  TORCH_CHECK_VALUE(v_image.dim() == 4, "v_image must be [B, H_kv, N, d], got shape ", v_image.sizes());
  TORCH_CHECK_VALUE(u_answer.dim() == 4, "u_answer must be [B, H, A, d], got shape ", u_answer.sizes());
  TORCH_CHECK_VALUE(lengths.dim() == 2 && lengths.size(1) == 3, "lengths must be [B, 3] (N_b, T_b, A_b), got shape ",
                    lengths.sizes());

  const int64_t batch = q_answer.size(0);
  const std::pair<const char*, const at::Tensor*> all[] = {
      {"q_think", &q_think}, {"lse_think", &lse_think}, {"lse_answer", &lse_answer}, {"k_think", &k_think},
      {"k_image", &k_image}, {"v_image", &v_image},     {"u_answer", &u_answer},     {"lengths", &lengths}};
  for (const auto& [name, tensor] : all) {
    TORCH_CHECK_VALUE(tensor->size(0) == batch, "batch size mismatch: ", name, " has B=", tensor->size(0),
                      " but q_answer has B=", batch);
    TORCH_CHECK_VALUE(tensor->device() == q_answer.device(), name, " is on ", tensor->device(),
                      " but q_answer is on ", q_answer.device());
  }

  const int64_t heads = q_answer.size(1), kv_heads = k_image.size(1), head_size = q_answer.size(3);
  const std::pair<const char*, const at::Tensor*> per_head[] = {
      {"q_think", &q_think}, {"lse_think", &lse_think}, {"lse_answer", &lse_answer}, {"u_answer", &u_answer}};
  for (const auto& [name, tensor] : per_head) {
    TORCH_CHECK_VALUE(tensor->size(1) == heads, "head count mismatch: ", name, " has H=", tensor->size(1),
                      " but q_answer has H=", heads);
  }
  TORCH_CHECK_VALUE(k_think.size(1) == kv_heads, "kv head count mismatch: k_think has H_kv=", k_think.size(1),
                    " but k_image has H_kv=", kv_heads);
  TORCH_CHECK_VALUE(v_image.size(1) == kv_heads, "kv head count mismatch: v_image has H_kv=", v_image.size(1),
                    " but k_image has H_kv=", kv_heads);
  TORCH_CHECK_VALUE(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "q_answer's H=", heads,
                    " must be a positive multiple of k_image's H_kv=", kv_heads);
  const std::pair<const char*, const at::Tensor*> per_dim[] = {
      {"q_think", &q_think}, {"k_think", &k_think}, {"k_image", &k_image}, {"v_image", &v_image},
      {"u_answer", &u_answer}};
  for (const auto& [name, tensor] : per_dim) {
    TORCH_CHECK_VALUE(tensor->size(3) == head_size, "head size mismatch: ", name, " has d=", tensor->size(3),
                      " but q_answer has d=", head_size);
  }
  const int64_t think = q_think.size(2), answers = q_answer.size(2), image = k_image.size(2);
  TORCH_CHECK_VALUE(lse_think.size(2) == think, "lse_think has T=", lse_think.size(2), " but q_think has T=", think);
  TORCH_CHECK_VALUE(k_think.size(2) == think, "k_think has T=", k_think.size(2), " but q_think has T=", think);
  TORCH_CHECK_VALUE(lse_answer.size(2) == answers, "lse_answer has A=", lse_answer.size(2),
                    " but q_answer has A=", answers);
  TORCH_CHECK_VALUE(u_answer.size(2) == answers, "u_answer has A=", u_answer.size(2), " but q_answer has A=", answers);
  TORCH_CHECK_VALUE(v_image.size(2) == image, "v_image has N=", v_image.size(2), " but k_image has N=", image);

  const auto dtype = q_answer.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "q_answer must be float32, float64, bfloat16 or float16, got ", dtype);
  const std::pair<const char*, const at::Tensor*> same_dtype[] = {
      {"q_think", &q_think}, {"k_think", &k_think}, {"k_image", &k_image}, {"v_image", &v_image},
      {"u_answer", &u_answer}};
  for (const auto& [name, tensor] : same_dtype) {
    TORCH_CHECK_TYPE(tensor->scalar_type() == dtype, name, " must have q_answer's dtype ", dtype, ", got ",
                     tensor->scalar_type());
  }
  // The log-sum-exp is float32 (what flash attention returns); float64 is also taken with float64 inputs.
  for (const auto& [name, tensor] : {std::pair{"lse_think", &lse_think}, std::pair{"lse_answer", &lse_answer}}) {
    const auto lse_dtype = tensor->scalar_type();
    TORCH_CHECK_TYPE(lse_dtype == at::kFloat || (dtype == at::kDouble && lse_dtype == at::kDouble), name,
                     " must be float32 (or float64 with float64 inputs), got ", lse_dtype);
  }
  TORCH_CHECK_TYPE(lengths.scalar_type() == at::kLong, "lengths must be int64, got ", lengths.scalar_type());

  const auto lens = lengths.accessor<int64_t, 2>();
  const int64_t limits[3] = {image, think, answers};
  const char* names[3] = {"N_b (image tokens)", "T_b (think tokens)", "A_b (answer tokens)"};
  for (int64_t b = 0; b < batch; ++b) {
    for (int j = 0; j < 3; ++j) {
      TORCH_CHECK_VALUE(lens[b][j] >= 0 && lens[b][j] <= limits[j], "lengths[", b, ", ", j, "] = ", lens[b][j],
                        " is out of range: ", names[j], " must lie in [0, ", limits[j], "]");
    }
  }
}

// [H, rows, d] (query head h = kv * g + j) as [H_kv, g * rows, d], in the compute dtype.
at::Tensor group_heads(const at::Tensor& per_head, int64_t kv_heads, at::ScalarType compute) {
  return per_head.to(compute).reshape({kv_heads, -1, per_head.size(-1)});
}

// exp(scale * q . k - lse) for grouped queries [H_kv, g * rows, d] and keys [H_kv, cols, d]: [H, rows, cols].
at::Tensor probabilities(const at::Tensor& grouped_q, const at::Tensor& keys, const at::Tensor& lse, double scale) {
  const int64_t heads = lse.size(0), rows = lse.size(1);
  return at::bmm(grouped_q, keys.transpose(1, 2)).view({heads, rows, keys.size(1)}).mul_(scale)
      .sub_(lse.unsqueeze(-1)).exp_();
}

at::Tensor layer_saliency_cpu(const at::Tensor& q_think, const at::Tensor& lse_think, const at::Tensor& q_answer,
                              const at::Tensor& lse_answer, const at::Tensor& k_think, const at::Tensor& k_image,
                              const at::Tensor& v_image, const at::Tensor& u_answer, const at::Tensor& lengths,
                              double scale, c10::string_view path_view) {
  const std::string path(path_view);
  check_shapes(q_think, lse_think, q_answer, lse_answer, k_think, k_image, v_image, u_answer, lengths, path);
  const bool cot = path != "direct", direct = path != "cot";
  const auto compute = q_answer.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t batch = q_answer.size(0), heads = q_answer.size(1), kv_heads = k_image.size(1);
  at::Tensor out = at::zeros({batch, q_answer.size(2), k_image.size(2)}, q_answer.options().dtype(compute));
  const auto lens = lengths.accessor<int64_t, 2>();

  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = lens[b][0], t = lens[b][1], a = lens[b][2];
      if (n == 0 || a == 0) continue;
      const bool through_think = cot && t > 0;  // T_b = 0: the chain carries nothing, S_cot = 0.
      const at::Tensor q_a = group_heads(q_answer[b].narrow(1, 0, a), kv_heads, compute);
      const at::Tensor u_a = group_heads(u_answer[b].narrow(1, 0, a), kv_heads, compute);
      const at::Tensor lse_a = lse_answer[b].narrow(1, 0, a).to(compute);
      at::Tensor q_t, lse_t, alpha_at;
      if (through_think) {
        q_t = group_heads(q_think[b].narrow(1, 0, t), kv_heads, compute);
        lse_t = lse_think[b].narrow(1, 0, t).to(compute);
        alpha_at = probabilities(q_a, k_think[b].narrow(1, 0, t).to(compute), lse_a, scale);  // [H, a, t]
      }
      const int64_t chunk = std::max<int64_t>(1, kChunkElements / (heads * std::max(t, a)));
      for (int64_t start = 0; start < n; start += chunk) {
        const int64_t width = std::min(chunk, n - start);
        const at::Tensor k_i = k_image[b].narrow(1, start, width).to(compute);
        const at::Tensor v_i = v_image[b].narrow(1, start, width).to(compute);
        at::Tensor weight = at::zeros({heads, a, width}, out.options());  // rho and/or alpha(a -> i)
        if (through_think) weight.add_(at::bmm(alpha_at, probabilities(q_t, k_i, lse_t, scale)));
        if (direct) weight.add_(probabilities(q_a, k_i, lse_a, scale));
        // <v_i, W_O^T g_a> for every head: [H_kv, g * a, d] x [H_kv, d, width] -> [H, a, width].
        const at::Tensor value_dot = at::bmm(u_a, v_i.transpose(1, 2)).view({heads, a, width});
        out[b].narrow(0, 0, a).narrow(1, start, width).copy_(weight.mul_(value_dot).sum(0));
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(saliency, CPU, m) {
  m.impl("layer_saliency", &layer_saliency_cpu);
}
