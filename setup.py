"""Build of ktsft: one Cython extension plus one C translation unit per ISA.

Each ISA unit is compiled with its own flags (never -march=native) and keeps
its kernels static; the running CPU picks one at import.  On non-x86 hosts
only the portable unit is built.
"""
import os
import platform
import re
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
KDIR = os.path.join("ktsft", "_kernels")
INCLUDE = os.path.join(KDIR, "include")

X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def isa_flags():
    """{ISA build: its compile flags}, slowest first, read from the one ISA
    list (ktsft/_kernels/include/ktsft/isa_table.h)."""
    text = open(os.path.join(HERE, INCLUDE, "ktsft", "isa_table.h")).read().replace("\\\n", " ")
    rows = re.findall(r'\bX\((\w+),\s*((?:"[^"]*"\s*)+),', text)
    return {name: "".join(re.findall(r'"([^"]*)"', lits)).split() for name, lits in rows}


ISAS = isa_flags()
# the portable unit everywhere; the x86 SIMD units on x86
ISA_UNITS = [("kernels_scalar", ISAS["scalar"])]
if X86:
    ISA_UNITS += [(f"kernels_{n}", f) for n, f in ISAS.items() if n not in ("scalar", "amx")]
# AMX tiles: hardware build when the compiler knows the instructions, or
# (KTSFT_AMX_EMULATE=1, development only) a C model of the tile unit
AMX_FLAGS = ISAS["amx"]
AMX_EMULATE = bool(os.environ.get("KTSFT_AMX_EMULATE"))


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


SANITIZE = _env_flag("KTSFT_SANITIZE")
# Release builds carry no debug information: Python's CFLAGS bring -g, which
# made the extension 10.7 MB (1.4 MB of it code and data).  -g0 after it
# drops it at compile time, and on Linux the linker strips what is left
# (--strip-debug keeps the symbol table: profiles and backtraces still name
# the functions).  KTSFT_DEBUG=1 keeps the debug information; so does the
# sanitizer build (KTSFT_SANITIZE=1), whose reports need it.
DEBUG = _env_flag("KTSFT_DEBUG") or SANITIZE
NO_DEBUG_CFLAGS = [] if DEBUG else ["-g0"]
STRIP_LDFLAGS = ["-Wl,--strip-debug"] if not DEBUG and sys.platform.startswith("linux") else []

COMMON_CFLAGS = ["-O3", "-std=c11", "-fvisibility=hidden", "-fno-math-errno"] + NO_DEBUG_CFLAGS
if SANITIZE:
    # ASan + UBSan build for the hardening job (see docs/dispatch.md): the
    # shipped flags, so it checks the code that ships, plus the sanitizers
    COMMON_CFLAGS = COMMON_CFLAGS + ["-g", "-fno-omit-frame-pointer",
                                     "-fsanitize=address,undefined"]
# KTSFT_WERROR=1 (CI): the kernel units with every warning on and a pointer
# of the wrong type an error (the Cython-generated file is not covered)
UNIT_WARN = (["-Wall", "-Werror=incompatible-pointer-types",
              "-Werror=implicit-function-declaration"] if _env_flag("KTSFT_WERROR") else [])


def _compiles(compiler, flags):
    """Does the compiler accept these flags (and their intrinsics)?"""
    src = ("#include <immintrin.h>\nvoid f(void *p) { _tile_zero(0); _tile_stored(0, p, 64); "
           "_tile_release(); }\n")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.c")
        with open(path, "w") as f:
            f.write(src)
        try:
            compiler.compile([path], output_dir=tmp, extra_postargs=flags)
            return True
        except Exception:
            return False


def _has_openmp(compiler):
    """Probe -fopenmp with the compiler setuptools will use."""
    src = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.c")
        with open(path, "w") as f:
            f.write(src)
        try:
            objs = compiler.compile([path], output_dir=tmp, extra_postargs=["-fopenmp"])
            compiler.link_executable(objs, os.path.join(tmp, "probe"), extra_postargs=["-fopenmp"])
            return True
        except Exception:
            return False


class BuildExt(build_ext):
    def build_extension(self, ext):
        macros = [("KTSFT_X86_KERNELS", "1")] if X86 else []
        openmp = os.environ.get("KTSFT_NO_OPENMP") is None and _has_openmp(self.compiler)
        if not openmp:
            print("ktsft: building WITHOUT OpenMP: kernels will run on one thread", file=sys.stderr)
        units = list(ISA_UNITS)
        if X86 and AMX_EMULATE:
            units.append(("kernels_amx", [f for f in AMX_FLAGS if not f.startswith("-mamx")] +
                          ["-DKT_AMX_EMULATE"]))
            macros.append(("KTSFT_AMX_KERNELS", "2"))
        elif X86 and _compiles(self.compiler, AMX_FLAGS):
            units.append(("kernels_amx", AMX_FLAGS))
            macros.append(("KTSFT_AMX_KERNELS", "1"))
        elif X86:
            print("ktsft: this compiler has no AMX intrinsics: building without the AMX path",
                  file=sys.stderr)
        def compile_unit(unit_flags):
            unit, flags = unit_flags
            return self.compiler.compile(
                [os.path.join(KDIR, "src", unit + ".c")],
                output_dir=self.build_temp,
                macros=macros,
                include_dirs=[INCLUDE],
                extra_postargs=COMMON_CFLAGS + UNIT_WARN + ["-fPIC"] + flags,
            )

        # the units are independent compiler runs: one per core at a time
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, len(os.sched_getaffinity(0))
                                                if hasattr(os, "sched_getaffinity")
                                                else os.cpu_count() or 1)) as pool:
            objects = [o for objs in pool.map(compile_unit, units + [("cpu_features", []),
                                                                     ("dispatch", [])])
                       for o in objs]
        ext.extra_objects = objects
        ext.define_macros = list(ext.define_macros or []) + macros
        omp = ["-fopenmp"] if openmp else []
        ext.extra_compile_args = COMMON_CFLAGS + omp
        ext.extra_link_args = omp + (["-fsanitize=address,undefined"] if SANITIZE else STRIP_LDFLAGS)
        super().build_extension(ext)


def extensions():
    from Cython.Build import cythonize

    import glob

    # every kernel source: the extension is relinked whenever one changes
    kernel_files = sorted(glob.glob(os.path.join(KDIR, "src", "*")) +
                          glob.glob(os.path.join(KDIR, "*.pxi")) +
                          glob.glob(os.path.join(INCLUDE, "ktsft", "*.h")))
    ext = Extension(
        "ktsft._kernels.moe_sft",
        sources=[os.path.join(KDIR, "moe_sft.pyx")],
        include_dirs=[INCLUDE],
        depends=kernel_files,
    )
    return cythonize([ext], compiler_directives={"language_level": 3}, quiet=True)


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
