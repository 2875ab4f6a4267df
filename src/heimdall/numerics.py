"""Pin the CPU numerics so that every pipeline output is bitwise the same on any x86-64 CPU with AVX2.

numpy, OpenBLAS (numpy's and scipy's), ATen, MKL (inside torch) and oneDNN (inside torch) each
pick their kernels at run time from the CPU's SIMD level. An AVX-512 kernel and an AVX2 kernel round
differently (another reduction order, another exp/log polynomial), so a machine with AVX-512 and one
without produce different sessions.h5 / features.h5 / model.ckpt / test.json. Each library has an
environment variable that caps its dispatch; all of them are read once, when the library is loaded
or first used. ``pin_cpu_numerics()`` therefore has to run before numpy, scipy or torch is imported
(first thing in the CLI entry point). It uses ``setdefault``: a value already in the environment wins,
so a user can still override any pin (and ``describe()`` reports the effective values).

Measured on a 2-core Xeon with AVX-512 (Sapphire-Rapids class, KVM), with 600 sessions and a
3-epoch train (docs/reproducibility.md has the full table and how to rerun it). "AVX2-only CPU" was
emulated by capping every library's dispatch (the knobs below, plus MKL_ENABLE_INSTRUCTIONS=AVX2 and
GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX512F,...):

* unpinned, AVX-512 vs AVX2-only CPU: sessions.h5 differs (tx_latitude/longitude_deg, 2 of 18
  datasets, max 7e-15 deg, from numpy's AVX-512 arctan2/sin/cos), features.h5 differs (logmel_db,
  5 % of values, max 6.1e-5 dB, from MKL's AVX-512 FFT and vector-math paths), model.ckpt differs
  (59 of 96 tensors, max 3.7e-4 to 1.1e-3) and test.json differs (17 of 41 values, rel 8.6e-7);
* which knob matters where: NPY_DISABLE_CPU_FEATURES -> sessions.h5 and test.json; MKL_CBWR ->
  features.h5, model.ckpt, test.json; ONEDNN_MAX_CPU_ISA -> model.ckpt, test.json;
  ATEN_CPU_CAPABILITY -> test.json (softmax, rel 3.7e-7); OPENBLAS_CORETYPE -> test.json (GP radio
  map, rel 3.8e-16); glibc's libm dispatch: no effect (its variants are FMA/AVX2, none AVX-512);
* pinned (the values below): AVX-512 CPU == emulated AVX2-only CPU (pinned or not) for all four
  outputs, bitwise, and for 46 op-level probes (numpy ufuncs, BLAS/LAPACK, torch stft, conv, sdpa,
  20 AdamW steps);
* threads: 1 vs 2 intra-op threads changes model.ckpt (ATen sum, oneDNN conv weight-gradient) and
  OpenBLAS gemm/cholesky results; 2 vs 4 was identical for the pipeline but is not guaranteed in
  general. So the thread count is pinned too, to a constant (never "number of cores").
  torch clamps OMP_NUM_THREADS/MKL_NUM_THREADS to the number of cores at start-up, so 1 is the only
  value that an environment variable alone can guarantee on every machine.
* cost: see _COST below.

onnxruntime has no knob for its MLAS kernels (AVX-512 / AVX2 / AVX-VNNI are chosen from CPUID), so
ORT outputs (models/metrics/onnx.json's max_abs_diff, heimdall predict) can still differ at float32
rounding level across CPUs; none of the md5-tracked outputs depends on ORT arithmetic (measured:
model.onnx is identical pinned vs unpinned).

This module imports nothing heavy at module level: importing it must not load numpy or torch.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping, MutableMapping

# SIMD pins: cap every library at the AVX2 (x86-64-v3) level, the widest level that every CPU we
# run on has. Values are the libraries' own spellings.
CPU_PINS: dict[str, str] = {
    # numpy 2.4 dispatch targets on x86-64 are X86_V3, X86_V4, AVX512_ICL, AVX512_SPR (show_runtime);
    # disabling the last three leaves X86_V3 (= AVX2 + FMA3). Old names (AVX512F, AVX512_SKX) are
    # ignored by numpy >= 2.4 with only an ImportWarning, hence the new ones.
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
    # numpy's and scipy's bundled scipy-openblas (DYNAMIC_ARCH) both honour it: Haswell = AVX2 kernels.
    "OPENBLAS_CORETYPE": "Haswell",
    # torch's own vectorised kernels (Sleef math, softmax, reductions): default | avx2 | avx512.
    "ATEN_CPU_CAPABILITY": "avx2",
    # MKL inside torch (sgemm, the FFT behind stft, vector math for exp/log10/tanh): conditional
    # numerical reproducibility. COMPATIBLE (an SSE2 path without rcpps/rsqrtps) is the only branch
    # Intel documents as identical on Intel *and* non-Intel CPUs; every other branch (AVX2, ...) is
    # honoured on Intel CPUs only and silently falls back to AUTO elsewhere, e.g. on the AMD EPYC
    # 2-core runners that are the typical "AVX2 without AVX-512" machine. Set MKL_CBWR=AVX2 to trade
    # that for speed when every machine is Intel (cost numbers in the module docstring).
    "MKL_CBWR": "COMPATIBLE",
    # oneDNN inside torch (convolutions, GELU): JIT kernels no wider than AVX2 (also caps AVX2-VNNI/AMX).
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}

# Thread pins: a fixed count, never derived from the machine. 1 is the only count torch cannot clamp.
THREAD_PINS: dict[str, str] = {
    "OMP_NUM_THREADS": "1",       # torch intra-op threads, oneDNN, libgomp
    "MKL_NUM_THREADS": "1",       # MKL (torch also takes its intra-op default from it)
    "OPENBLAS_NUM_THREADS": "1",  # numpy's and scipy's OpenBLAS
}

PINS: dict[str, str] = {**CPU_PINS, **THREAD_PINS}

# Older spellings the libraries still read: if the user set one, do not shadow it with our pin.
_ALIASES: dict[str, tuple[str, ...]] = {"ONEDNN_MAX_CPU_ISA": ("DNNL_MAX_CPU_ISA",)}

# Libraries that read the variables above when they are loaded / first used.
_READERS = ("numpy", "scipy", "torch", "torchaudio", "onnxruntime")

_late_imports: list[str] = []


def pin_cpu_numerics(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set the CPU-numerics pins in ``environ`` unless already set; return the effective values.

    Call before numpy, scipy or torch is imported: they read these variables once. If one of them is
    already imported (into this process, when ``environ`` is ``os.environ``) a RuntimeWarning names it:
    its pins then only reach child processes.
    """
    if environ is os.environ:
        late = [m for m in _READERS if m in sys.modules]
        _late_imports[:] = late
        if late:
            warnings.warn(f"pin_cpu_numerics: {', '.join(late)} already imported; their CPU pins apply "
                          "only to child processes", RuntimeWarning, stacklevel=2)
    effective: dict[str, str] = {}
    for name, value in PINS.items():
        alias = next((a for a in _ALIASES.get(name, ()) if a in environ), None)
        if alias is not None and name not in environ:
            effective[alias] = environ[alias]
            continue
        effective[name] = environ.setdefault(name, value)
    return effective


