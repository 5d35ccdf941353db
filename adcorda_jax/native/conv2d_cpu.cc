// Direct NHWC x HWIO 2-D convolution for XLA:CPU, exposed as an XLA FFI custom call.
//
// XLA:CPU runs convolutions with few channels (16 at 32x32, ResNet-20's first stage; 3-channel
// stems) through Eigen's im2col-style contraction at about half the machine's FMA peak, because
// every packed patch element is reused only once per output channel. This kernel keeps a block
// of P output pixels x (V * lanes) output channels in vector registers and walks the taps and
// input channels once, broadcasting each input value into V fused multiply-adds per output pixel
// it touches (up to KW pixels for stride 1: TapBlock), so the input is read from cache and never
// repacked. Work units are images (or, for small batches and large images, slices of output
// rows) spread over XLA's intra-op thread pool; each zero-pads the input rows it reads into a
// per-thread buffer.
//
// Requirements checked by the handler: float32, x [N,H,W,C], kernel [KH,KW,C,O] with O a
// multiple of the vector width (the Python wrapper pads O), strides >= 1, paddings >= 0.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
struct Vec {
  using T = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kPixels = 8;  // 8 pixels x 2 vectors = 16 of the 32 zmm accumulators
  // Pixels per block of the tap-reusing stride-1 path, for 1 and 2 vectors of output channels
  // (accumulators + kernel vectors must fit the 32 registers; measured best on Zen 5).
  static constexpr int kTapPixels1 = 12, kTapPixels2 = 8;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T splat(float a) { return _mm512_set1_ps(a); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
};
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
struct Vec {
  using T = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kPixels = 4;  // 16 ymm registers
  static constexpr int kTapPixels1 = 8, kTapPixels2 = 4;
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T splat(float a) { return _mm256_set1_ps(a); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
};
#else
// Portable fallback (NEON, SSE, ...): GCC/Clang vector extensions.
struct Vec {
  typedef float T __attribute__((vector_size(16)));
  static constexpr int kLanes = 4;
  static constexpr int kPixels = 4;
  static constexpr int kTapPixels1 = 8, kTapPixels2 = 4;
  static T zero() { return T{0, 0, 0, 0}; }
  static T load(const float* p) { T v; std::memcpy(&v, p, sizeof(v)); return v; }
  static T splat(float a) { return T{a, a, a, a}; }
  static T fma(T a, T b, T c) { return a * b + c; }
  static void store(float* p, T v) { std::memcpy(p, &v, sizeof(v)); }
};
#endif

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t n, h, w, c;         // input
  int64_t kh, kw, o;          // kernel
  int64_t oh, ow;             // output
  int64_t sh, sw;             // strides
  int64_t pt, pb, pl, pr;     // paddings
  int64_t padded_h() const { return h + pt + pb; }
  int64_t padded_w() const { return w + pl + pr; }
};

// P output pixels (input column stride `step` floats) x V vectors of output channels.
template <int V, int P>
inline void Block(const float* in, int64_t row_floats, int64_t step, const Geometry& g,
                  const float* kernel, float* out) {
  typename Vec::T acc[P][V];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v) acc[p][v] = Vec::zero();
  const int64_t c_count = g.c, o = g.o;
  for (int64_t dy = 0; dy < g.kh; ++dy) {
    for (int64_t dx = 0; dx < g.kw; ++dx) {
      const float* x = in + dy * row_floats + dx * c_count;
      const float* k = kernel + (dy * g.kw + dx) * c_count * o;
      for (int64_t c = 0; c < c_count; ++c) {
        typename Vec::T kv[V];
        for (int v = 0; v < V; ++v) kv[v] = Vec::load(k + c * o + v * Vec::kLanes);
        for (int p = 0; p < P; ++p) {
          const typename Vec::T xv = Vec::splat(x[p * step + c]);
          for (int v = 0; v < V; ++v) acc[p][v] = Vec::fma(xv, kv[v], acc[p][v]);
        }
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v) Vec::store(out + p * o + v * Vec::kLanes, acc[p][v]);
}

template <int V, int P>
inline void BlockTail(int64_t count, const float* in, int64_t row_floats, int64_t step,
                      const Geometry& g, const float* kernel, float* out) {
  if constexpr (P > 0) {
    if (count == P) return Block<V, P>(in, row_floats, step, g, kernel, out);
    return BlockTail<V, P - 1>(count, in, row_floats, step, g, kernel, out);
  }
}

// Stride 1, kernel width KW: consecutive output pixels share input columns, so each broadcast
// input value feeds up to KW pixels (KW FMAs per load instead of one).
template <int V, int P, int KW>
inline void TapBlock(const float* in, int64_t row_floats, const Geometry& g,
                     const float* kernel, float* out) {
  typename Vec::T acc[P][V];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v) acc[p][v] = Vec::zero();
  const int64_t c_count = g.c, o = g.o;
  for (int64_t dy = 0; dy < g.kh; ++dy) {
    const float* x = in + dy * row_floats;
    const float* k = kernel + dy * KW * c_count * o;
    for (int64_t c = 0; c < c_count; ++c) {
      typename Vec::T kv[KW][V];
      for (int dx = 0; dx < KW; ++dx)
        for (int v = 0; v < V; ++v)
          kv[dx][v] = Vec::load(k + (dx * c_count + c) * o + v * Vec::kLanes);
      for (int j = 0; j < P + KW - 1; ++j) {
        const typename Vec::T xv = Vec::splat(x[j * c_count + c]);
        for (int dx = 0; dx < KW; ++dx) {
          const int p = j - dx;  // Resolved at compile time: the loops are fully unrolled.
          if (p >= 0 && p < P)
            for (int v = 0; v < V; ++v) acc[p][v] = Vec::fma(xv, kv[dx][v], acc[p][v]);
        }
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v) Vec::store(out + p * o + v * Vec::kLanes, acc[p][v]);
}

template <int V, int KW>
int64_t TapBlocks(const float* in, int64_t row_floats, const Geometry& g, const float* kernel,
                  float* out) {
  constexpr int P = V == 1 ? Vec::kTapPixels1 : Vec::kTapPixels2;
  int64_t x = 0;
  for (; x + P <= g.ow; x += P)
    TapBlock<V, P, KW>(in + x * g.c, row_floats, g, kernel, out + x * g.o);
  return x;
}

// One output row: full pixel blocks (tap-reusing ones for stride 1 and 2- or 3-wide kernels),
// then the remainder, for one block of V output-channel vectors.
template <int V>
void Row(const float* in, int64_t row_floats, const Geometry& g, const float* kernel,
         float* out) {
  constexpr int P = Vec::kPixels;
  const int64_t step = g.sw * g.c;
  int64_t x = 0;
  if (g.sw == 1 && g.kw == 3) x = TapBlocks<V, 3>(in, row_floats, g, kernel, out);
  if (g.sw == 1 && g.kw == 2) x = TapBlocks<V, 2>(in, row_floats, g, kernel, out);
  for (; x + P <= g.ow; x += P)
    Block<V, P>(in + x * step, row_floats, step, g, kernel, out + x * g.o);
  if (x < g.ow)
    BlockTail<V, P - 1>(g.ow - x, in + x * step, row_floats, step, g, kernel, out + x * g.o);
}

// Output rows [r0, r1) of one image: the input rows they read are zero-padded into `padded`.
void Rows(const float* x, const float* kernel, float* y, const Geometry& g, int64_t r0,
          int64_t r1, std::vector<float>& padded) {
  const int64_t row_floats = g.padded_w() * g.c;
  const int64_t first = r0 * g.sh, count = (r1 - 1) * g.sh + g.kh - first;
  padded.assign(count * row_floats, 0.0f);
  for (int64_t r = 0; r < count; ++r) {
    const int64_t source = first + r - g.pt;
    if (source >= 0 && source < g.h)
      std::memcpy(&padded[r * row_floats + g.pl * g.c], x + source * g.w * g.c,
                  sizeof(float) * g.w * g.c);
  }
  constexpr int64_t kWide = 2 * Vec::kLanes;
  for (int64_t r = r0; r < r1; ++r) {
    const float* in = padded.data() + (r - r0) * g.sh * row_floats;
    float* out = y + r * g.ow * g.o;
    int64_t oc = 0;
    for (; oc + kWide <= g.o; oc += kWide) Row<2>(in, row_floats, g, kernel + oc, out + oc);
    for (; oc < g.o; oc += Vec::kLanes) Row<1>(in, row_floats, g, kernel + oc, out + oc);
  }
}

// Output rows per work unit: whole images when there are enough of them to keep every thread
// busy, else slices (a batch of one still uses all threads); never more rows than keep the padded
// input of a unit within about 1 MiB (large images stay in cache).
int64_t RowsPerUnit(const Geometry& g, int64_t threads) {
  constexpr int64_t kBufferFloats = (1 << 20) / sizeof(float);
  const int64_t row_floats = g.padded_w() * g.c;
  const int64_t by_cache = std::max<int64_t>(1, (kBufferFloats / row_floats - g.kh) / g.sh + 1);
  const int64_t slices = std::min(g.oh, (4 * threads + g.n - 1) / g.n);
  return std::max<int64_t>(1, std::min(by_cache, (g.oh + slices - 1) / slices));
}

// Work shared by the caller and the pool tasks; tasks may start after the caller returned
// (they then find no work), so the state is reference counted.
struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  std::mutex mu;
  std::condition_variable cv;
};

ffi::Error Conv2dImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                      ffi::ResultBuffer<ffi::F32> y, int64_t stride_h, int64_t stride_w,
                      int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                      int64_t pad_right) {
  const auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("conv2d_cpu: x, kernel and y must be rank 4");
  Geometry g{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[3], yd[1], yd[2],
             stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right};
  if (kd[2] != g.c || yd[0] != g.n || yd[3] != g.o)
    return ffi::Error::InvalidArgument("conv2d_cpu: x, kernel and y shapes disagree");
  if (g.o % Vec::kLanes != 0)
    return ffi::Error::InvalidArgument("conv2d_cpu: output channels must be a multiple of " +
                                       std::to_string(Vec::kLanes));
  if (g.sh < 1 || g.sw < 1 || g.pt < 0 || g.pb < 0 || g.pl < 0 || g.pr < 0 ||
      g.oh != (g.padded_h() - g.kh) / g.sh + 1 || g.ow != (g.padded_w() - g.kw) / g.sw + 1)
    return ffi::Error::InvalidArgument("conv2d_cpu: output size does not match strides/padding");
  if (g.n == 0 || g.oh <= 0 || g.ow <= 0) return ffi::Error::Success();

  const float* xs = x.typed_data();
  const float* ks = k.typed_data();
  float* ys = y->typed_data();
  const int64_t x_image = g.h * g.w * g.c, y_image = g.oh * g.ow * g.o;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t rows = RowsPerUnit(g, threads), slices = (g.oh + rows - 1) / rows;
  const int64_t units = g.n * slices;
  auto shared = std::make_shared<Shared>();
  auto work = [=](Shared& s) {
    std::vector<float> padded;
    int64_t done = 0;
    for (int64_t u; (u = s.next.fetch_add(1)) < units; ++done) {
      const int64_t i = u / slices, r0 = (u % slices) * rows;
      Rows(xs + i * x_image, ks, ys + i * y_image, g, r0, std::min(r0 + rows, g.oh), padded);
    }
    if (done && s.finished.fetch_add(done) + done == units) {
      std::lock_guard<std::mutex> lock(s.mu);
      s.cv.notify_all();
    }
  };
  const int64_t helpers = std::min(threads, units) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([shared, work] { work(*shared); });
  work(*shared);
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->finished.load() == units; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdcordaConv2dCpu, Conv2dImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_bottom")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("pad_right"));

extern "C" int adcorda_conv2d_cpu_lanes() { return Vec::kLanes; }
