"""libpicloud through cffi: the C declarations come from ``picloud.h`` itself
(the checked-in header, or the copy bundled with the package), so Python and C
see one ABI.

cffi's parser takes plain C declarations: the header's few preprocessor
conditionals (typed enums for C23 and C++) are resolved here for C11 before
it is handed over. ``check(rc)`` turns an error code into an exception
carrying ``picloud_last_error()``.
"""

import os
import re
from pathlib import Path

from cffi import FFI

from . import _native

_DEFINED_FALSE = {"__cplusplus"}


def _header_path():
    bundled = Path(__file__).resolve().parent / "_native" / "picloud.h"
    if bundled.exists():
        return bundled
    checkout = Path(__file__).resolve().parents[2] / "ffi" / "include" / "picloud.h"
    if checkout.exists():
        return checkout
    raise FileNotFoundError(f"picloud.h is neither at {bundled} nor at {checkout}")


def _condition(expr):
    """Evaluates the conditions picloud.h uses, for a C11 compiler."""
    expr = expr.strip()
    if expr == "defined(__cplusplus) || __STDC_VERSION__ >= 202311L":
        return False
    if expr == "__STDC_VERSION__ >= 202311L":
        return False
    raise ValueError(f"picloud.h: unexpected preprocessor condition {expr!r}")


def declarations(text):
    """The header's declarations with the preprocessor lines resolved."""
    out = []
    stack = []   # (taking this branch, any branch taken yet)
    for line in text.splitlines():
        stripped = line.strip()
        live = all(s[0] for s in stack)
        if stripped.startswith("#"):
            directive = stripped[1:].strip()
            if directive.startswith("ifndef "):
                # Include guards are not defined yet; __cplusplus never is.
                stack.append([True, True])
            elif directive.startswith("ifdef "):
                value = directive.split()[1] not in _DEFINED_FALSE
                stack.append([value, value])
            elif directive.startswith("if "):
                value = _condition(directive[3:])
                stack.append([value, value])
            elif directive == "else" or directive.startswith("else "):
                taken = stack[-1][1]
                stack[-1] = [not taken, True]
            elif directive.startswith("endif"):
                stack.pop()
            elif directive.startswith("define ") and live:
                parts = directive.split(None, 2)
                # Integer constants only; the include guard has no value.
                if len(parts) == 3 and re.fullmatch(r"-?\d+", parts[2]):
                    out.append(f"#define {parts[1]} {parts[2]}")
            # #include and other directives: nothing for cffi.
            continue
        if live:
            out.append(line)
    if stack:
        raise ValueError("picloud.h: unbalanced conditionals")
    return "\n".join(out)


ffi = FFI()
ffi.cdef(declarations(_header_path().read_text()))
lib = ffi.dlopen(_native.library_path())


class PicloudError(Exception):
    """A libpicloud call failed; ``code`` is its ``PICLOUD_ERR_*`` value."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class ConnectionLost(PicloudError, ConnectionError):
    """The server or agent went away."""


class UnknownJob(PicloudError, KeyError):
    """An id names no job the server knows."""

    def __str__(self):
        return str(self.args[0])


class PermissionDenied(PicloudError, PermissionError):
    """The job belongs to another user."""


class WaitTimeout(PicloudError, TimeoutError):
    """A wait ran out of time; the jobs go on."""


_CLASSES = {
    lib.PICLOUD_ERR_CONNECT: ConnectionLost,
    lib.PICLOUD_ERR_CONNECTION_LOST: ConnectionLost,
    lib.PICLOUD_ERR_UNKNOWN_JOB: UnknownJob,
    lib.PICLOUD_ERR_PERMISSION_DENIED: PermissionDenied,
    lib.PICLOUD_ERR_TIMEOUT: WaitTimeout,
}


def last_error():
    message = lib.picloud_last_error()
    return ffi.string(message).decode(errors="replace") if message != ffi.NULL else ""


#: Called (with no arguments) when a call on a server connection reports it
#: lost, before the error is raised: the session drops the connection, so
#: that the next call connects again.
on_connection_lost = []


def check(rc, lost=None):
    """Raises the exception for a libpicloud return code (0 is success).
    ``lost``: what to call instead of ``on_connection_lost`` when the
    connection the call used is lost (an agent's, say)."""
    if rc != 0:
        error = _CLASSES.get(rc, PicloudError)(rc, last_error() or ffi.string(lib.picloud_error_name(rc)).decode())
        if rc == lib.PICLOUD_ERR_CONNECTION_LOST:
            for hook in on_connection_lost if lost is None else (lost,):
                hook()
        raise error
    return rc


def cstr(text):
    """A C string for ``text`` (kept alive by the caller)."""
    return ffi.new("char[]", os.fsencode(text) if isinstance(text, (str, os.PathLike)) else text)
