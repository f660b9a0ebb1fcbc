"""Builds the native parts with Cargo and bundles them into the package:
``picloud/_native/`` gets libpicloud (the C ABI the client calls through),
the ``picloud`` executable (for the embedded local cluster) and ``picloud.h``
(from which the client's cffi declarations are read).

``PICLOUD_CARGO_PROFILE`` picks the Cargo profile (default ``release``).
"""

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = Path(__file__).resolve().parent
WORKSPACE = HERE.parent


class BuildWithRust(build_py):
    def run(self):
        super().run()
        profile = os.environ.get("PICLOUD_CARGO_PROFILE", "release")
        if not (WORKSPACE / "Cargo.toml").exists():
            raise SystemExit(f"the picloud Cargo workspace is not at {WORKSPACE}: build from a checkout")
        subprocess.check_call(
            ["cargo", "build", "--profile", profile, "-p", "picloud-ffi", "-p", "picloud-cli"], cwd=WORKSPACE
        )
        target = Path(os.environ.get("CARGO_TARGET_DIR", WORKSPACE / "target"))
        built = target / ("debug" if profile == "dev" else profile)
        native = Path(self.build_lib) / "picloud" / "_native"
        native.mkdir(parents=True, exist_ok=True)
        for source in (built / "libpicloud.so", built / "picloud", WORKSPACE / "ffi" / "include" / "picloud.h"):
            shutil.copy2(source, native / source.name)


class NativeDistribution(Distribution):
    """Platform-specific: the package carries native code."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildWithRust}, distclass=NativeDistribution)
