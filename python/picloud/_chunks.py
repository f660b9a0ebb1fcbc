"""Runs several elements of a ``cloud.map`` in one task, the way
``multiprocessing.Pool.map`` chunks its input: each element's value or
exception is kept apart, so one failing element fails only itself."""

import traceback


class ChunkRunner:
    """Calls ``func`` on each element's arguments; returns, per element,
    ``(True, value)`` or ``(False, exception_or_None, "Type: message", traceback)``."""

    __slots__ = ("func",)

    def __init__(self, func):
        self.func = func

    def __call__(self, *elements):
        out = []
        for args in elements:
            try:
                out.append((True, self.func(*args)))
            except BaseException as e:  # a user's exception, whatever it is
                summary = f"{type(e).__module__}.{type(e).__qualname__}" if type(e).__module__ != "builtins" \
                    else type(e).__qualname__
                text = str(e)
                out.append((False, _portable(e), f"{summary}: {text}" if text else summary,
                            traceback.format_exc()))
        return out


def _portable(exc):
    """The exception itself when it pickles, else None."""
    import pickle

    try:
        pickle.dumps(exc)
        return exc
    except Exception:
        return None
