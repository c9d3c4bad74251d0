// CPU kernel of saliency::reward (docs/method.md section 4): the fraction of each upsampled saliency map's
// mass inside the union of its boxes, computed on the h' x w' grid without materialising H x W.
//
// Separable form. Bilinear upsampling with align_corners=False gives output pixel x the source
// coordinate u_x = (x + 0.5) * w' / W - 0.5, clamped to t_x in [0, w' - 1] (PyTorch clamps at 0;
// at the top its second tap repeats the last cell, which is the same as clamping). Pixel x gives
// cell c the weight hat(t_x - c) = max(0, 1 - |t_x - c|), which is PyTorch's (1 - lambda, lambda)
// pair. With the prefix weight sums Fx(Q)[c] = sum over x < Q of hat(t_x - c) (likewise Fy), the
// mass of the upsampled map in pixels [0, P) x [0, Q) is F(P, Q) = Fy(P)^T G Fx(Q), G = relu(map).
// Summation by parts in two dimensions turns the mass inside a union of rectangles into
//     sum over corners (P, Q) of D(P, Q) * F(P, Q),
//     D(P, Q) = cov(P-1, Q-1) - cov(P-1, Q) - cov(P, Q-1) + cov(P, Q),
// where cov(y, x) says whether pixel (y, x) is in the union; D vanishes except at the grid of the
// boxes' edges {y_lo, y_hi + 1} x {x_lo, x_hi + 1}. Each G Fx(Q) is a prefix of the weighted map
// G Fx(W) plus the few cells Fx(Q) cuts through, so the work is one O(h' w') pass over the map per
// rollout, O(h') per distinct x edge, and O(K^2 (K + h')) for the corners.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

namespace {

std::string describe(const at::Tensor& t) {
  std::ostringstream out;
  out << t.scalar_type() << " tensor of shape " << t.sizes() << " on " << t.device();
  return out.str();
}

bool is_index_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kInt || t.scalar_type() == at::kLong;
}

// One axis of the upsampling: n_pix output pixels sampling n_cells grid cells.
class Axis {
 public:
  Axis(int64_t n_cells, int64_t n_pix)
      : n_cells_(n_cells), n_pix_(n_pix), scale_(double(n_cells) / double(n_pix)),
        ratio_(double(n_pix) / double(n_cells)), edges_(n_cells + 2) {
    k_lo_ = below(0.0);
    k_hi_ = below(double(n_cells - 1));
    // edges_[c + 1] = number of pixels with t_x < c, for c = -1 .. n_cells: the pixels whose t lies
    // in [c - 1, c) raise cell c's weight, those in [c, c + 1) lower it.
    for (int64_t c = -1; c <= n_cells; ++c) {
      edges_[c + 1] = c <= 0 ? 0 : (c > n_cells - 1 ? n_pix : below(double(c)));
    }
  }

  // out[c] = sum over pixels x < q of the weight of cell c (the prefix weight sums).
  void prefix(int64_t q, double* out) const { prefix(q, 0, n_cells_, out); }

