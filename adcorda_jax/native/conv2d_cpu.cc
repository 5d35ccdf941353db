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

// Vector width and register blocking. Defaults per instruction set; the build's tuner
// (adcorda_jax/native/tune.py) compiles a few variants with -D overrides and keeps the one that
// measures fastest on the machine (full- and half-width AVX-512 and AVX2 differ).
#ifndef ADCORDA_VECTOR_BITS
#if defined(__AVX512F__)
#define ADCORDA_VECTOR_BITS 512
#elif defined(__AVX2__) && defined(__FMA__)
#define ADCORDA_VECTOR_BITS 256
#else
#define ADCORDA_VECTOR_BITS 128
#endif
#endif

#if ADCORDA_VECTOR_BITS == 512 && defined(__AVX512F__)
#include <immintrin.h>
#define ADCORDA_REGISTERS 32
struct Vec {
  using T = __m512;
  static constexpr int kLanes = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T splat(float a) { return _mm512_set1_ps(a); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
};
#elif ADCORDA_VECTOR_BITS >= 256 && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#if defined(__AVX512VL__)
#define ADCORDA_REGISTERS 32  // ymm0-31
#else
#define ADCORDA_REGISTERS 16
#endif
struct Vec {
  using T = __m256;
  static constexpr int kLanes = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T splat(float a) { return _mm256_set1_ps(a); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
};
#else
// Portable fallback (NEON, SSE, ...): GCC/Clang vector extensions.
#define ADCORDA_REGISTERS 16
struct Vec {
  typedef float T __attribute__((vector_size(16)));
  static constexpr int kLanes = 4;
  static T zero() { return T{0, 0, 0, 0}; }
  static T load(const float* p) { T v; std::memcpy(&v, p, sizeof(v)); return v; }
  static T splat(float a) { return T{a, a, a, a}; }
  static T fma(T a, T b, T c) { return a * b + c; }
  static T add(T a, T b) { return a + b; }
  static T max(T a, T b) { return a > b ? a : b; }
  static void store(float* p, T v) { std::memcpy(p, &v, sizeof(v)); }
};
#endif

// Output pixels per register block: the general path (2 vectors of output channels), the
// tap-reusing stride-1 path for 1 and 2 vectors (accumulators + kernel vectors + one broadcast
// must fit the registers), and kernel rows per weight-gradient tile for 1 and 2 vectors.
#if ADCORDA_REGISTERS == 32
#define ADCORDA_DEFAULTS 8, 12, 8, 16, 12
#else
#define ADCORDA_DEFAULTS 4, 8, 4, 8, 6
#endif
#ifndef ADCORDA_BLOCKING
#define ADCORDA_BLOCKING ADCORDA_DEFAULTS
#endif
struct Blocking {
  int pixels, tap_pixels1, tap_pixels2, grad_rows1, grad_rows2;
};
constexpr Blocking kBlocking{ADCORDA_BLOCKING};

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

// What the forward kernel does with each finished accumulator before storing it (the fused
// epilogue of a frozen conv -> BatchNorm -> ReLU [-> residual add -> ReLU]): add a per-channel
// bias, add a residual laid out like the output, clamp at zero. Pointers are positioned like
// the block's `out` (bias: at its first channel; residual: at its first element), or null.
struct Epilogue {
  const float* bias = nullptr;
  const float* residual = nullptr;
  bool relu = false;
  Epilogue at(int64_t channel, int64_t element) const {
    return {bias ? bias + channel : nullptr, residual ? residual + element : nullptr, relu};
  }
};

template <int V, int P>
inline void StoreBlock(typename Vec::T (&acc)[P][V], int64_t o, const Epilogue& e,
                       float* out) {
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v) {
      typename Vec::T r = acc[p][v];
      if (e.bias) r = Vec::add(r, Vec::load(e.bias + v * Vec::kLanes));
      if (e.residual) r = Vec::add(r, Vec::load(e.residual + p * o + v * Vec::kLanes));
      if (e.relu) r = Vec::max(r, Vec::zero());
      Vec::store(out + p * o + v * Vec::kLanes, r);
    }
}

// P output pixels (input column stride `step` floats) x V vectors of output channels.
template <int V, int P>
inline void Block(const float* in, int64_t row_floats, int64_t step, const Geometry& g,
                  const float* kernel, const Epilogue& e, float* out) {
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
#pragma GCC unroll 32
        for (int p = 0; p < P; ++p) {
          const typename Vec::T xv = Vec::splat(x[p * step + c]);
          for (int v = 0; v < V; ++v) acc[p][v] = Vec::fma(xv, kv[v], acc[p][v]);
        }
      }
    }
  }
  StoreBlock<V, P>(acc, o, e, out);
}

