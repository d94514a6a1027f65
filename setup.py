"""Build robustops: the C++ ops always, the CUDA kernels when they can (or must) be compiled.

Environment:
  ROBUSTOPS_CPU_ONLY=1     never compile the CUDA kernels
  FORCE_CUDA=1             compile them even without a visible GPU (needs nvcc, CUDA_HOME)
  TORCH_CUDA_ARCH_LIST     architectures to compile for; without it and without a visible GPU the
                           default below is used (Ampere and Hopper, with PTX for newer GPUs)
  MAX_JOBS                 parallel compile jobs (ninja)
  ROBUSTOPS_NO_EXT=1       register the package (pip install -e .) without compiling: `make build`
                           compiles in place with build_ext --inplace, then installs this way so that
                           the `robustops` command and imports from anywhere use the checkout
"""
import glob
import os
import sys
import sysconfig

from setuptools import find_packages, setup

import torch
import torch.utils.cpp_extension as cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
ROOT = os.path.dirname(os.path.abspath(__file__))


def env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def pip_cuda_include():
    """The headers of the pip-installed CUDA packages (nvidia/cu13/include), if present."""
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    roots.update(p for p in sys.path if p.endswith("site-packages"))
    for root in sorted(roots):
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "cu*", "include")), reverse=True):
            if os.path.exists(os.path.join(inc, "cublas_v2.h")):
                return inc
    return None


def nvcc_version(cuda_home):
    import re
    import subprocess

    try:
        out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def toolkit_problem(home):
    """Why `home` cannot build and link the CUDA kernels (None when it can): nvcc, the runtime
    headers and the runtime library must all be there."""
    if not home:
        return "no CUDA toolkit found (set CUDA_HOME)"
    if nvcc_version(home) is None:
        return f"no working nvcc in {home}/bin"
    if not os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        return f"no CUDA headers (include/cuda_runtime.h) in {home}"
    if not any(os.path.exists(os.path.join(home, d, "libcudart.so")) for d in ("lib64", "lib")):
        return f"no CUDA runtime library (lib64/libcudart.so) in {home}"
    return None


def find_toolkit():
    """(CUDA_HOME to use, why not, if none): $CUDA_HOME when set; else torch's guess (which is
    /usr/local when nvcc is /usr/local/bin/nvcc), the toolkit nvcc's real path lives in, and
    /usr/local/cuda, the first complete one."""
    if os.environ.get("CUDA_HOME"):
        home = os.environ["CUDA_HOME"]
        return (home, None) if toolkit_problem(home) is None else (None, toolkit_problem(home) + " ($CUDA_HOME)")
    candidates = [cpp_extension.CUDA_HOME]
    import shutil

    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    first_problem = None
    for home in candidates:
        problem = toolkit_problem(home)
        if problem is None:
            return home, None
        first_problem = first_problem or problem
    return None, first_problem


def resolve():
    cpu_only = env_flag("ROBUSTOPS_CPU_ONLY")
    force = env_flag("FORCE_CUDA")
    torch_cuda = torch.version.cuda
    home, problem = (None, "ROBUSTOPS_CPU_ONLY=1") if cpu_only else find_toolkit()
    nvcc = nvcc_version(home) if home else None
    if cpu_only:
        with_cuda, why = False, "ROBUSTOPS_CPU_ONLY=1"
    elif force:
        if home is None:
            sys.exit(f"robustops: FORCE_CUDA=1 but {problem}; set CUDA_HOME to a complete CUDA toolkit")
        with_cuda, why = True, "FORCE_CUDA=1"
    elif torch_cuda is None:
        with_cuda, why = False, "torch is a CPU build"
    elif home is None:
        with_cuda, why = False, problem
        print(f"robustops: building the CPU kernels only: {problem}. Set CUDA_HOME to a complete toolkit (nvcc, "
              f"include/cuda_runtime.h, lib64/libcudart.so) or FORCE_CUDA=1 to insist.", flush=True)
    else:
        with_cuda, why = True, "torch is a CUDA build and a complete CUDA toolkit was found"
    if with_cuda:
        cpp_extension.CUDA_HOME = home  # what CUDAExtension compiles and links against
        os.environ["CUDA_HOME"] = home
    if with_cuda and torch_cuda and nvcc and nvcc.split(".")[0] != torch_cuda.split(".")[0]:
        sys.exit(f"robustops: nvcc {nvcc} and torch's CUDA {torch_cuda} differ in major version; "
                 "point CUDA_HOME at a matching toolkit")
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if with_cuda and not archs:
        if torch.cuda.is_available():
            archs = ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                                     for i in range(torch.cuda.device_count())}))
        else:
            archs = DEFAULT_ARCH_LIST
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return with_cuda, why, archs or "", nvcc or ""


