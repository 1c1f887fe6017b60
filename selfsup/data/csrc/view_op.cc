// SelfsupView: one augmentation view fused into a single DALI CPU operator.
//
// Why: DALI's stock CPU operators each cost ~2.2 us per sample before any pixel work, its
// linear resize ~9 us on a 32-px view, and color_twist ~20 ns per pixel (a scalar loop);
// the stock graph needs 3-5 of them per view plus a numpy normalization. This operator does
// the whole view in one pass over each sample, on DALI's own thread pool, with loops the
// compiler vectorizes. It is the CPU counterpart of the stock graph in dali.py (which the GPU
// keeps) and follows the same order, rounding to uint8 between stages as DALI does:
//
//   crop+resize (linear; a box with x0 > x1 mirrors; triangle antialias when shrinking)
//   -> colour twist (DALI's color_twist in YIQ; grey: brightness/contrast only)
//   -> Gaussian blur (separable, reflect-101 borders, rounded once)
//   -> solarize (x >= 128 -> 255 - x)
//   -> normalize to float32 CHW ((x / 255 - mean) / std, grey replicated to out_chans)
//
// Inputs: 0 = uint8 HWC images (C = 1 or 3, any size per sample); 1 = float32 parameter
// rows of recipes.draw_params (y0 x0 y1 x1 flip bright contrast sat hue sigma solarize).
// Identity parameters skip their stage. Built with -ffp-contract=off: no fused multiply-add,
// so every machine computes the same floats (batches stay a pure function of the seed).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "dali/pipeline/operator/operator.h"

namespace selfsup {

using ::dali::CPUBackend;
using ::dali::OutputDesc;
using ::dali::TensorListShape;
using ::dali::Workspace;

constexpr int kParams = 11;
constexpr double kPi = 3.14159265358979323846;
enum { Y0, X0, Y1, X1, FLIP, BRIGHT, CONTRAST, SAT, HUE, SIGMA, SOLARIZE };

// Resampling taps of one axis: output i reads idx[i*k + j] with weight w[i*k + j].
struct Taps {
  int k = 0;
  std::vector<int> idx;
  std::vector<float> w;
  std::vector<double> wd;  // scratch
};

// Output pixel i of `out_len` covers source coordinate c = a + (i + 0.5) * step, with
// a = lo * in_len and step = (hi - lo) * in_len / out_len (negative: mirrored). A triangle
// filter of radius r = max(1, |step|) (r = 1 is bilinear; wider only with antialias) over
// pixel centres j + 0.5, borders clamped, weights normalized.
void MakeTaps(int in_len, int out_len, double lo, double hi, bool antialias, Taps &t) {
  const double a = lo * in_len, step = (hi - lo) * in_len / out_len;
  const double r = (antialias && std::fabs(step) > 1.0) ? std::fabs(step) : 1.0;
  t.k = r == 1.0 ? 2 : static_cast<int>(std::ceil(2 * r)) + 1;
  t.idx.resize(static_cast<size_t>(out_len) * t.k);
  t.w.resize(static_cast<size_t>(out_len) * t.k);
  t.wd.resize(t.k);
  double *wd = t.wd.data();
  for (int i = 0; i < out_len; i++) {
    const double c = a + (i + 0.5) * step;
    int *idx = &t.idx[i * t.k];
    float *w = &t.w[i * t.k];
    if (r == 1.0) {  // bilinear: the two centres around c - 0.5
      const double x = c - 0.5, j0 = std::floor(x), f = x - j0;
      idx[0] = std::min(std::max(static_cast<int>(j0), 0), in_len - 1);
      idx[1] = std::min(std::max(static_cast<int>(j0) + 1, 0), in_len - 1);
      w[0] = static_cast<float>(1.0 - f);
      w[1] = static_cast<float>(f);
      continue;
    }
    const int j0 = static_cast<int>(std::floor(c - r - 0.5)) + 1;
    double sum = 0;
    for (int j = 0; j < t.k; j++) {
      wd[j] = std::max(0.0, 1.0 - std::fabs(j0 + j + 0.5 - c) / r);
      sum += wd[j];
    }
    for (int j = 0; j < t.k; j++) {
      idx[j] = std::min(std::max(j0 + j, 0), in_len - 1);
      w[j] = static_cast<float>(sum > 0 ? wd[j] / sum : (j == 0));
    }
  }
}

inline uint8_t SatU8(float v) {  // round half to even (DALI's ConvertSat), then clamp
  v = std::nearbyintf(v);
  return static_cast<uint8_t>(v < 0.f ? 0.f : (v > 255.f ? 255.f : v));
}

inline int Reflect101(int i, int n) {
  if (n == 1) return 0;
  while (i < 0 || i >= n) i = i < 0 ? -i : 2 * n - 2 - i;
  return i;
}

// out[i] = sum_k w[k] * rows[k][i] for i < n: the same floats as `out[i] = 0; for k:
// out[i] += w[k] * rows[k][i]` (per lane: one multiply, one add, in k order), but 16 lanes
// at a time with the sum kept in a register across the taps (GCC/Clang vector extensions).
typedef float V16 __attribute__((vector_size(64)));

inline void WeightedRows(float *out, const float *const *rows, const float *w, int taps,
                         int n) {
  int i = 0;
  for (; i + 64 <= n; i += 64) {  // four independent sums hide the add latency
    V16 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int k = 0; k < taps; k++) {
      V16 r0, r1, r2, r3;
      const float *src = rows[k] + i;
      std::memcpy(&r0, src, sizeof(r0));
      std::memcpy(&r1, src + 16, sizeof(r1));
      std::memcpy(&r2, src + 32, sizeof(r2));
      std::memcpy(&r3, src + 48, sizeof(r3));
      a0 += w[k] * r0;
      a1 += w[k] * r1;
      a2 += w[k] * r2;
      a3 += w[k] * r3;
    }
    std::memcpy(out + i, &a0, sizeof(a0));
    std::memcpy(out + i + 16, &a1, sizeof(a1));
    std::memcpy(out + i + 32, &a2, sizeof(a2));
    std::memcpy(out + i + 48, &a3, sizeof(a3));
  }
  for (; i + 16 <= n; i += 16) {
    V16 acc = {};
    for (int k = 0; k < taps; k++) {
      V16 r;
      std::memcpy(&r, rows[k] + i, sizeof(r));
      acc += w[k] * r;
    }
    std::memcpy(out + i, &acc, sizeof(acc));
  }
  for (; i < n; i++) {
    float acc = 0.f;
    for (int k = 0; k < taps; k++) acc += w[k] * rows[k][i];
    out[i] = acc;
  }
}