template <int V, int P>
inline void BlockTail(int64_t count, const float* in, int64_t row_floats, int64_t step,
                      const Geometry& g, const float* kernel, const Epilogue& e, float* out) {
  if constexpr (P > 0) {
    if (count == P) return Block<V, P>(in, row_floats, step, g, kernel, e, out);
    return BlockTail<V, P - 1>(count, in, row_floats, step, g, kernel, e, out);
  }
}

// Stride 1, kernel width KW: consecutive output pixels share input columns, so each broadcast
// input value feeds up to KW pixels (KW FMAs per load instead of one).
template <int V, int P, int KW>
inline void TapBlock(const float* in, int64_t row_floats, const Geometry& g,
                     const float* kernel, const Epilogue& e, float* out) {
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
      // Fully unrolled (the pragmas make sure of it for large P), so the accumulator indices
      // are compile-time constants and the accumulators stay in registers.
#pragma GCC unroll 64
      for (int j = 0; j < P + KW - 1; ++j) {
        const typename Vec::T xv = Vec::splat(x[j * c_count + c]);
#pragma GCC unroll 8
        for (int dx = 0; dx < KW; ++dx) {
          const int p = j - dx;
          if (p >= 0 && p < P)
            for (int v = 0; v < V; ++v) acc[p][v] = Vec::fma(xv, kv[dx][v], acc[p][v]);
        }
      }
    }
  }
  StoreBlock<V, P>(acc, o, e, out);
}

template <int V, int KW, int P>
inline void TapBlockTail(int64_t count, const float* in, int64_t row_floats, const Geometry& g,
                         const float* kernel, const Epilogue& e, float* out) {
  if constexpr (P > 0) {
    if (count == P) return TapBlock<V, P, KW>(in, row_floats, g, kernel, e, out);
    return TapBlockTail<V, KW, P - 1>(count, in, row_floats, g, kernel, e, out);
  }
}

// The whole row in tap-reusing blocks: full blocks of P pixels, then one shorter block (a row
// of 28 or 14 pixels would otherwise leave a quarter to half of it to the one-FMA-per-load path).
template <int V, int KW>
int64_t TapBlocks(const float* in, int64_t row_floats, const Geometry& g, const float* kernel,
                  const Epilogue& e, float* out) {
  constexpr int P = V == 1 ? kBlocking.tap_pixels1 : kBlocking.tap_pixels2;
  int64_t x = 0;
  for (; x + P <= g.ow; x += P)
    TapBlock<V, P, KW>(in + x * g.c, row_floats, g, kernel, e.at(0, x * g.o), out + x * g.o);
  if (x < g.ow)
    TapBlockTail<V, KW, P - 1>(g.ow - x, in + x * g.c, row_floats, g, kernel, e.at(0, x * g.o),
                               out + x * g.o);
  return g.ow;
}

