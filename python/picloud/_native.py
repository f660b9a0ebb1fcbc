"""Where picloud's native parts are: ``libpicloud`` (the C ABI every client
call goes through) and the ``picloud`` executable (which runs the embedded
local cluster).

Looked up in this order:

1. ``PICLOUD_LIB`` / ``PICLOUD_BIN``: explicit paths;
2. ``picloud/_native/`` inside the installed package (``pip install ./python``
   builds and bundles both);
3. a Cargo build of the checkout this package sits in
   (``target/release``, then ``target/debug``; ``CARGO_TARGET_DIR`` is honoured).
"""

import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_CHECKOUT = _HERE.parent.parent


def _candidates(name):
    yield _HERE / "_native" / name
    target = Path(os.environ.get("CARGO_TARGET_DIR", _CHECKOUT / "target"))
    for profile in ("release", "debug"):
        yield target / profile / name


def _find(env, name):
    explicit = os.environ.get(env)
    if explicit:
        if not os.path.exists(explicit):
            raise FileNotFoundError(f"{env}={explicit} does not exist")
        return explicit
    tried = []
    for path in _candidates(name):
        if path.exists():
            return str(path)
        tried.append(str(path))
    raise FileNotFoundError(
        f"cannot find {name}: set {env}, install the package with `pip install ./python`, "
        f"or build the checkout with `cargo build --workspace` (looked in {', '.join(tried)})"
    )


def library_path():
    """Path of libpicloud."""
    return _find("PICLOUD_LIB", "libpicloud.so")


def binary_path():
    """Path of the ``picloud`` executable."""
    return _find("PICLOUD_BIN", "picloud")


def package_dir():
    """The directory holding the ``picloud`` package: workers import it from there."""
    return str(_HERE.parent)
