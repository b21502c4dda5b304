"""cffi build script (API mode) for :mod:`pyctl._kvmlu_cffi`.

The extension includes kvmlu's one uAPI header and the system's
``<linux/vfio.h>``, so every structure layout and ioctl number Python uses is
computed by the C compiler from those headers.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
UAPI_INCLUDE = HERE.parent / "kmod" / "include" / "uapi"

DECLS = [HERE / "decl" / "kvmlu.h", HERE / "decl" / "vfio.h"]

ffibuilder = FFI()
for decl in DECLS:
    ffibuilder.cdef(decl.read_text())
ffibuilder.set_source(
    "pyctl._kvmlu_cffi",
    "#include <sys/ioctl.h>\n#include <linux/kvmlu.h>\n#include <linux/vfio.h>\n",
    include_dirs=[str(UAPI_INCLUDE)],
    depends=[str(UAPI_INCLUDE / "linux" / "kvmlu.h"), *map(str, DECLS)],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
