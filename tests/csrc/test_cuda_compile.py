"""CI checks of the CUDA sources, on a machine without a GPU.

* Every kernel header ``csrc/cuda/*.cuh`` compiles with plain nvcc for sm_80 and sm_90a with
  ``-DSPARSEKERN_COMPILE_CHECK`` (its explicit float / __half / __nv_bfloat16 instantiations), so a broken
  kernel fails CI; a deliberately broken copy must fail the same check.
* The channel-skipping kernel runs on the CPU through an emulation of the CUDA thread model (``_EMULATOR``
  below: one std::thread per CUDA thread, std::barrier for ``__syncthreads``, warp ballots through the barrier,
  WMMA fragments computed by lane 0 of each warp), compiled with g++ against the real header, and must match
  the reference. This checks the kernel's indexing, double buffering, zero tiles and both the WMMA (fp16/bf16)
  and FMA (fp32) main loops; it cannot check timing, memory coalescing or the real tensor-core fragment layout.

The ``.cu`` registration files are not compiled here: nvcc over torch's headers takes about 85 s of CPU time per
file for two architectures, beyond this suite's budget. ``sparsekern bench gpu --compile-check`` compiles every
``.cu`` and ``.cuh``, and test_cuda_bindings_compile.py does the same in CI or with ``SPARSEKERN_NVCC_FULL=1``.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsekern.ops import reference
from sparsekern.ops._ext import csrc_dir

CUDA_DIR = csrc_dir() / "cuda"
HEADERS = sorted(CUDA_DIR.glob("*.cuh"))
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
COMPILE_CHECK = ["-x", "cu", "-std=c++17", "-DSPARSEKERN_COMPILE_CHECK", "-gencode", "arch=compute_80,code=sm_80",
                 "-gencode", "arch=compute_90a,code=sm_90a", "--threads", "2", "-c"]


def compile_check(header: Path, out_dir: Path) -> subprocess.CompletedProcess:
    """nvcc's compile check of one kernel header (what CI runs)."""
    cmd = [NVCC, *COMPILE_CHECK, str(header), "-o", str(out_dir / f"{header.stem}.o")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@needs_nvcc
@pytest.mark.parametrize("header", HEADERS, ids=[h.name for h in HEADERS])
def test_kernel_header_compiles_for_sm80_and_sm90a(header: Path, tmp_path: Path) -> None:
    done = compile_check(header, tmp_path)
    assert done.returncode == 0, f"nvcc failed on {header.name}:\n{done.stderr}"


@needs_nvcc
def test_a_broken_kernel_fails_the_check(tmp_path: Path) -> None:
    """An error that only appears when the kernel template is instantiated: the check catches it because
    SPARSEKERN_COMPILE_CHECK instantiates every dtype."""
    source = (CUDA_DIR / "channel_skip_conv2d.cuh").read_text()
    broken = source.replace("acc.zero();", "acc.zero(p.no_such_field);", 1)
    assert broken != source
    (tmp_path / "channel_skip_conv2d.cuh").write_text(broken)
    done = compile_check(tmp_path / "channel_skip_conv2d.cuh", tmp_path)
    assert done.returncode != 0
    assert "no_such_field" in done.stderr


# ----------------------------------------------------------------------------- CPU emulation of the kernel
_EMULATOR = r"""
// Runs csrc/cuda/channel_skip_conv2d.cuh on the CPU: one std::thread per CUDA thread, a std::barrier per block
// for __syncthreads, warp ballots through the barrier, and WMMA fragments emulated by lane 0 of each warp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <thread>
#include <vector>

#undef __shared__
#define __shared__ static  // one copy for all threads of the (sequentially run) blocks
#define __launch_bounds__(...)

namespace emu {
thread_local uint3 thread_idx, block_idx;
std::barrier<>* block_barrier = nullptr;
std::atomic<int> count_acc{0};
std::atomic<unsigned> ballots[32];
}  // namespace emu
#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline int __syncthreads_count(int pred) {
  if (pred) emu::count_acc.fetch_add(1);
  __syncthreads();
  const int total = emu::count_acc.load();
  __syncthreads();
  if (threadIdx.x == 0) emu::count_acc.store(0);
  __syncthreads();
  return total;
}
inline unsigned __ballot_sync(unsigned, int pred) {
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (pred) emu::ballots[warp].fetch_or(1u << lane);
  __syncthreads();
  const unsigned bits = emu::ballots[warp].load();
  __syncthreads();
  if (lane == 0) emu::ballots[warp].store(0);
  __syncthreads();
  return bits;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
inline float as_float(float v) { return v; }
inline float as_float(__half v) { return __half2float(v); }
inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }
// The warp's whole 16x16 tile, held (and computed) by lane 0 only: each collective runs once per warp.
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float v[16][16];
};
inline bool leader() { return threadIdx.x % 32 == 0; }
template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  if (!leader()) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.v[r][c] = as_float(std::is_same<Layout, col_major>::value ? p[c * ldm + r] : p[r * ldm + c]);
}
template <typename T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, float v) {
  for (auto& row : f.v)
    for (float& e : row) e = v;
}
template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  if (!leader()) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i][j];
      for (int k = 0; k < 16; ++k) s += a.v[i][k] * b.v[k][j];
      d.v[i][j] = s;
    }
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  if (!leader()) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.v[r][c];
}
}  // namespace wmma
}  // namespace nvcuda

#include "cuda/channel_skip_conv2d.cuh"

namespace cs = sparsekern::channel_skip;

void run_grid(unsigned gx, unsigned gy, const std::function<void()>& body) {
  for (unsigned by = 0; by < gy; ++by)
    for (unsigned bx = 0; bx < gx; ++bx) {
      std::barrier<> barrier(cs::kThreads);
      emu::block_barrier = &barrier;
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < unsigned(cs::kThreads); ++t)
        threads.emplace_back([&, t] {
          threadIdx = uint3{t, 0, 0};
          blockIdx = uint3{bx, by, 0};
          body();
        });
      for (auto& th : threads) th.join();
    }
}

template <typename T>
T from_f(float v);
template <>
float from_f<float>(float v) { return v; }
template <>
__half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
std::vector<T> read_as(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  const size_t n = size_t(in.tellg()) / sizeof(float);
  in.seekg(0);
  std::vector<float> raw(n);
  in.read(reinterpret_cast<char*>(raw.data()), n * sizeof(float));
  std::vector<T> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = from_f<T>(raw[i]);
  return out;
}

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  std::vector<uint8_t> out(size_t(in.tellg()));
  in.seekg(0);
  in.read(reinterpret_cast<char*>(out.data()), out.size());
  return out;
}

// dir/params.txt: dtype(0 f32, 1 f16, 2 bf16) B C_in C_out H W kh kw H_out W_out sh sw ph pw dh dw relu has_bias
//                 has_in_mask has_out_mask, x strides (4), weight strides (4)
// dir/{x,weight,bias}.bin: float32 storage; dir/{in_mask,out_mask}.bin: (B, C) bytes. Writes dir/y.bin (float32,
// contiguous output; never-written elements keep a NaN sentinel) and dir/lists.bin (int32).
template <typename T>
int run(const std::string& dir, const std::vector<long long>& v) {
  const int B = v[1], c_in = v[2], c_out = v[3];
  std::vector<T> x = read_as<T>(dir + "/x.bin"), weight = read_as<T>(dir + "/weight.bin");
  std::vector<T> bias = v[17] ? read_as<T>(dir + "/bias.bin") : std::vector<T>();
  std::vector<uint8_t> in_mask = v[18] ? read_bytes(dir + "/in_mask.bin") : std::vector<uint8_t>();
  std::vector<uint8_t> out_mask = v[19] ? read_bytes(dir + "/out_mask.bin") : std::vector<uint8_t>();
  const long long lists_stride = c_in + c_out + 2;
  std::vector<int32_t> lists(size_t(B) * lists_stride, -7);
  cs::ListParams lp{};
  lp.in_mask = v[18] ? in_mask.data() : nullptr;
  lp.out_mask = v[19] ? out_mask.data() : nullptr;
  lp.in_sb = c_in, lp.in_sc = 1, lp.out_sb = c_out, lp.out_sc = 1;
  lp.lists = lists.data();
  lp.lists_stride = lists_stride;
  lp.batch = B, lp.c_in = c_in, lp.c_out = c_out;
  run_grid(B, 2, [&] { cs::build_channel_lists_kernel(lp); });

  cs::ConvParams<T> p{};
  const int h_out = v[8], w_out = v[9];
  std::vector<T> y(size_t(B) * c_out * h_out * w_out, from_f<T>(NAN));
  p.x = x.data(), p.weight = weight.data(), p.bias = v[17] ? bias.data() : nullptr, p.lists = lists.data();
  p.y = y.data();
  p.batch = B, p.c_in = c_in, p.c_out = c_out, p.h = v[4], p.w = v[5], p.kh = v[6], p.kw = v[7];
  p.h_out = h_out, p.w_out = w_out, p.stride_h = v[10], p.stride_w = v[11], p.pad_h = v[12], p.pad_w = v[13];
  p.dil_h = v[14], p.dil_w = v[15], p.relu = v[16] != 0;
  p.x_sb = v[20], p.x_sc = v[21], p.x_sh = v[22], p.x_sw = v[23];
  p.w_so = v[24], p.w_sc = v[25], p.w_sh = v[26], p.w_sw = v[27];
  p.lists_stride = lists_stride;
  const int m_total = h_out * w_out;
  const unsigned tiles = ((m_total + cs::kBM - 1) / cs::kBM) * ((c_out + cs::kBN - 1) / cs::kBN);
  run_grid(tiles, B, [&] { cs::channel_skip_conv2d_kernel<T>(p); });

  std::vector<float> yf(y.size());
  for (size_t i = 0; i < y.size(); ++i) yf[i] = nvcuda::wmma::as_float(y[i]);
  std::ofstream(dir + "/y.bin", std::ios::binary).write(reinterpret_cast<const char*>(yf.data()), yf.size() * 4);
  std::ofstream(dir + "/lists.bin", std::ios::binary)
      .write(reinterpret_cast<const char*>(lists.data()), lists.size() * 4);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const std::string dir = argv[1];
  std::ifstream in(dir + "/params.txt");
  std::vector<long long> v;
  for (long long e; in >> e;) v.push_back(e);
  if (v.size() != 28) return 3;
  switch (v[0]) {
    case 0: return run<float>(dir, v);
    case 1: return run<__half>(dir, v);
    case 2: return run<__nv_bfloat16>(dir, v);
  }
  return 4;
}
"""

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _cuda_include_dir() -> str | None:
    if NVCC is None:
        return None
    dry = subprocess.run([NVCC, "--dryrun", "-x", "cu", "-c", "/dev/null", "-o", "/dev/null"], capture_output=True,
                         text=True).stderr
    found = re.search(r'INCLUDES="-I([^"]+)"', dry)
    return found.group(1).strip() if found else None


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    include = _cuda_include_dir()
    if GXX is None or include is None:
        pytest.skip("needs g++ and the CUDA headers (found through nvcc)")
    work = tmp_path_factory.mktemp("emulator")
    (work / "emulator.cpp").write_text(_EMULATOR)
    exe = work / "emulator"
    cmd = [GXX, "-std=c++20", "-O1", "-pthread", "-DSPARSEKERN_CSK_WMMA=1", f"-I{include}", f"-I{csrc_dir()}",
           str(work / "emulator.cpp"), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the emulator does not compile:\n{done.stderr}"
    return exe


def _storage(t: torch.Tensor) -> bytes:
    """The tensor's memory in address order (its strides then index it), as float32."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(*order).contiguous().float().numpy().tobytes()


def _run_emulated(exe: Path, work: Path, x, weight, bias, in_mask, out_mask, stride, padding, dilation, relu):
    b, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    (work / "x.bin").write_bytes(_storage(x))
    (work / "weight.bin").write_bytes(_storage(weight))
    if bias is not None:
        (work / "bias.bin").write_bytes(bias.float().numpy().tobytes())
    for name, mask in (("in_mask", in_mask), ("out_mask", out_mask)):
        if mask is not None:
            (work / f"{name}.bin").write_bytes(mask.numpy().astype(np.uint8).tobytes())
    params = [_DTYPES[x.dtype], b, c_in, c_out, h, w, kh, kw, h_out, w_out, *stride, *padding, *dilation, int(relu),
              int(bias is not None), int(in_mask is not None), int(out_mask is not None), *x.stride(),
              *weight.stride()]
    (work / "params.txt").write_text(" ".join(map(str, params)))
    done = subprocess.run([str(exe), str(work)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"emulated kernel failed ({done.returncode}): {done.stderr}"
    y = torch.from_numpy(np.fromfile(work / "y.bin", dtype=np.float32)).view(b, c_out, h_out, w_out)
    lists = torch.from_numpy(np.fromfile(work / "lists.bin", dtype=np.int32)).view(b, c_in + c_out + 2)
    return y, lists


EMULATED = {
    # name: (b, c_in, c_out, h, w, kernel, stride, padding, dilation, relu, bias, channels_last)
    "3x3_two_tiles_each_way": (2, 40, 72, 13, 11, (3, 3), (1, 1), (1, 1), (1, 1), True, True, False),
    "1x1_stride2_channels_last": (2, 48, 40, 9, 9, (1, 1), (2, 2), (0, 0), (1, 1), False, True, True),
    "dilated_rect_no_bias": (1, 20, 24, 10, 12, (3, 1), (1, 2), (2, 0), (2, 1), False, False, False),
}


@pytest.mark.parametrize("dtype", list(_DTYPES), ids=["fp32_fma", "fp16_wmma", "bf16_wmma"])
@pytest.mark.parametrize("name", list(EMULATED))
def test_emulated_cuda_kernel_matches_reference(emulator: Path, tmp_path: Path, name: str,
                                                dtype: torch.dtype) -> None:
    b, c_in, c_out, h, w, k, stride, padding, dilation, relu, has_bias, channels_last = EMULATED[name]
    g = torch.Generator().manual_seed(len(name))
    x = torch.randn(b, c_in, h, w, generator=g).to(dtype)
    weight = (torch.randn(c_out, c_in, *k, generator=g) / (c_in * k[0] * k[1]) ** 0.5).to(dtype)
    bias = torch.randn(c_out, generator=g).to(dtype) if has_bias else None
    in_mask = torch.rand(b, c_in, generator=g) < 0.5
    out_mask = torch.rand(b, c_out, generator=g) < 0.5
    if b > 1:
        in_mask[1] = False  # a sample with no active input: bias only
        out_mask[0, :64] = False  # a whole 64-channel tile of zeros, then active channels
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        weight = weight.to(memory_format=torch.channels_last)
    poisoned = x.clone()
    poisoned[~in_mask] = float("nan")  # masked-off inputs must never be read
    args = (stride, padding, dilation, relu)
    y, lists = _run_emulated(emulator, tmp_path, poisoned, weight, bias, in_mask, out_mask, *args)
    ref = reference.channel_skip_conv2d(x, weight, bias, in_mask, out_mask, *args).float()

    assert not torch.isnan(y).any(), "an output element was never written or read a masked-off input"
    assert (y[~out_mask] == 0).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (y - ref).abs().max() <= tol * ref.abs().max()
    for mask, perm, count in ((in_mask, lists[:, :c_in], lists[:, -2]), (out_mask, lists[:, c_in:-2], lists[:, -1])):
        assert torch.equal(perm.long(), torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices)
        assert torch.equal(count.long(), mask.sum(1))