// Scratch buffers of one worker thread.
struct Scratch {
  std::vector<float> rows, col, pad, g, src;
  std::vector<double> gd;
  std::vector<const float *> ptrs;
  std::vector<uint8_t> img;
  Taps ty, tx;
};

// crop + resize: horizontal pass over the source rows the vertical taps touch, then the
// vertical pass (contiguous rows: vectorized), rounded into dst (S*S*C).
template <int C>
void Resize(const uint8_t *src, int h, int w, const float *p, int s, bool antialias,
            Scratch &sc, uint8_t *dst) {
  MakeTaps(h, s, p[Y0], p[Y1], antialias, sc.ty);
  MakeTaps(w, s, p[X0], p[X1], antialias, sc.tx);
  int ymin = h, ymax = -1, xmin = w, xmax = -1;
  for (int v : sc.ty.idx) { ymin = std::min(ymin, v); ymax = std::max(ymax, v); }
  for (int v : sc.tx.idx) { xmin = std::min(xmin, v); xmax = std::max(xmax, v); }
  const int nrows = ymax - ymin + 1, rowlen = s * C, kx = sc.tx.k, ky = sc.ty.k;
  sc.rows.resize(static_cast<size_t>(nrows) * rowlen);
  sc.src.resize(static_cast<size_t>(w) * C);
  for (int y = 0; y < nrows; y++) {
    const uint8_t *in8 = src + static_cast<size_t>(y + ymin) * w * C;
    float *in = sc.src.data();  // the columns read, as floats (exact), converted once
    for (int i = xmin * C; i < (xmax + 1) * C; i++) in[i] = in8[i];
    float *out = sc.rows.data() + static_cast<size_t>(y) * rowlen;
    if (kx == 2) {  // bilinear
      for (int x = 0; x < s; x++) {
        const float *a = in + sc.tx.idx[2 * x] * C, *b = in + sc.tx.idx[2 * x + 1] * C;
        const float w0 = sc.tx.w[2 * x], w1 = sc.tx.w[2 * x + 1];
        for (int c = 0; c < C; c++) out[x * C + c] = w0 * a[c] + w1 * b[c];
      }
      continue;
    }
    for (int x = 0; x < s; x++) {
      const int *ix = &sc.tx.idx[x * kx];
      const float *wx = &sc.tx.w[x * kx];
      float acc[C] = {};
      for (int j = 0; j < kx; j++)
        for (int c = 0; c < C; c++) acc[c] += wx[j] * in[ix[j] * C + c];
      for (int c = 0; c < C; c++) out[x * C + c] = acc[c];
    }
  }
  sc.col.resize(rowlen);
  sc.ptrs.resize(ky);
  for (int y = 0; y < s; y++) {
    for (int j = 0; j < ky; j++)
      sc.ptrs[j] = sc.rows.data() + static_cast<size_t>(sc.ty.idx[y * ky + j] - ymin) * rowlen;
    float *acc = sc.col.data();
    WeightedRows(acc, sc.ptrs.data(), &sc.ty.w[y * ky], ky, rowlen);
    uint8_t *out = dst + static_cast<size_t>(y) * rowlen;
    for (int i = 0; i < rowlen; i++) out[i] = SatU8(acc[i]);
  }
}

