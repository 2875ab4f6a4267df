"""Pin the CPU numerics so that every pipeline output is bitwise the same on any x86-64 CPU with AVX2.

numpy, OpenBLAS (numpy's and scipy's copies), ATen, MKL (inside torch) and oneDNN (inside torch) each
choose their kernels at run time from the CPU's SIMD level and the thread count. An AVX-512 kernel and
an AVX2 kernel round differently (another reduction order, another exp/log polynomial), so a machine
with AVX-512 and one without write different sessions.h5, features.h5, model.ckpt, metrics and plots.
Each library has an environment variable that caps its dispatch, read once, when the library is loaded
or first used: ``pin_cpu_numerics()`` must run before numpy, scipy or torch is imported (first thing
in the CLI entry point). It only ``setdefault``s: a value already in the environment wins, so a user
can override any pin, and ``describe()`` reports what is in effect (log it with the run).

Measured (docs/reproducibility.md has the tables and the recipe). A 2-core Xeon with AVX-512, numpy
2.4.6, scipy 1.17.1, torch 2.14.1 (MKL 2024.2, oneDNN 3.12), 600 sessions, 3 epochs. An "AVX2-only
CPU" was emulated by capping every library's dispatch (these knobs plus MKL_ENABLE_INSTRUCTIONS=AVX2
and GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX512F,...):

* Unpinned, AVX-512 vs AVX2-only, all md5s differ:
  - sessions.h5: tx_latitude/longitude_deg, max 7e-15 deg. Cause: numpy's AVX-512 arctan2.
  - features.h5: logmel_db, 5 % of values, max 6e-5 dB. Cause: MKL's FFT and vector math.
  - model.ckpt: 59 of 96 tensors, up to 4e-4.
  - test.json: 17 of 41 values, rel <= 9e-7.
* Per knob: NPY_DISABLE_CPU_FEATURES changes sessions.h5, features.h5 and test.json. MKL_CBWR
  changes features.h5, model.ckpt and test.json. ONEDNN_MAX_CPU_ISA changes model.ckpt and
  test.json. ATEN_CPU_CAPABILITY changes test.json (softmax). OPENBLAS_CORETYPE changes test.json
  (GP radio map, rel 4e-16). glibc's libm dispatch changes nothing.
* Pinned as below, the AVX-512 CPU equals the emulated AVX2-only CPU, bitwise, on every md5-tracked
  output, also with a 1-core affinity (taskset). The same holds for 46 op-level probes.
* Every change in thread count (1, 2, 3, 4) changed the training result. Causes: ATen's parallel sum,
  the conv weight gradient, MKL sgemm, OpenBLAS gemm/potrf. So the count is pinned to a constant.
  torch clamps OMP_NUM_THREADS/MKL_NUM_THREADS to the core count at start-up. So 1 is the only value
  an environment variable can guarantee everywhere. It also avoids the busy-wait collapse of 2
  threads on a shared 2-core machine (4-14x slower with one other busy process).
* Cost on an idle machine, wall time, vs today's default (AVX-512, 2 threads):
  - train, 3000 sessions x 5 epochs: 117-122 s vs 69-77 s. At 2 threads: 81 s.
  - extract_features, 3000 sessions: about 7.1 s vs 4.3 s.
  - export_sessions: unchanged.
  The SIMD pins cost 10-30 %. MKL_CBWR=COMPATIBLE costs 15-35 % more than AVX2 on the MKL-heavy
  parts. The rest is the second thread.

onnxruntime has no such knob: MLAS picks AVX-512/AVX2 kernels from CPUID. ORT-computed numbers
(onnx.json's parity, ``heimdall predict``) can still differ in their last bits across CPUs. model.onnx
is made by torch, and was identical pinned on AVX-512 vs emulated AVX2.

Nothing heavy is imported here, at module level or by ``pin_cpu_numerics``. ``describe`` reads only
libraries that are already imported.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping, MutableMapping

# SIMD pins: cap every library at AVX2 + FMA (x86-64-v3), the widest level that every CPU in use has.
# Values are in each library's own spelling.
CPU_PINS: dict[str, str] = {
    # numpy 2.4's x86-64 dispatch targets: X86_V3, X86_V4, AVX512_ICL, AVX512_SPR (numpy.show_runtime()).
    # Disabling the last three leaves X86_V3 (AVX2 + FMA3). Unknown names (e.g. the pre-2.4 AVX512F,
    # AVX512_SKX) are ignored with only an ImportWarning, so keep these in step with the pinned numpy.
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
    # Both numpy's and scipy's bundled scipy-openblas (DYNAMIC_ARCH) read it. Haswell = AVX2 kernels.
    "OPENBLAS_CORETYPE": "Haswell",
    # torch's own vectorised kernels (Sleef math, softmax, reductions): default | avx2 | avx512.
    "ATEN_CPU_CAPABILITY": "avx2",
    # MKL inside torch does the sgemm, the FFT behind stft, and exp/log10/tanh. MKL_CBWR turns on
    # conditional numerical reproducibility. COMPATIBLE is an SSE2 path without rcpps/rsqrtps. It is
    # the only branch Intel documents as identical on Intel *and* non-Intel CPUs. The other branches
    # (AVX2, ...) apply on Intel CPUs only; elsewhere MKL silently uses AUTO. That includes the AMD EPYC
    # 2-core runners, the typical "AVX2 without AVX-512" machine. If every machine is Intel, MKL_CBWR=AVX2
    # is 15-35 % faster on the MKL-heavy parts.
    "MKL_CBWR": "COMPATIBLE",
    # oneDNN inside torch (the ops torch routes to it, GELU among them): JIT kernels no wider than
    # AVX2 (also rules out AVX2-VNNI, AVX-512 and AMX).
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}

# Thread pins: a constant, never derived from the machine. torch cannot clamp 1.
THREAD_PINS: dict[str, str] = {
    "OMP_NUM_THREADS": "1",       # torch intra-op threads, oneDNN, libgomp
    "MKL_NUM_THREADS": "1",       # MKL; torch also takes its intra-op default from it
    "OPENBLAS_NUM_THREADS": "1",  # numpy's and scipy's OpenBLAS
}

PINS: dict[str, str] = {**CPU_PINS, **THREAD_PINS}

# Older spellings the libraries still read. If the user set one, do not shadow it with the new name.
_ALIASES: dict[str, tuple[str, ...]] = {"ONEDNN_MAX_CPU_ISA": ("DNNL_MAX_CPU_ISA",)}

# Libraries that read the variables above when loaded or first used.
_READERS = ("numpy", "scipy", "torch", "torchaudio", "onnxruntime")

_late_imports: list[str] = []


def loaded_readers() -> list[str]:
    """The libraries that read the pins and are already imported into this process."""
    return [m for m in _READERS if m in sys.modules]


def pin_cpu_numerics(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set each pin in ``environ`` unless it is already set. Return ``{name: effective value}``.

    Call it before numpy, scipy or torch is imported: they read these variables once. If one is already
    imported into this process (checked when ``environ`` is ``os.environ``), a RuntimeWarning names it.
    Its pins then reach only child processes.
    """
    if environ is os.environ:
        late = loaded_readers()
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


