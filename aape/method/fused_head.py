"""The bottleneck head's evaluation path as one fused C++ loop (docs/method.md, "The classifier head").

`ClassifierHead`'s blocked PyTorch path runs eight ATen calls per block, each a pass over a
[images, k, classes] tensor; at k = 32 those passes, not the k x k quadratic form, take most of the
time (about 0.15x zero-shot's images per second at 1000 classes on a 2-core CPU). This loop does a
pair's whole work in registers, 16 classes per vector lane group, and uses VᵀV's symmetry
(rᵀGr = Σ_j r_j (G_jj r_j + 2 Σ_{m>j} G_jm r_m)), so the form costs 640 multiply-adds a pair instead of
1,024; benchmarks/bench_inference.py measures it beside zero-shot (0.357x, the PyTorch blocks 0.155x,
in one run of 2026-12-02).

It is compiled on first use with torch's C++ extension loader (a C++ compiler and ninja needed;
about 25 s, then cached by torch under ~/.cache/torch_extensions, one build per CPU type because it is
built with -march=native) and runs only where it gives the same numbers as the PyTorch path: no
autograd, float32 on the CPU, k in FUSED_WIDTHS. Threads: ATen's pool (torch.set_num_threads).
`AAPE_FUSED_HEAD`: `auto` (default: use it when it compiles, else say once why not and use PyTorch),
`off`, or `on` (an error when it cannot be used). A machine property, not an experiment setting: the
logits agree with the PyTorch path to float32 rounding (tested), so it is not in params.yaml.
"""

from __future__ import annotations

import hashlib
import logging
import platform
from typing import Any

import torch

from aape import switches
from aape.errors import AAPEError

log = logging.getLogger(__name__)

FUSED_WIDTHS = (16, 32, 64)  # bottleneck widths k with a compiled loop (k multiple of the 8-row chunks)
MODES = ("auto", "off", "on")
_EPS_SQ = 1e-16  # (torch.nn.functional.cosine_similarity's eps)², as the PyTorch path clamps |w|²

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

constexpr int L = 16;  // classes per lane group: one AVX-512 register of float32
constexpr int J = 8;   // rows of VᵀV per chunk: 8 independent accumulators keep both FMA ports busy

template <int K, bool FULL>
static void group(const float* pre_t, const float* linear_t, const float* gram_upper, const float* constant,
                  const float* image, const float* cross, const float* dots, float scale, float* out,
                  int64_t C, int64_t first, int n) {
  alignas(64) float r[K][L];
  alignas(64) float dot[L] = {0}, quad[L] = {0};
  for (int j = 0; j < K; ++j) {
    const float e = image[j], u = cross[j];
    const float* p = pre_t + j * C + first;
    const float* q = linear_t + j * C + first;
    #pragma omp simd
    for (int l = 0; l < L; ++l) {
      float v = (FULL || l < n) ? p[l] + e : 0.f;
      v = v > 0.f ? v : 0.f;  // r = ReLU(A·w_i + b + B·h(x))
      r[j][l] = v;
      dot[l] += v * u;                                  // (Vᵀx)·r
      quad[l] += v * ((FULL || l < n) ? q[l] : 0.f);    // 2Vᵀ(c + t_i)·r
    }
  }
  for (int c = 0; c < K; c += J) {  // rᵀ(VᵀV)r from the upper triangle (off-diagonal entries doubled)
    alignas(64) float t[J][L] = {};
    #pragma GCC unroll 8
    for (int m = c; m < c + J; ++m) {  // the diagonal block: row c + j starts at column c + j
      #pragma GCC unroll 8
      for (int j = 0; j < J; ++j) {
        if (j > m - c) continue;
        const float g = gram_upper[(c + j) * K + m];
        #pragma omp simd
        for (int l = 0; l < L; ++l) t[j][l] += g * r[m][l];
      }
    }
    for (int m = c + J; m < K; ++m) {
      #pragma GCC unroll 8
      for (int j = 0; j < J; ++j) {
        const float g = gram_upper[(c + j) * K + m];
        #pragma omp simd
        for (int l = 0; l < L; ++l) t[j][l] += g * r[m][l];
      }
    }
    #pragma GCC unroll 8
    for (int j = 0; j < J; ++j) {
      #pragma omp simd
      for (int l = 0; l < L; ++l) quad[l] += r[c + j][l] * t[j][l];
    }
  }
  for (int l = 0; l < n; ++l) {
    float norm_sq = constant[first + l] + quad[l];
    norm_sq = norm_sq > %(eps)s ? norm_sq : %(eps)s;
    out[first + l] = (dots[first + l] + dot[l]) / std::sqrt(norm_sq) * scale;
  }
}