// DALI's color_twist: b * c * (YIQ->RGB . hue/sat . RGB->YIQ) x + 128 (1 - c) b, computed
// in double as transforms.twist_matrices does, applied in float.
template <int C>
void Twist(uint8_t *img, int n, const float *p) {
  const double b = p[BRIGHT], c = p[CONTRAST], s = p[SAT], h = p[HUE] * kPi / 180.0;
  if (b == 1 && c == 1 && s == 1 && h == 0) return;
  const float off = static_cast<float>(128.0 * (1 - c) * b);
  if (C == 1) {  // saturation and hue are no-ops on grey
    const float bc = static_cast<float>(b * c);
    if (n < 1024) {  // a small view: fewer pixels than a table costs to fill
      for (int i = 0; i < n; i++) img[i] = SatU8(img[i] * bc + off);
      return;
    }
    uint8_t lut[256];  // the same values, tabulated per level
    for (int v = 0; v < 256; v++) lut[v] = SatU8(v * bc + off);
    for (int i = 0; i < n; i++) img[i] = lut[img[i]];
    return;
  }
  static const double rgb2yiq[3][3] = {{0.299, 0.587, 0.114}, {0.596, -0.274, -0.321},
                                       {0.211, -0.523, 0.311}};
  static const double yiq2rgb[3][3] = {{1.0, 0.956, 0.621}, {1.0, -0.272, -0.647},
                                       {1.0, -1.107, 1.705}};
  const double hs[3][3] = {{1, 0, 0},
                           {0, std::cos(h) * s, std::sin(h) * s},
                           {0, -std::sin(h) * s, std::cos(h) * s}};
  double t[3][3] = {}, m[3][3] = {};
  for (int i = 0; i < 3; i++)
    for (int j = 0; j < 3; j++)
      for (int k = 0; k < 3; k++) t[i][j] += hs[i][k] * rgb2yiq[k][j];
  for (int i = 0; i < 3; i++)
    for (int j = 0; j < 3; j++)
      for (int k = 0; k < 3; k++) m[i][j] += yiq2rgb[i][k] * t[k][j];
  float mf[9];
  for (int i = 0; i < 9; i++) mf[i] = static_cast<float>(b * c * m[i / 3][i % 3]);
  for (int i = 0; i < n; i++) {
    uint8_t *px = img + 3 * i;
    const float r = px[0], g = px[1], bl = px[2];
    px[0] = SatU8(mf[0] * r + mf[1] * g + mf[2] * bl + off);
    px[1] = SatU8(mf[3] * r + mf[4] * g + mf[5] * bl + off);
    px[2] = SatU8(mf[6] * r + mf[7] * g + mf[8] * bl + off);
  }
}

