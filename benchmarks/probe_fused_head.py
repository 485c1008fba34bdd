"""Could a fused C++ kernel bring the AAPE head to 0.3x zero-shot? (issue 19; an experiment, not a code path)

    .venv/bin/python benchmarks/probe_fused_head.py      # needs a C++ compiler with OpenMP (gcc); ~1 minute

Compiles (torch.utils.cpp_extension.load_inline, -O3 -march=native -ffast-math) one loop over
(image, class) pairs that does the bottleneck head's whole per-pair work in registers, two classes
at a time so each row of VᵀV is loaded once for both, and times it beside zero-shot and the
library's blocked PyTorch head on the same cached features at 1000 classes (checked equal to the
library's logits first). It prints figures, no verdict; the library does not use this kernel.
"""

import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torch.nn import functional as F  # noqa: E402

from aape.method import AAPEModel  # noqa: E402
torch.set_num_threads(2)
torch.manual_seed(0)
if shutil.which("g++") is None and shutil.which("c++") is None:
    sys.exit("probe_fused_head: no C++ compiler on PATH; nothing measured")
src = r'''
#include <torch/extension.h>
#include <omp.h>
#include <cmath>
template<int K>
void run(const float* pre, const float* e, const float* u, const float* M, const float* q, const float* cst,
         const float* num0, const float* xn, float* out, int64_t B, int64_t C) {
  #pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    float eb[K], ub[K];
    for (int l = 0; l < K; ++l) { eb[l] = e[b*K+l]; ub[l] = u[b*K+l]; }
    int64_t i = 0;
    for (; i + 1 < C; i += 2) {
      float r0[K], r1[K], a0[K], a1[K];
      const float* p0 = pre + i*K; const float* p1 = p0 + K;
      float s0 = 0.f, s1 = 0.f;
      for (int l = 0; l < K; ++l) {
        float v0 = p0[l] + eb[l]; v0 = v0 > 0.f ? v0 : 0.f; r0[l] = v0; s0 += v0*ub[l]; a0[l] = q[i*K+l];
        float v1 = p1[l] + eb[l]; v1 = v1 > 0.f ? v1 : 0.f; r1[l] = v1; s1 += v1*ub[l]; a1[l] = q[(i+1)*K+l];
      }
      for (int j = 0; j < K; ++j) { const float x0 = r0[j], x1 = r1[j]; const float* Mj = M + j*K;
        for (int l = 0; l < K; ++l) { const float mv = Mj[l]; a0[l] += x0 * mv; a1[l] += x1 * mv; } }
      float q0 = 0.f, q1 = 0.f;
      for (int l = 0; l < K; ++l) { q0 += r0[l]*a0[l]; q1 += r1[l]*a1[l]; }
      float d0 = cst[i] + q0; d0 = d0 > 1e-16f ? d0 : 1e-16f;
      float d1 = cst[i+1] + q1; d1 = d1 > 1e-16f ? d1 : 1e-16f;
      out[b*C+i] = (num0[b*C+i] + s0) / (std::sqrt(d0) * xn[b]);
      out[b*C+i+1] = (num0[b*C+i+1] + s1) / (std::sqrt(d1) * xn[b]);
    }
    for (; i < C; ++i) {
      float r[K], acc[K];
      const float* p = pre + i*K; const float* qi = q + i*K;
      float sn = 0.f;
      for (int l = 0; l < K; ++l) { float v = p[l] + eb[l]; v = v > 0.f ? v : 0.f; r[l] = v; sn += v*ub[l]; acc[l] = qi[l]; }
      for (int j = 0; j < K; ++j) { const float rj = r[j]; const float* Mj = M + j*K;
        for (int l = 0; l < K; ++l) acc[l] += rj * Mj[l]; }
      float sq = 0.f;
      for (int l = 0; l < K; ++l) sq += r[l]*acc[l];
      float den = cst[i] + sq; den = den > 1e-16f ? den : 1e-16f;
      out[b*C+i] = (num0[b*C+i] + sn) / (std::sqrt(den) * xn[b]);
    }
  }
}
torch::Tensor head(torch::Tensor pre, torch::Tensor e, torch::Tensor u, torch::Tensor M, torch::Tensor q,
                   torch::Tensor cst, torch::Tensor num0, torch::Tensor xn) {
  auto B = e.size(0), C = pre.size(0);
  auto out = torch::empty({B, C}, e.options());
  TORCH_CHECK(e.size(1) == 32, "k=32 only in this experiment");
  run<32>(pre.data_ptr<float>(), e.data_ptr<float>(), u.data_ptr<float>(), M.data_ptr<float>(), q.data_ptr<float>(),
          cst.data_ptr<float>(), num0.data_ptr<float>(), xn.data_ptr<float>(), out.data_ptr<float>(), B, C);
  return out;
}
'''
t = time.perf_counter()
build = tempfile.mkdtemp(prefix="aape-fused-head-")
ext = load_inline("aape_fused_head", cpp_sources=src, functions=["head"], extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                  extra_ldflags=["-fopenmp"], build_directory=build, verbose=False)
print("compile s", round(time.perf_counter() - t, 1))
d, C, B, n = 512, 1000, 256, 8192
m = AAPEModel(d).eval()
for p in m.head.expand.parameters(): torch.nn.init.normal_(p, std=0.02)
text = F.normalize(torch.randn(C, d), dim=-1); x = F.normalize(torch.randn(n, d), dim=-1)
cp = m.class_part(text); head = m.head
V, c = head.expand.weight.detach(), head.expand.bias.detach()
def fast(xb):
    e = head.image_part(m.generator(xb)).contiguous(); u = (xb @ V).contiguous()
    num0 = torch.addmm((xb @ c)[:, None], xb, text.T).contiguous()
    return ext.head(cp.pre.contiguous(), e, u, cp.gram.contiguous(), cp.linear.contiguous(), cp.const.contiguous(), num0, xb.norm(dim=-1).contiguous())
with torch.inference_mode():
    ref = m.logits_from(x[:256], cp) / 100
    print("maxdiff", (fast(x[:256]) - ref).abs().max().item())
def bench(fn):
    with torch.inference_mode():
        fn(); t = time.perf_counter()
        for _ in range(3): fn()
        return n / ((time.perf_counter() - t) / 3)
zs = bench(lambda: [(100 * x[s:s+B] @ text.T).argmax(-1) for s in range(0, n, B)])
torch_head = bench(lambda: [m.logits_from(x[s:s+B], cp).argmax(-1) for s in range(0, n, B)])
cpp = bench(lambda: [fast(x[s:s+B]).argmax(-1) for s in range(0, n, B)])
print(f"images/s at {C} classes: zero-shot {zs:,.0f}; library head (PyTorch, blocked) {torch_head:,.0f} ({torch_head / zs:.3f}x); "
      f"fused C++ kernel {cpp:,.0f} ({cpp / zs:.3f}x)")
shutil.rmtree(build, ignore_errors=True)