  // The same for cells [begin, end) only, written to out[begin .. end).
  void prefix(int64_t q, int64_t begin, int64_t end, double* out) const {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t lo = edges_[c], mid = edges_[c + 1], hi = edges_[c + 2];
      out[c] = sum_t_minus(lo, std::min(mid, q), double(c - 1)) -
               sum_t_minus(mid, std::min(hi, q), double(c + 1));
    }
  }

  // The cells [begin, end) whose prefix at q is partial: every cell before begin has all its pixels
  // (t in (c - 1, c + 1)) below q, so its prefix is the full sum; every cell from end on has none.
  std::pair<int64_t, int64_t> partial_cells(int64_t q) const {
    // edges_[c + 2] = pixels with t < c + 1; edges_[c] = pixels with t < c - 1; both rise with c.
    const int64_t begin = std::upper_bound(edges_.begin() + 2, edges_.end(), q) - (edges_.begin() + 2);
    const int64_t end = std::lower_bound(edges_.begin(), edges_.begin() + n_cells_, q) - edges_.begin();
    return {std::min(begin, n_cells_), std::max(end, std::min(begin, n_cells_))};
  }

 private:
  // Number of pixels x with u_x < v. Where floating point rounds an exact breakpoint either way,
  // the pixel's weight is the same on both sides (the hat is continuous), so the sums do not change.
  int64_t below(double v) const {
    const double n = std::ceil((v + 0.5) * ratio_ - 0.5);
    return std::clamp<int64_t>(static_cast<int64_t>(std::max(n, -1.0)), 0, n_pix_);
  }

  // Sum over pixels x in [p, q) of (t_x - off), in closed form: t is 0 below k_lo, n_cells - 1 from
  // k_hi on, and linear in x between.
  double sum_t_minus(int64_t p, int64_t q, double off) const {
    if (q <= p) return 0.0;
    double sum = 0.0;
    const int64_t n_low = std::max<int64_t>(0, std::min(q, k_lo_) - p);
    const int64_t n_high = std::max<int64_t>(0, q - std::max(p, k_hi_));
    sum += double(n_low) * (0.0 - off) + double(n_high) * (double(n_cells_ - 1) - off);
    const int64_t a = std::max(p, k_lo_), b = std::min(q, k_hi_);
    if (b > a) {
      // mean of u_x over [a, b) is ((a + b) / 2) * scale - 0.5
      sum += double(b - a) * (0.5 * double(a + b) * scale_ - 0.5 - off);
    }
    return sum;
  }

  int64_t n_cells_, n_pix_;
  double scale_, ratio_;
  int64_t k_lo_ = 0, k_hi_ = 0;
  std::vector<int64_t> edges_;
};

struct Box {
  int64_t x_lo, y_lo, x_hi, y_hi;  // inclusive, clamped to the image
};

bool covered(const std::vector<Box>& boxes, int64_t y, int64_t x) {
  for (const Box& b : boxes) {
    if (b.y_lo <= y && y <= b.y_hi && b.x_lo <= x && x <= b.x_hi) return true;
  }
  return false;
}

// relu by clearing every value whose sign bit is set: branch-free (compilers keep `v > 0 ? v : 0` as a
// branch, since the comparison may trap, and it mispredicts on maps of mixed sign) and vectorisable.
inline double relu(double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits &= ~static_cast<uint64_t>(static_cast<int64_t>(bits) >> 63);
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

double dot(const double* a, const double* b, int64_t n) {
  // Four independent sums: a single running sum is bound by the latency of the add, not by the loads.
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i] * b[i];
    s1 += a[i + 1] * b[i + 1];
    s2 += a[i + 2] * b[i + 2];
    s3 += a[i + 3] * b[i + 3];
  }
  for (; i < n; ++i) s0 += a[i] * b[i];
  return (s0 + s1) + (s2 + s3);
}

// Buffers reused across the rollouts of one thread.
struct Workspace {
  std::vector<double> g, fx, fx_full, fy, col_full, cols, cum;
  std::vector<int64_t> xs, ys, cuts;
};