def _cpu_model() -> dict[str, str]:
    info = {"cpu_count": str(os.cpu_count())}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return info
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # first processor block only
        key, _, val = line.partition(":")
        fields[key.strip()] = val.strip()
    flags = set(fields.get("flags", "").split())
    info["cpu_model"] = fields.get("model name", "")
    info["cpu_vendor"] = fields.get("vendor_id", "")
    info["cpu_simd"] = ("avx512" if "avx512f" in flags else "avx2" if "avx2" in flags and "fma" in flags
                        else "below-avx2")
    return info


def describe(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The effective numerics settings as flat ``{name: str}`` (ready for ``mlflow.log_params``).

    Environment values of every pin ("" when unset), whether they all equal the pins, the CPU, and for
    each library already imported (never imports one itself) what it actually dispatches to.
    """
    out: dict[str, str] = {f"numerics.env.{k}": environ.get(k, "") for k in PINS}
    for aliases in _ALIASES.values():
        for a in aliases:
            if a in environ:
                out[f"numerics.env.{a}"] = environ[a]
    out["numerics.pinned"] = str(all(environ.get(k) == v for k, v in PINS.items())).lower()
    out["numerics.late_imports"] = ",".join(_late_imports)
    out.update({f"numerics.{k}": v for k, v in _cpu_model().items()})

    if "numpy" in sys.modules:
        try:
            np = sys.modules["numpy"]
            from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

            out["numerics.numpy"] = np.__version__
            out["numerics.numpy_simd"] = " ".join(f for f in __cpu_dispatch__ if __cpu_features__.get(f))
        except Exception as e:  # private API: report, never fail the run over a log line
            out["numerics.numpy_simd"] = f"unknown ({type(e).__name__})"
    if "numpy" in sys.modules or "scipy" in sys.modules:
        try:
            from threadpoolctl import threadpool_info

            for i, pool in enumerate(p for p in threadpool_info() if p.get("internal_api") == "openblas"):
                lib = os.path.basename(pool.get("filepath", "")).split("-")[0] or f"openblas{i}"
                out[f"numerics.{lib}"] = f"{pool.get('architecture')} threads={pool.get('num_threads')}"
        except Exception as e:
            out["numerics.openblas"] = f"unknown ({type(e).__name__})"
    if "torch" in sys.modules:
        try:
            torch = sys.modules["torch"]
            out["numerics.torch"] = torch.__version__
            out["numerics.torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
            out["numerics.torch_threads"] = str(torch.get_num_threads())
        except Exception as e:
            out["numerics.torch_cpu_capability"] = f"unknown ({type(e).__name__})"
    if "onnxruntime" in sys.modules:
        out["numerics.onnxruntime"] = getattr(sys.modules["onnxruntime"], "__version__", "")
    return out