// One output row: full pixel blocks (tap-reusing ones for stride 1 and 2- or 3-wide kernels),
// then the remainder, for one block of V output-channel vectors.
template <int V>
void Row(const float* in, int64_t row_floats, const Geometry& g, const float* kernel,
         const Epilogue& e, float* out) {
  constexpr int P = kBlocking.pixels;
  const int64_t step = g.sw * g.c;
  int64_t x = 0;
  if (g.sw == 1 && g.kw == 3) x = TapBlocks<V, 3>(in, row_floats, g, kernel, e, out);
  if (g.sw == 1 && g.kw == 2) x = TapBlocks<V, 2>(in, row_floats, g, kernel, e, out);
  for (; x + P <= g.ow; x += P)
    Block<V, P>(in + x * step, row_floats, step, g, kernel, e.at(0, x * g.o), out + x * g.o);
  if (x < g.ow)
    BlockTail<V, P - 1>(g.ow - x, in + x * step, row_floats, step, g, kernel, e.at(0, x * g.o),
                        out + x * g.o);
}

// Zero-pads the input rows that output rows [r0, r1) of one image read into `padded`. With a
// `gate` (laid out like x: the fused prologue of a ReLU's input gradient), input values whose
// gate is not positive are read as zero.
void PadRows(const float* x, const float* gate, const Geometry& g, int64_t r0, int64_t r1,
             std::vector<float>& padded) {
  const int64_t row_floats = g.padded_w() * g.c;
  const int64_t first = r0 * g.sh, count = (r1 - 1) * g.sh + g.kh - first;
  padded.assign(count * row_floats, 0.0f);
  for (int64_t r = 0; r < count; ++r) {
    const int64_t source = first + r - g.pt;
    if (source < 0 || source >= g.h) continue;
    float* target = &padded[r * row_floats + g.pl * g.c];
    const float* values = x + source * g.w * g.c;
    if (gate == nullptr) {
      std::memcpy(target, values, sizeof(float) * g.w * g.c);
    } else {
      const float* open = gate + source * g.w * g.c;
      for (int64_t j = 0; j < g.w * g.c; ++j) target[j] = open[j] > 0.0f ? values[j] : 0.0f;
    }
  }
}

// Output rows [r0, r1) of one image; `e` positioned at the image's first output element.
void Rows(const float* x, const float* gate, const float* kernel, const Epilogue& e, float* y,
          const Geometry& g, int64_t r0, int64_t r1, std::vector<float>& padded) {
  const int64_t row_floats = g.padded_w() * g.c;
  PadRows(x, gate, g, r0, r1, padded);
  constexpr int64_t kWide = 2 * Vec::kLanes;
  for (int64_t r = r0; r < r1; ++r) {
    const float* in = padded.data() + (r - r0) * g.sh * row_floats;
    const int64_t row = r * g.ow * g.o;
    float* out = y + row;
    int64_t oc = 0;
    for (; oc + kWide <= g.o; oc += kWide)
      Row<2>(in, row_floats, g, kernel + oc, e.at(oc, row + oc), out + oc);
    for (; oc < g.o; oc += Vec::kLanes)
      Row<1>(in, row_floats, g, kernel + oc, e.at(oc, row + oc), out + oc);
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

// Runs work(worker, unit) for units [0, units) on the caller and up to threads-1 pool tasks
// (worker ids 0..threads-1; one worker runs its units in order) and returns when all are done.
template <typename Work>
void RunUnits(ffi::ThreadPool& pool, int64_t threads, int64_t units, Work work) {
  auto shared = std::make_shared<Shared>();
  auto loop = [=](Shared& s, int64_t worker) {
    int64_t done = 0;
    for (int64_t u; (u = s.next.fetch_add(1)) < units; ++done) work(worker, u);
    if (done && s.finished.fetch_add(done) + done == units) {
      std::lock_guard<std::mutex> lock(s.mu);
      s.cv.notify_all();
    }
  };
  const int64_t helpers = std::min(threads, units) - 1;
  for (int64_t t = 1; t <= helpers; ++t) pool.Schedule([shared, loop, t] { loop(*shared, t); });
  loop(*shared, 0);
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->finished.load() == units; });
}