// Mass in the union of the boxes over the total mass (0 if either is 0) of one rollout whose
// relu'd map is ws.g ([h, w], row-major).
//
// G Fx(Q) = (sum over c < begin of G[:, c] Fx(W)[c]) + (sum over the few partial cells [begin, end)
// of G[:, c] Fx(Q)[c]), where begin, end come from Axis::partial_cells(Q). The first term is a
// prefix of the weighted map at one of at most 2K + 1 cuts, all taken in one O(h w) pass.
double score(Workspace& ws, const Axis& ax, const Axis& ay, int64_t h, int64_t w, int64_t H, int64_t W,
             const std::vector<Box>& boxes) {
  if (boxes.empty()) return 0.0;
  auto& xs = ws.xs;
  auto& ys = ws.ys;
  xs.clear();
  ys.clear();
  for (const Box& b : boxes) {
    xs.push_back(b.x_lo);
    xs.push_back(b.x_hi + 1);
    ys.push_back(b.y_lo);
    ys.push_back(b.y_hi + 1);
  }
  for (auto* edges : {&xs, &ys}) {
    std::sort(edges->begin(), edges->end());
    edges->erase(std::unique(edges->begin(), edges->end()), edges->end());
  }
  // Cuts: where each column edge's partial cells begin, and w (for the total).
  auto& cuts = ws.cuts;
  cuts.assign(1, w);
  for (int64_t Q : xs) {
    if (Q != 0 && Q != W) cuts.push_back(ax.partial_cells(Q).first);
  }
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  const int64_t n_cuts = int64_t(cuts.size());
  ws.fx_full.resize(w);
  ax.prefix(W, ws.fx_full.data());
  // cum[r * n_cuts + i] = sum over c < cuts[i] of G[r][c] Fx(W)[c].
  ws.cum.resize(h * n_cuts);
  for (int64_t r = 0; r < h; ++r) {
    const double* row = ws.g.data() + r * w;
    double run = 0.0;
    int64_t from = 0;
    for (int64_t i = 0; i < n_cuts; ++i) {
      run += dot(row + from, ws.fx_full.data() + from, cuts[i] - from);
      from = cuts[i];
      ws.cum[r * n_cuts + i] = run;
    }
  }
  ws.fy.resize(h);
  ws.col_full.resize(h);
  for (int64_t r = 0; r < h; ++r) ws.col_full[r] = ws.cum[r * n_cuts + n_cuts - 1];
  ay.prefix(H, ws.fy.data());
  // Total mass F(H, W), computed exactly as a whole-image box's corner is, so such a box scores 1.
  const double total = dot(ws.fy.data(), ws.col_full.data(), h);
  if (!(total > 0.0)) return 0.0;

  // cols[j] = G Fx(xs[j]); edge 0 has F = 0 and is skipped.
  ws.cols.assign(xs.size() * h, 0.0);
  ws.fx.resize(w);
  for (size_t j = 0; j < xs.size(); ++j) {
    const int64_t Q = xs[j];
    if (Q == 0) continue;
    double* col = ws.cols.data() + j * h;
    if (Q == W) {
      std::copy(ws.col_full.begin(), ws.col_full.end(), col);
      continue;
    }
    const auto [begin, end] = ax.partial_cells(Q);
    const int64_t i = std::lower_bound(cuts.begin(), cuts.end(), begin) - cuts.begin();  // cuts[i] == begin
    ax.prefix(Q, begin, end, ws.fx.data());
    for (int64_t r = 0; r < h; ++r) {
      col[r] = ws.cum[r * n_cuts + i] + dot(ws.g.data() + r * w + begin, ws.fx.data() + begin, end - begin);
    }
  }
  double mass = 0.0;
  for (int64_t P : ys) {
    if (P == 0) continue;
    ay.prefix(P, ws.fy.data());
    for (size_t j = 0; j < xs.size(); ++j) {
      const int64_t Q = xs[j];
      if (Q == 0) continue;
      const int d = int(covered(boxes, P - 1, Q - 1)) - int(covered(boxes, P - 1, Q)) -
                    int(covered(boxes, P, Q - 1)) + int(covered(boxes, P, Q));
      if (d != 0) mass += d * dot(ws.fy.data(), ws.cols.data() + j * h, h);
    }
  }
  // The corner sum cancels large prefix masses; clamp its rounding (~1e-16 relative) into [0, 1].
  return std::clamp(mass / total, 0.0, 1.0);
}

// What is wrong with rollout b's sizes, box count, validity or boxes, in the order the Triton kernel checks
// them; empty when nothing is.
std::string value_problem(int64_t b, const int64_t* msp, const int64_t* isp, const int64_t* bxp, const int64_t* bcp,
                          const double* vdp, const at::Tensor& maps, const at::Tensor& boxes, int64_t h_max,
                          int64_t w_max, int64_t K_max);

// Pixel counts must be exact in float32 for the Triton kernel; the same limit here, so both kernels
// accept the same images (16.7 million pixels a side).
constexpr int64_t kMaxSide = int64_t{1} << 24;