// Separable Gaussian (window `win`, the kernel of dali.blur_kernels), reflect-101 borders,
// one rounding: a float row pass into `rows`, then the column pass.
void Blur(uint8_t *img, int s, int ch, double sigma, int win, Scratch &sc) {
  const int r = win / 2, rowlen = s * ch;
  sc.gd.resize(win);
  sc.g.resize(win);
  float *g = sc.g.data();
  double sum = 0;
  const double sg = std::max(sigma, 1e-3);
  for (int k = 0; k < win; k++) {
    sc.gd[k] = std::exp(-(k - r) * (k - r) / (2 * sg * sg));
    sum += sc.gd[k];
  }
  for (int k = 0; k < win; k++) g[k] = static_cast<float>(sc.gd[k] / sum);
  sc.rows.resize(static_cast<size_t>(s) * rowlen);
  sc.pad.resize(static_cast<size_t>(s + 2 * r) * ch);
  sc.ptrs.resize(win);
  for (int y = 0; y < s; y++) {  // row pass: pad the row, then a contiguous dot per output
    const uint8_t *in = img + static_cast<size_t>(y) * rowlen;
    float *pad = sc.pad.data();
    for (int i = 0; i < rowlen; i++) pad[r * ch + i] = in[i];
    for (int x = 1; x <= r; x++)  // the reflected borders
      for (int c = 0; c < ch; c++) {
        pad[(r - x) * ch + c] = in[Reflect101(-x, s) * ch + c];
        pad[(r + s - 1 + x) * ch + c] = in[Reflect101(s - 1 + x, s) * ch + c];
      }
    float *out = sc.rows.data() + static_cast<size_t>(y) * rowlen;
    for (int k = 0; k < win; k++) sc.ptrs[k] = pad + k * ch;
    WeightedRows(out, sc.ptrs.data(), g, win, rowlen);
  }
  sc.col.resize(rowlen);
  for (int y = 0; y < s; y++) {  // column pass over whole rows
    for (int k = 0; k < win; k++)
      sc.ptrs[k] = sc.rows.data() + static_cast<size_t>(Reflect101(y + k - r, s)) * rowlen;
    float *acc = sc.col.data();
    WeightedRows(acc, sc.ptrs.data(), g, win, rowlen);
    uint8_t *out = img + static_cast<size_t>(y) * rowlen;
    for (int i = 0; i < rowlen; i++) out[i] = SatU8(acc[i]);
  }
}

class View : public ::dali::Operator<CPUBackend> {
 public:
  explicit View(const ::dali::OpSpec &spec)
      : ::dali::Operator<CPUBackend>(spec),
        size_(spec.GetArgument<int>("size")),
        window_(spec.GetArgument<int>("blur_window")),
        out_chans_(spec.GetArgument<int>("out_chans")),
        antialias_(spec.GetArgument<bool>("antialias")),
        scale_(spec.GetRepeatedArgument<float>("scale")),
        shift_(spec.GetRepeatedArgument<float>("shift")) {
    // (x / 255 - mean) / std as x * scale + shift (transforms.normalize's float32
    // constants), in double with one rounding: its floats exactly, tabulated per level
    for (size_t k = 0; k < scale_.size() && k < shift_.size(); k++)
      for (int v = 0; v < 256; v++)
        lut_.push_back(static_cast<float>(v * static_cast<double>(scale_[k]) +
                                          static_cast<double>(shift_[k])));
    DALI_ENFORCE(size_ >= 1, "selfsup_view: size must be >= 1, got " + std::to_string(size_));
    DALI_ENFORCE(window_ == 0 || (window_ > 0 && window_ % 2 == 1),
                 "selfsup_view: blur_window must be 0 or odd, got " + std::to_string(window_));
    DALI_ENFORCE(out_chans_ == 1 || out_chans_ == 3,
                 "selfsup_view: out_chans must be 1 or 3, got " + std::to_string(out_chans_));
    DALI_ENFORCE(static_cast<int>(scale_.size()) == out_chans_ &&
                 static_cast<int>(shift_.size()) == out_chans_,
                 "selfsup_view: scale and shift need out_chans entries");
  }

 protected:
  bool SetupImpl(std::vector<OutputDesc> &out, const Workspace &ws) override {
    const auto &img = ws.Input<CPUBackend>(0);
    const auto &par = ws.Input<CPUBackend>(1);
    DALI_ENFORCE(img.type() == DALI_UINT8, "selfsup_view: images must be uint8");
    DALI_ENFORCE(par.type() == DALI_FLOAT, "selfsup_view: params must be float32");
    const int n = img.num_samples();
    for (int i = 0; i < n; i++) {
      auto sh = img.shape().tensor_shape(i);
      DALI_ENFORCE(sh.size() == 3 && (sh[2] == 1 || sh[2] == 3) && sh[0] > 0 && sh[1] > 0,
                   "selfsup_view: each image must be HWC with C = 1 or 3");
      DALI_ENFORCE(par.shape().tensor_size(i) == kParams,
                   "selfsup_view: each params row must have 11 values (recipes.N_PARAMS)");
    }
    out.resize(1);
    out[0] = {::dali::uniform_list_shape(n, ::dali::TensorShape<>{out_chans_, size_, size_}),
              DALI_FLOAT};
    return true;
  }

