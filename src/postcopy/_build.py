"""cffi API-mode builder for postcopy's native helper (``postcopy._native``).

Every component of the native layer is three files in ``native/``: ``NAME.c`` (the
code), ``NAME.h`` (its C header) and ``NAME.cdef`` (the declarations cffi exposes to
Python). The builder takes them all, so adding a component needs no change here.
"""
import os
from pathlib import Path

from cffi import FFI

# setuptools wants source paths relative to setup.py's folder, the build's working dir.
NATIVE = Path(os.path.relpath(Path(__file__).resolve().parents[2] / "native"))


def _components() -> list[str]:
    return sorted(p.stem for p in NATIVE.glob("*.cdef"))


ffibuilder = FFI()
for _name in _components():
    ffibuilder.cdef((NATIVE / f"{_name}.cdef").read_text())

ffibuilder.set_source(
    "postcopy._native",
    "".join(f'#include "{name}.h"\n' for name in _components()),
    sources=[str(p) for p in sorted(NATIVE.glob("*.c"))],
    include_dirs=[str(NATIVE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["pthread"],
    # frame_auth's AES-GMAC: libcrypto by its runtime name, so no -dev package is needed.
    extra_link_args=["-l:libcrypto.so.3"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