at::Tensor reward_cpu(const at::Tensor& maps, const at::Tensor& map_sizes, const at::Tensor& image_sizes,
                      const at::Tensor& boxes, const at::Tensor& box_counts, const at::Tensor& valid, bool check) {
  // Wrong dtypes raise TypeError in Python, wrong shapes and values ValueError (as the Triton launcher does).
  TORCH_CHECK_TYPE(at::isFloatingType(maps.scalar_type()),
                   "reward: maps must be a float32/float64/bfloat16/float16 tensor of shape [B, h_max, w_max], got ",
                   describe(maps));
  TORCH_CHECK_VALUE(maps.dim() == 3, "reward: maps must have shape [B, h_max, w_max], got ", describe(maps));
  const int64_t B = maps.size(0), h_max = maps.size(1), w_max = maps.size(2);
  const struct {
    const char* name;
    const at::Tensor& t;
    const char* layout;
    std::vector<int64_t> shape;  // -1: any size
  } args[] = {{"map_sizes", map_sizes, "[B, 2] = (h', w')", {B, 2}},
              {"image_sizes", image_sizes, "[B, 2] = (H, W)", {B, 2}},
              {"boxes", boxes, "[B, K_max, 4] = (x_lo, y_lo, x_hi, y_hi)", {B, -1, 4}},
              {"box_counts", box_counts, "[B]", {B}},
              {"valid", valid, "[B]", {B}}};
  for (const auto& arg : args) {
    if (std::string(arg.name) == "valid") {
      TORCH_CHECK_TYPE(at::isFloatingType(arg.t.scalar_type()),
                       "reward: valid must be a floating-point tensor of shape [B], got ", describe(arg.t));
    } else {
      TORCH_CHECK_TYPE(is_index_dtype(arg.t), "reward: ", arg.name, " must be an int32/int64 tensor of shape ",
                       arg.layout, ", got ", describe(arg.t));
    }
    bool fits = arg.t.dim() == int64_t(arg.shape.size());
    for (size_t i = 0; fits && i < arg.shape.size(); ++i) {
      fits = arg.shape[i] < 0 || arg.t.size(i) == arg.shape[i];
    }
    TORCH_CHECK_VALUE(fits, "reward: ", arg.name, " must have shape ", arg.layout, " with B = ", B,
                      " (the batch size of maps), got ", describe(arg.t));
  }
  for (const at::Tensor* t : {&maps, &map_sizes, &image_sizes, &boxes, &box_counts, &valid}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), "reward: the CPU kernel needs every argument on the CPU, got ",
                describe(*t), " beside maps ", describe(maps));
  }

  const int64_t K_max = boxes.size(1);
  const at::Tensor ms = map_sizes.to(at::kLong).contiguous(), is = image_sizes.to(at::kLong).contiguous(),
                   bx = boxes.to(at::kLong).contiguous(), bc = box_counts.to(at::kLong).contiguous(),
                   vd = valid.to(at::kDouble).contiguous();
  const int64_t *msp = ms.const_data_ptr<int64_t>(), *isp = is.const_data_ptr<int64_t>(),
                *bxp = bx.const_data_ptr<int64_t>(), *bcp = bc.const_data_ptr<int64_t>();
  const double* vdp = vd.const_data_ptr<double>();

  // Argument values, checked before any work so that the first bad rollout is the one reported. Without
  // `check`, a bad rollout's result is NaN instead (never a plausible number), as the Triton kernel's.
  std::vector<std::vector<Box>> rollout_boxes(B);
  std::vector<char> usable(B, 1);
  for (int64_t b = 0; b < B; ++b) {
    const std::string problem = value_problem(b, msp, isp, bxp, bcp, vdp, maps, boxes, h_max, w_max, K_max);
    if (!problem.empty()) {
      TORCH_CHECK_VALUE(!check, problem);
      usable[b] = 0;
      continue;
    }
    const int64_t H = isp[2 * b], W = isp[2 * b + 1];
    for (int64_t k = 0; k < bcp[b]; ++k) {
      const int64_t* q = bxp + (b * K_max + k) * 4;
      // Clamp to the image; a box wholly off it is empty and dropped.
      const Box c{std::max<int64_t>(q[0], 0), std::max<int64_t>(q[1], 0), std::min(q[2], W - 1),
                  std::min(q[3], H - 1)};
      if (c.x_lo <= c.x_hi && c.y_lo <= c.y_hi) rollout_boxes[b].push_back(c);
    }
  }

  at::Tensor out = at::empty({B}, maps.options().dtype(at::kFloat));
  float* outp = out.mutable_data_ptr<float>();
  std::vector<char> finite(B, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps.scalar_type(), "saliency_reward_cpu", [&] {
    const scalar_t* mp = maps.const_data_ptr<scalar_t>();
    const int64_t sb = maps.stride(0), sh = maps.stride(1), sw = maps.stride(2);
    // About 32k map cells per task (~100 us): fewer and the threads' start-up outweighs the work.
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, h_max * w_max));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      Workspace ws;
      for (int64_t b = begin; b < end; ++b) {
        if (!usable[b]) {
          outp[b] = NAN;
          continue;
        }
        const int64_t h = msp[2 * b], w = msp[2 * b + 1], H = isp[2 * b], W = isp[2 * b + 1];
        // relu, the finiteness check and the peak in one pass over the map.
        ws.g.resize(h * w);
        // Branch-free: v - v is 0 for finite v and NaN for NaN or inf.
        int non_finite = 0;
        double peak = 0.0;
        for (int64_t r = 0; r < h; ++r) {
          const scalar_t* row = mp + b * sb + r * sh;
          double* out_row = ws.g.data() + r * w;
          for (int64_t c = 0; c < w; ++c) {
            const double v = static_cast<double>(row[c * sw]);
            non_finite |= !(v - v == 0.0);
            out_row[c] = relu(v);
            peak = std::max(peak, out_row[c]);
          }
        }
        // The score is invariant to the map's scale: a map near the ends of float64's range (1e308, whose
        // mass overflows; 1e-310, whose weighted sums underflow) is brought to a peak of 1 first.
        if (peak > 0.0 && (peak > 1e100 || peak < 1e-100)) {
          for (double& v : ws.g) v /= peak;
        }
        const bool ok = non_finite == 0;
        finite[b] = ok;
        outp[b] = ok ? static_cast<float>(vdp[b] * score(ws, Axis(w, W), Axis(h, H), h, w, H, W, rollout_boxes[b]))
                     : NAN;
      }
    });
  });
  for (int64_t b = 0; b < B && check; ++b) {
    TORCH_CHECK_VALUE(finite[b], "reward: maps[", b, "] holds NaN or inf inside its map_sizes[", b, "] = (", msp[2 * b],
                ", ", msp[2 * b + 1], ") region");
  }
  return out;
}