template <int K>
static void run(const float* pre_t, const float* linear_t, const float* gram_upper, const float* constant,
                const float* image, const float* cross, const float* dots, const float* scale, float* out, int64_t B, int64_t C) {
  const int64_t groups = (C + L - 1) / L;
  at::parallel_for(0, B * groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / groups, first = (task %% groups) * L;
      const int n = static_cast<int>(std::min<int64_t>(L, C - first));
      const float* args_image = image + b * K;
      const float* args_cross = cross + b * K;
      if (n == L)
        group<K, true>(pre_t, linear_t, gram_upper, constant, args_image, args_cross, dots + b * C, scale[b], out + b * C, C, first, n);
      else
        group<K, false>(pre_t, linear_t, gram_upper, constant, args_image, args_cross, dots + b * C, scale[b], out + b * C, C, first, n);
    }
  });
}

torch::Tensor cosine(torch::Tensor pre_t, torch::Tensor linear_t, torch::Tensor gram_upper, torch::Tensor constant,
                     torch::Tensor image, torch::Tensor cross, torch::Tensor dots, torch::Tensor scale) {
  const int64_t B = image.size(0), K = image.size(1), C = pre_t.size(1);
  auto out = torch::empty({B, C}, dots.options());
  auto call = [&](auto run_k) {
    run_k(pre_t.data_ptr<float>(), linear_t.data_ptr<float>(), gram_upper.data_ptr<float>(), constant.data_ptr<float>(),
          image.data_ptr<float>(), cross.data_ptr<float>(), dots.data_ptr<float>(), scale.data_ptr<float>(),
          out.data_ptr<float>(), B, C);
  };
  if (K == 16) call(run<16>);
  else if (K == 32) call(run<32>);
  else if (K == 64) call(run<64>);
  else TORCH_CHECK(false, "fused AAPE head: k = ", K, " has no compiled loop");
  return out;
}
""" % {"eps": f"{_EPS_SQ:.0e}f"}


class FusedHeadError(AAPEError, RuntimeError):
    """AAPE_FUSED_HEAD=on, but the fused loop cannot be built or used here."""


_state: dict[str, Any] = {"module": None, "failure": None, "warned": False}


def mode() -> str:
    return switches.choice("AAPE_FUSED_HEAD", MODES, FusedHeadError)


def _cpu_signature() -> str:
    """What a -march=native build depends on: the CPU's feature flags (Linux) or its name."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha256(f"{flags}|{platform.machine()}|{platform.processor()}|{torch.__version__}".encode()).hexdigest()[:12]


def _compiled():
    """The extension module, built once per process (torch caches the build on disk), or None."""
    if _state["module"] is not None or _state["failure"] is not None:
        return _state["module"]
    from torch.utils.cpp_extension import load_inline

    name = f"aape_fused_head_{hashlib.sha256(_SOURCE.encode()).hexdigest()[:8]}_{_cpu_signature()}"
    try:
        # -fopenmp: at::parallel_for is inline OpenMP in torch's headers (without it the loop runs on one
        # thread); the extension then shares the libgomp.so.1 torch has already loaded
        _state["module"] = load_inline(name, cpp_sources=_SOURCE, functions=["cosine"],
                                       extra_cflags=["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno"],
                                       extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, a read-only cache: the PyTorch path does the same maths
        _state["failure"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}"
    return _state["module"]


def prebuild() -> bool:
    """Build the loop now (a minute on 2 cores the first time; later a load from torch's disk cache),
    so that the first evaluation does not pay for it. False where it is switched off or cannot build:
    evaluation then says so and takes the PyTorch path, as it would have anyway."""
    return mode() != "off" and _compiled() is not None


def usable(part, x: torch.Tensor, tracked: bool) -> bool:
    """Whether this evaluation can take the fused loop (after building it on first use)."""
    wanted = mode()
    if wanted == "off" or tracked:
        return False
    k = part.pre.shape[1]
    fits = x.device.type == "cpu" and x.dtype == torch.float32 and part.pre.dtype == torch.float32 and k in FUSED_WIDTHS
    if not fits:
        if wanted == "on":
            raise FusedHeadError(f"AAPE_FUSED_HEAD=on, but the fused head runs float32 on the CPU with k in {FUSED_WIDTHS} "
                                 f"(here {x.dtype} on {x.device.type}, k = {k}); unset it to use the PyTorch head")
        return False
    if _compiled() is None:
        if wanted == "on":
            raise FusedHeadError(f"AAPE_FUSED_HEAD=on, but the fused head did not build ({_state['failure']}); "
                                 "install a C++ compiler and ninja, or unset AAPE_FUSED_HEAD")
        if not _state["warned"]:
            log.warning("the fused AAPE head did not build (%s): evaluating with the PyTorch head, same logits, "
                        "about 2.3x slower at 1000 classes (AAPE_FUSED_HEAD=off silences this)", _state["failure"])
            _state["warned"] = True
        return False
    return True


def cosine(part, x_expand: torch.Tensor, image_part: torch.Tensor, dots_all: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """cos(x, w_i(x)) for every pair, [B, C], from x·o_i (`dots_all`), Vᵀx, B·h(x) and |x| ([B, 1])."""
    scale = x_norm.reciprocal().flatten().contiguous()
    return _compiled().cosine(*part.fused_inputs(), image_part.contiguous(), x_expand.contiguous(), dots_all.contiguous(), scale)