ffi::Error CheckGeometry(const Geometry& g) {
  if (g.o % Vec::kLanes != 0)
    return ffi::Error::InvalidArgument("conv2d_cpu: output channels must be a multiple of " +
                                       std::to_string(Vec::kLanes));
  if (g.sh < 1 || g.sw < 1 || g.pt < 0 || g.pb < 0 || g.pl < 0 || g.pr < 0 ||
      g.oh != (g.padded_h() - g.kh) / g.sh + 1 || g.ow != (g.padded_w() - g.kw) / g.sw + 1)
    return ffi::Error::InvalidArgument("conv2d_cpu: output size does not match strides/padding");
  return ffi::Error::Success();
}

// The convolution of x with kernel into y, with an optional input gate and epilogue operands
// (bias [O], residual like y, gate like x: null when absent).
ffi::Error Convolve(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& k,
                    ffi::ResultBuffer<ffi::F32>& y, const float* bias, const float* residual,
                    const float* gate, bool relu, int64_t stride_h, int64_t stride_w,
                    int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  const auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("conv2d_cpu: x, kernel and y must be rank 4");
  Geometry g{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[3], yd[1], yd[2],
             stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right};
  if (kd[2] != g.c || yd[0] != g.n || yd[3] != g.o)
    return ffi::Error::InvalidArgument("conv2d_cpu: x, kernel and y shapes disagree");
  if (ffi::Error error = CheckGeometry(g); error.failure()) return error;
  if (g.n == 0 || g.oh <= 0 || g.ow <= 0) return ffi::Error::Success();

  const float* xs = x.typed_data();
  const float* ks = k.typed_data();
  float* ys = y->typed_data();
  const int64_t x_image = g.h * g.w * g.c, y_image = g.oh * g.ow * g.o;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t rows = RowsPerUnit(g, threads), slices = (g.oh + rows - 1) / rows;
  const Epilogue epilogue{bias, residual, relu};
  auto padded = std::make_shared<std::vector<std::vector<float>>>(threads);
  RunUnits(pool, threads, g.n * slices, [=](int64_t worker, int64_t u) {
    const int64_t i = u / slices, r0 = (u % slices) * rows;
    Rows(xs + i * x_image, gate ? gate + i * x_image : nullptr, ks, epilogue.at(0, i * y_image),
         ys + i * y_image, g, r0, std::min(r0 + rows, g.oh), (*padded)[worker]);
  });
  return ffi::Error::Success();
}

ffi::Error Conv2dImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                      ffi::ResultBuffer<ffi::F32> y, int64_t stride_h, int64_t stride_w,
                      int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                      int64_t pad_right) {
  return Convolve(pool, x, k, y, nullptr, nullptr, nullptr, false, stride_h, stride_w, pad_top,
                  pad_bottom, pad_left, pad_right);
}

// The fused convolution: y = [relu](conv(x * [gate > 0], kernel) [+ bias] [+ residual]).
// Absent operands are passed as empty (size 0) buffers.
ffi::Error Conv2dFusedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> bias,
                           ffi::Buffer<ffi::F32> residual, ffi::Buffer<ffi::F32> gate,
                           ffi::ResultBuffer<ffi::F32> y, int64_t stride_h, int64_t stride_w,
                           int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                           int64_t pad_right, int64_t relu) {
  const int64_t channels = y->dimensions().size() == 4 ? y->dimensions()[3] : -1;
  if (bias.element_count() != 0 && bias.element_count() != channels)
    return ffi::Error::InvalidArgument("conv2d_cpu: bias must have one value per output channel");
  if (residual.element_count() != 0 && residual.element_count() != y->element_count())
    return ffi::Error::InvalidArgument("conv2d_cpu: residual must have the output's shape");
  if (gate.element_count() != 0 && gate.element_count() != x.element_count())
    return ffi::Error::InvalidArgument("conv2d_cpu: gate must have the input's shape");
  auto data = [](ffi::Buffer<ffi::F32>& buffer) -> const float* {
    return buffer.element_count() ? buffer.typed_data() : nullptr;
  };
  return Convolve(pool, x, k, y, data(bias), data(residual), data(gate), relu != 0, stride_h,
                  stride_w, pad_top, pad_bottom, pad_left, pad_right);
}