std::string value_problem(int64_t b, const int64_t* msp, const int64_t* isp, const int64_t* bxp, const int64_t* bcp,
                          const double* vdp, const at::Tensor& maps, const at::Tensor& boxes, int64_t h_max,
                          int64_t w_max, int64_t K_max) {
  std::ostringstream out;
  const int64_t h = msp[2 * b], w = msp[2 * b + 1], H = isp[2 * b], W = isp[2 * b + 1];
  if (!(h > 0 && w > 0)) {
    out << "reward: map_sizes[" << b << "] = (" << h << ", " << w << ") must be positive";
  } else if (!(h <= h_max && w <= w_max)) {
    out << "reward: map_sizes[" << b << "] = (" << h << ", " << w << ") is larger than the padded maps tensor of shape "
        << maps.sizes();
  } else if (!(H > 0 && W > 0 && H <= kMaxSide && W <= kMaxSide)) {
    out << "reward: image_sizes[" << b << "] = (" << H << ", " << W << ") must be positive and at most " << kMaxSide
        << " (the float32 kernel counts pixels exactly up to there)";
  } else if (!(bcp[b] >= 0 && bcp[b] <= K_max)) {
    out << "reward: box_counts[" << b << "] = " << bcp[b] << " must lie in [0, K_max = " << K_max << "] (boxes has shape "
        << boxes.sizes() << ")";
  } else if (!std::isfinite(vdp[b])) {
    out << "reward: valid[" << b << "] = " << vdp[b] << " is not finite";
  } else {
    for (const char axis : {'x', 'y'}) {
      for (int64_t k = 0; k < bcp[b]; ++k) {
        const int64_t* q = bxp + (b * K_max + k) * 4;
        if (axis == 'x' ? q[2] < q[0] : q[3] < q[1]) {
          out << "reward: boxes[" << b << ", " << k << "] = (" << q[0] << ", " << q[1] << ", " << q[2] << ", " << q[3]
              << ") has " << axis << "_hi < " << axis << "_lo";
          return out.str();
        }
      }
    }
  }
  return out.str();
}

}  // namespace

TORCH_LIBRARY_IMPL(saliency, CPU, m) { m.impl("reward", &reward_cpu); }
