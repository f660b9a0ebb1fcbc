"""picloud: ``cloud.call`` and ``cloud.map`` on the cluster you have.

    import picloud as cloud
    jids = cloud.map(lambda x: x * x, range(10))
    print(cloud.result(jids))

With no cluster configured (``PICLOUD_DIR`` unset and no server in
``~/.picloud``), the first call starts a local server and agent for this
machine and stops them when the process exits; ``picloud.init(address)``
connects to a cluster instead. Every call goes through libpicloud, the C ABI
(see ``docs/python.md``).

The worker side (``python -m picloud.worker``) imports only the private
modules ``_wire`` and ``_payload``: importing this package loads the client
lazily, on first use.
"""

__version__ = "0.1.0"

_API = {
    "call", "map", "result", "iresult", "join", "status", "info", "kill", "delete", "array",
    "CloudException", "CloudTimeoutError", "Jid",
}


def __getattr__(name):
    if name in _API:
        from . import cloud

        return getattr(cloud, name)
    if name == "Executor":
        from .executor import Executor

        return Executor
    if name == "init":
        from ._session import init

        return init
    raise AttributeError(f"module 'picloud' has no attribute {name!r}")


def __dir__():
    return sorted(_API | {"Executor", "init", "__version__"})