  void RunImpl(Workspace &ws) override {
    const auto &img = ws.Input<CPUBackend>(0);
    const auto &par = ws.Input<CPUBackend>(1);
    auto &out = ws.Output<CPUBackend>(0);
    out.SetLayout("CHW");
    auto &tp = ws.GetThreadPool();
    // a few tasks per thread, not one per sample: a task costs ~1-3 us to queue and run,
    // as much as the pixel work of a small view
    const int n = img.num_samples();
    const int tasks = std::min(n, 4 * std::max(1, tp.NumThreads()));
    for (int t = 0; t < tasks; t++) {
      const int lo = static_cast<int>(static_cast<int64_t>(n) * t / tasks);
      const int hi = static_cast<int>(static_cast<int64_t>(n) * (t + 1) / tasks);
      tp.AddWork([&, lo, hi](int) {
        thread_local Scratch sc;  // reused across samples and batches
        for (int i = lo; i < hi; i++) {
          auto sh = img.shape().tensor_shape(i);
          Sample(img.tensor<uint8_t>(i), static_cast<int>(sh[0]), static_cast<int>(sh[1]),
                 static_cast<int>(sh[2]), par.tensor<float>(i), sc,
                 out.mutable_tensor<float>(i));
        }
      }, static_cast<int64_t>(hi - lo) * size_ * size_);
    }
    tp.RunAll();
  }

 private:
  void Sample(const uint8_t *src, int h, int w, int ch, const float *p, Scratch &sc,
              float *dst) const {
    const int s = size_, npx = s * s;
    sc.img.resize(static_cast<size_t>(npx) * ch);
    uint8_t *x = sc.img.data();
    if (ch == 3) {
      Resize<3>(src, h, w, p, s, antialias_, sc, x);
      Twist<3>(x, npx, p);
    } else {
      Resize<1>(src, h, w, p, s, antialias_, sc, x);
      Twist<1>(x, npx, p);
    }
    if (window_ > 0 && p[SIGMA] > 0) Blur(x, s, ch, p[SIGMA], window_, sc);
    if (p[SOLARIZE] > 0)
      for (int i = 0; i < npx * ch; i++) x[i] = x[i] >= 128 ? 255 - x[i] : x[i];
    for (int k = 0; k < out_chans_; k++) {  // normalize: a lookup of the 256 levels
      const float *lut = lut_.data() + 256 * k;
      float *o = dst + static_cast<size_t>(k) * npx;
      if (ch == 1) {
        for (int i = 0; i < npx; i++) o[i] = lut[x[i]];
      } else {
        for (int i = 0; i < npx; i++) o[i] = lut[x[i * 3 + k]];
      }
    }
  }

  int size_, window_, out_chans_;
  bool antialias_;
  std::vector<float> scale_, shift_, lut_;  // lut_: out_chans x 256
};

}  // namespace selfsup

DALI_REGISTER_OPERATOR(SelfsupView, ::selfsup::View, ::dali::CPU);

DALI_SCHEMA(SelfsupView)
    .DocStr("One augmentation view (crop+resize, colour twist, blur, solarize, normalize) "
            "fused on the CPU; see selfsup/data/csrc/view_op.cc.")
    .NumInput(2)
    .NumOutput(1)
    .AddArg("size", "output side in pixels", DALI_INT32)
    .AddArg("blur_window", "Gaussian window (odd), 0 = the view never blurs",
            DALI_INT32)
    .AddArg("out_chans", "output channels (grey is replicated)", DALI_INT32)
    .AddArg("antialias", "triangle-filter the crop when it shrinks", DALI_BOOL)
    .AddArg("scale", "per output channel: 1 / (255 std), float32", DALI_FLOAT_VEC)
    .AddArg("shift", "per output channel: -mean / std, float32", DALI_FLOAT_VEC);