// ---- Kernel (weight) gradient: dW[kh, kw, c, o] = sum over images and output pixels of
// x_padded[n, p*sh + kh, q*sw + kw, c] * dy[n, p, q, o].
//
// For a fixed kernel row kh, the (kw, c) rows of dW are contiguous (HWIO), and so are the input
// values an output pixel multiplies them with (kw*C + c floats from its first column in the
// padded row). So each kernel row is a [KW*C, O] = patches^T x dy product whose patches are read
// in place: a tile of K of those rows x V output-channel vectors stays in registers while the
// pixels of a work unit stream through, one broadcast per row and V dy loads per pixel.
// The reduction over images is split into a fixed number of chunks, each accumulated into its
// own copy of dW, so results do not depend on which thread ran what.

constexpr int kGradRows1 = kBlocking.grad_rows1, kGradRows2 = kBlocking.grad_rows2;

template <int V, int K>
inline void GradTile(const float* x, int64_t x_row_stride, int64_t x_step, const float* dy,
                     int64_t o, int64_t rows, int64_t ow, float* dw) {
  typename Vec::T acc[K][V];
  for (int i = 0; i < K; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = Vec::load(dw + i * o + v * Vec::kLanes);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * x_row_stride;
    const float* dr = dy + r * ow * o;
    for (int64_t q = 0; q < ow; ++q) {
      const float* xp = xr + q * x_step;
      typename Vec::T dv[V];
      for (int v = 0; v < V; ++v) dv[v] = Vec::load(dr + q * o + v * Vec::kLanes);
      for (int i = 0; i < K; ++i) {
        const typename Vec::T xv = Vec::splat(xp[i]);
        for (int v = 0; v < V; ++v) acc[i][v] = Vec::fma(xv, dv[v], acc[i][v]);
      }
    }
  }
  for (int i = 0; i < K; ++i)
    for (int v = 0; v < V; ++v) Vec::store(dw + i * o + v * Vec::kLanes, acc[i][v]);
}

template <int V, int K>
inline void GradTileTail(int64_t count, const float* x, int64_t x_row_stride, int64_t x_step,
                         const float* dy, int64_t o, int64_t rows, int64_t ow, float* dw) {
  if constexpr (K > 0) {
    if (count == K) return GradTile<V, K>(x, x_row_stride, x_step, dy, o, rows, ow, dw);
    return GradTileTail<V, K - 1>(count, x, x_row_stride, x_step, dy, o, rows, ow, dw);
  }
}

// All tiles of one kernel row for V output-channel vectors starting at channel `oc`.
template <int V>
void GradKernelRow(const float* x, int64_t x_row_stride, int64_t x_step, int64_t k_rows,
                   const float* dy, const Geometry& g, int64_t rows, float* dw) {
  constexpr int K = V == 1 ? kGradRows1 : kGradRows2;
  int64_t i = 0;
  for (; i + K <= k_rows; i += K)
    GradTile<V, K>(x + i, x_row_stride, x_step, dy, g.o, rows, g.ow, dw + i * g.o);
  if (i < k_rows)
    GradTileTail<V, K - 1>(k_rows - i, x + i, x_row_stride, x_step, dy, g.o, rows, g.ow,
                           dw + i * g.o);
}