def cpu_flags():
    """AVX2 + FMA for the CPU kernels (at::vec then uses 256-bit vectors) when the build machine
    has them, unless ROBUSTOPS_PORTABLE=1 asks for a baseline x86-64 binary."""
    if env_flag("ROBUSTOPS_PORTABLE"):
        return [], "baseline (ROBUSTOPS_PORTABLE=1)"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if {"avx2", "fma", "f16c"} <= set(flags):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2",
                '-DROBUSTOPS_CPU_CAPABILITY="avx2"'], "avx2"
    return [], "baseline (no AVX2 on the build machine)"


def extensions():
    with_cuda, why, archs, nvcc = resolve()
    vec_flags, vec_why = cpu_flags()
    sources = ["csrc/robustops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    define = []
    # -ffp-contract=off: g++ (even with -std=c++20) fuses any a*b + c into an FMA under -mfma, wherever
    # inlining and vectorisation put one, so the CPU scalar emulation (ROBUSTOPS_CPU_SCALAR=1) could
    # round unlike the device it stands in for. Off, the host fuses exactly the fmaf the shared RO_HD
    # formulas write; nvcc fuses those and any plain a*b + c too (--fmad=true), so every multiply-add
    # in code the device runs must be written fmaf for the CPU to round alike.
    cxx = ["-O3", "-fopenmp", "-std=c++20", "-ffp-contract=off"] + vec_flags
    include_dirs = [os.path.join(ROOT, "csrc")]
    cuda_inc = None
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define += [("ROBUSTOPS_WITH_CUDA", None),
                   ("ROBUSTOPS_CUDA_ARCHS", '"%s"' % archs),
                   ("ROBUSTOPS_CUDA_VERSION", '"%s"' % nvcc)]
        # torch's headers include cusparse.h / cublas_v2.h, which a bare toolkit may lack.
        if not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "include", "cublas_v2.h")):
            cuda_inc = pip_cuda_include()
            if cuda_inc is None:
                sys.exit("robustops: the CUDA toolkit lacks cublas_v2.h and no pip CUDA headers "
                         "(site-packages/nvidia/cu*/include) were found; pip install nvidia-cublas")
            include_dirs.append(cuda_inc)
    print("robustops build configuration:\n"
          f"  torch          {torch.__version__} (CUDA {torch.version.cuda})\n"
          f"  CUDA kernels   {'yes' if with_cuda else 'no'} ({why})\n"
          f"  CUDA_HOME      {cpp_extension.CUDA_HOME if with_cuda else '-'} (nvcc {nvcc or '-'})\n"
          f"  arch list      {archs or '-'}\n"
          f"  CPU vectors    {vec_why}\n"
          f"  extra includes {cuda_inc or '-'}\n"
          f"  MAX_JOBS       {os.environ.get('MAX_JOBS', '-')}", flush=True)
    common = dict(name="robustops._C", sources=sources, include_dirs=include_dirs,
                  define_macros=define, extra_link_args=["-fopenmp"])
    if with_cuda:
        nvcc_flags = ["-O3", "-lineinfo", "-std=c++20", "--expt-relaxed-constexpr"]
        return [CUDAExtension(**common, extra_compile_args={"cxx": cxx, "nvcc": nvcc_flags})]
    return [CppExtension(**common, extra_compile_args={"cxx": cxx})]


setup(
    name="robustops",
    version="0.1.0",
    description="Fused C++/CUDA kernels for adversarial attacks, adversarial training and "
                "randomized-smoothing certification in PyTorch",
    packages=find_packages(include=["robustops", "robustops.*"]),
    package_data={"robustops": ["_data/*.npz"]},
    ext_modules=[] if env_flag("ROBUSTOPS_NO_EXT") else extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["robustops=robustops.cli:main"]},
    # The binary is tied to the torch it was compiled against.
    install_requires=["torch==" + torch.__version__.split("+")[0], "numpy", "scipy", "tqdm", "matplotlib", "kornia==0.9.0", "POT==0.9.7.post1",
                      "normflows==1.7.3"],
    # Optional: TensorBoard logging of training (`robustops train --tensorboard`, fit(tensorboard=dir)).
    extras_require={"tensorboard": ["tensorboard"]},
    python_requires=">=3.9",
)
