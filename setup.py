"""Build hook for the two compiled hot-path modules (everything else is in pyproject.toml).

meshwg/wg/_transport.c seals and opens WireGuard transport messages with libsodium (Debian:
libsodium-dev); meshwg/io/dataplane/_fastio.c drains the TUN and UDP fds. Both are optional: without a
compiler or libsodium the build goes on and meshwg uses its pure-Python equivalents (`cryptography`
for transport data, os.read/recvmsg), with a higher per-packet latency. `meshwg.hotpath.describe()`
says which are in use; the test suite requires the compiled ones.
"""

from setuptools import Extension, setup

# METH_FASTCALL functions take a module argument they do not use.
COMPILE_ARGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror=implicit-function-declaration"]

setup(
    ext_modules=[
        Extension(
            "meshwg.wg._transport",
            sources=["meshwg/wg/_transport.c"],
            libraries=["sodium"],
            extra_compile_args=COMPILE_ARGS,
            optional=True,
        ),
        Extension(
            "meshwg.io.dataplane._fastio",
            sources=["meshwg/io/dataplane/_fastio.c"],
            extra_compile_args=COMPILE_ARGS,
            optional=True,
        ),
    ]
)
