// upfirdn2d: zero-insertion upsampling, padding (or cropping), 2-D FIR filtering
// (a true convolution) and downsampling, as one gather per output sample.
//
// Along one axis, output o reads the zero-upsampled, padded signal at
//   m(t) = o * down + t - pad0,  t = 0 .. k-1,  with weight k[k - 1 - t],
// and the upsampled signal is non-zero only where m is a multiple of `up` inside
// [0, in * up). Only those taps are visited: every `up`-th one, starting from the first
// valid one, so upsampling costs no multiply-by-zero.
#pragma once

#include "common.h"

namespace ipl {

struct Upfirdn2dParams {
  int64_t in_h, in_w;    // input plane
  int64_t out_h, out_w;  // output plane
  int64_t up_x, up_y, down_x, down_y;
  int64_t pad_x0, pad_y0;  // the far pads only decide the output size
  int64_t k_h, k_w;
};

// Output size along one axis; <= 0 means the arguments leave nothing.
IPL_HD int64_t upfirdn2d_out_size(int64_t in, int64_t up, int64_t down, int64_t pad0, int64_t pad1, int64_t k) {
  const int64_t span = in * up + pad0 + pad1 - k;
  return span < 0 ? 0 : span / down + 1;
}

// First useful tap of output o along one axis and the input index it reads.
IPL_HD void upfirdn2d_first_tap(int64_t o, int64_t up, int64_t down, int64_t pad0, int64_t& tap, int64_t& src) {
  const int64_t m = o * down - pad0;  // position read by tap 0
  // Smallest t >= 0 with m + t >= 0 and (m + t) % up == 0.
  tap = m >= 0 ? (up - m % up) % up : -m;
  src = (m + tap) / up;
}

// One output sample of the plane `x` (in_h x in_w, row-major) with filter k (k_h x k_w).
template <typename scalar_t, typename acc_t>
IPL_HD acc_t upfirdn2d_point(const scalar_t* x, const acc_t* k, const Upfirdn2dParams& p, int64_t oy, int64_t ox) {
  int64_t ty, iy, tx0, ix0;
  upfirdn2d_first_tap(oy, p.up_y, p.down_y, p.pad_y0, ty, iy);
  upfirdn2d_first_tap(ox, p.up_x, p.down_x, p.pad_x0, tx0, ix0);
  acc_t sum = acc_t(0);
  for (; ty < p.k_h && iy < p.in_h; ty += p.up_y, ++iy) {
    const scalar_t* row = x + iy * p.in_w;
    const acc_t* k_row = k + (p.k_h - 1 - ty) * p.k_w + (p.k_w - 1);
    int64_t ix = ix0;
    for (int64_t tx = tx0; tx < p.k_w && ix < p.in_w; tx += p.up_x, ++ix) {
      sum += static_cast<acc_t>(row[ix]) * k_row[-tx];
    }
  }
  return sum;
}

}  // namespace ipl