def _cpu() -> dict[str, str]:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    info = {"cpu_count": str(usable)}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return info
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, val = line.partition(":")
        fields[key.strip()] = val.strip()
    flags = set(fields.get("flags", "").split())
    info["cpu_model"] = fields.get("model name", "")
    info["cpu_vendor"] = fields.get("vendor_id", "")
    info["cpu_simd"] = ("avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags
                        else "below-avx2 (unsupported: results will differ)")
    return info


def describe(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The effective numerics settings as a flat ``{name: str}``, ready for ``mlflow.log_params``.

    It reports each pin's environment value ("" when unset) and whether all of them equal the pins.
    It reports the CPU. For each library already imported, it reports what that library actually
    dispatches to. It never imports a library itself.
    """
    out: dict[str, str] = {f"numerics.env.{k}": environ.get(k, "") for k in PINS}
    for aliases in _ALIASES.values():
        for a in aliases:
            if a in environ:
                out[f"numerics.env.{a}"] = environ[a]
    out["numerics.pinned"] = str(all(environ.get(k) == v for k, v in PINS.items())).lower()
    out["numerics.late_imports"] = ",".join(_late_imports)
    out.update({f"numerics.{k}": v for k, v in _cpu().items()})

    if "numpy" in sys.modules:
        try:
            out["numerics.numpy"] = sys.modules["numpy"].__version__
            from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

            out["numerics.numpy_simd"] = " ".join(f for f in __cpu_dispatch__ if __cpu_features__.get(f))
        except Exception as e:  # noqa: BLE001 - private numpy API: report it, never fail a run over a log line
            out["numerics.numpy_simd"] = f"unknown ({type(e).__name__})"
    if "numpy" in sys.modules or "scipy" in sys.modules:
        try:
            from threadpoolctl import threadpool_info

            for i, pool in enumerate(p for p in threadpool_info() if p.get("internal_api") == "openblas"):
                lib = os.path.basename(pool.get("filepath", "")).split("-")[0] or f"openblas{i}"
                out[f"numerics.{lib}"] = f"{pool.get('architecture')} threads={pool.get('num_threads')}"
        except Exception as e:  # noqa: BLE001 - a log line must never fail the run
            out["numerics.openblas"] = f"unknown ({type(e).__name__})"
    if "torch" in sys.modules:
        try:
            torch = sys.modules["torch"]
            out["numerics.torch"] = torch.__version__
            out["numerics.torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
            out["numerics.torch_threads"] = str(torch.get_num_threads())
        except Exception as e:  # noqa: BLE001 - a log line must never fail the run
            out["numerics.torch_cpu_capability"] = f"unknown ({type(e).__name__})"
    if "onnxruntime" in sys.modules:
        out["numerics.onnxruntime"] = getattr(sys.modules["onnxruntime"], "__version__", "")
    return out