// Adds the contribution of output rows [r0, r1) of one image to `dw` ([KH, KW, C, O]).
void GradRows(const float* x, const float* dy, float* dw, const Geometry& g, int64_t r0,
              int64_t r1, std::vector<float>& padded) {
  const int64_t row_floats = g.padded_w() * g.c;
  PadRows(x, nullptr, g, r0, r1, padded);
  const int64_t k_rows = g.kw * g.c, x_row_stride = g.sh * row_floats, x_step = g.sw * g.c;
  const float* dy_rows = dy + r0 * g.ow * g.o;
  constexpr int64_t kWide = 2 * Vec::kLanes;
  for (int64_t kh = 0; kh < g.kh; ++kh) {
    const float* x_rows = padded.data() + kh * row_floats;
    float* dw_rows = dw + kh * k_rows * g.o;
    int64_t oc = 0;
    for (; oc + kWide <= g.o; oc += kWide)
      GradKernelRow<2>(x_rows, x_row_stride, x_step, k_rows, dy_rows + oc, g, r1 - r0,
                       dw_rows + oc);
    for (; oc < g.o; oc += Vec::kLanes)
      GradKernelRow<1>(x_rows, x_row_stride, x_step, k_rows, dy_rows + oc, g, r1 - r0,
                       dw_rows + oc);
  }
}

ffi::Error Conv2dKernelGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                                int64_t stride_h, int64_t stride_w, int64_t pad_top,
                                int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  const auto xd = x.dimensions(), yd = dy.dimensions(), kd = dw->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("conv2d_cpu: x, dy and kernel must be rank 4");
  Geometry g{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[3], yd[1], yd[2],
             stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right};
  if (kd[2] != g.c || yd[0] != g.n || yd[3] != g.o)
    return ffi::Error::InvalidArgument("conv2d_cpu: x, dy and kernel shapes disagree");
  if (ffi::Error error = CheckGeometry(g); error.failure()) return error;
  const int64_t size = g.kh * g.kw * g.c * g.o;
  float* out = dw->typed_data();
  std::fill(out, out + size, 0.0f);
  if (g.n == 0 || g.oh <= 0 || g.ow <= 0) return ffi::Error::Success();

  const float* xs = x.typed_data();
  const float* dys = dy.typed_data();
  const int64_t x_image = g.h * g.w * g.c, y_image = g.oh * g.ow * g.o;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t rows = RowsPerUnit(g, threads), slices = (g.oh + rows - 1) / rows;
  // Deterministic reduction: the units are split into `chunks` fixed, contiguous ranges, each
  // accumulated in order into its own copy of dW (chunk 0 into the output) by whichever thread
  // takes it, and the copies are summed in chunk order.
  const int64_t units = g.n * slices, chunks = std::min(threads, units);
  auto partial = std::make_shared<std::vector<std::vector<float>>>(chunks);
  auto padded = std::make_shared<std::vector<std::vector<float>>>(threads);
  RunUnits(pool, threads, chunks, [=](int64_t worker, int64_t chunk) {
    float* target = out;
    if (chunk > 0) {
      (*partial)[chunk].assign(size, 0.0f);
      target = (*partial)[chunk].data();
    }
    for (int64_t u = chunk * units / chunks; u < (chunk + 1) * units / chunks; ++u) {
      const int64_t i = u / slices, r0 = (u % slices) * rows;
      GradRows(xs + i * x_image, dys + i * y_image, target, g, r0, std::min(r0 + rows, g.oh),
               (*padded)[worker]);
    }
  });
  for (int64_t chunk = 1; chunk < chunks; ++chunk) {
    const float* copy = (*partial)[chunk].data();
    for (int64_t j = 0; j < size; ++j) out[j] += copy[j];
  }
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdcordaConv2dFusedCpu, Conv2dFusedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_bottom")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("pad_right")
                                  .Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdcordaConv2dKernelGradCpu, Conv2dKernelGradImpl,
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
extern "C" int adcorda_conv2d_cpu_tap_pixels(int vectors) {
  return vectors == 1 ? kBlocking.tap_pixels1 : kBlocking.tap_pixels2;
}
