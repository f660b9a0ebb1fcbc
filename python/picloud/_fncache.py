"""Reuse of a function's pickle across calls while nothing it captures has
changed.

cloudpickle pickles a function of ``__main__`` (or of a module registered
by value) together with what it captures: its code, defaults, closure cells
and the globals its code names. Pickling that again for every ``call`` costs
more than the rest of the submission, so the pickle is kept and reused as
long as every one of those is the *same object* as when it was pickled, and
each is an object whose pickle cannot change while it stays the same object:
``None``, numbers, strings, bytes, tuples of such, and modules, builtins,
functions and classes that are pickled by reference. Its name, qualified
name, module, doc and annotations must be the same objects too, and so must
the set of loaded submodules its code can reach from a module it captures
(cloudpickle pickles those). A function that captures anything else (a
list, a dict, an array, a by-value helper) is pickled afresh every time, so
a change to what it captures is always seen by the next call.
"""

import sys
import types

import cloudpickle

#: Functions whose pickles are kept (the oldest is dropped beyond this).
CAPACITY = 256
#: Pickles larger than this (a function capturing a large string, say) are
#: not kept.
MAX_BLOB = 1 << 20

_MISSING = object()
_SCALARS = frozenset((type(None), bool, int, float, complex, str, bytes))

# id(function) -> _Entry; the entry holds the function, so the id is not reused.
_entries = {}
# code object -> the global names its code (nested code included) may read;
# emptied when it reaches NAMES_CAPACITY (re-run notebook cells make new ones).
_names = {}
NAMES_CAPACITY = 4096


class _Entry:
    __slots__ = ("func", "code", "defaults", "described", "closure", "globals", "modules", "submodules",
                 "registry", "blob")


def _code_names(code):
    names = _names.get(code)
    if names is None:
        found = set(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                found.update(_code_names(const))
        names = tuple(sorted(found))
        if len(_names) >= NAMES_CAPACITY:
            _names.clear()
        _names[code] = names
    return names


def _importable(module, registry):
    """A module cloudpickle pickles by name: imported, and neither it nor a
    package above it registered by value."""
    if not module or module == "__main__" or module not in sys.modules:
        return False
    parts = module.split(".")
    return not any(".".join(parts[:i]) in registry for i in range(1, len(parts) + 1))


def _by_reference(obj, registry):
    """A function or class that cloudpickle pickles as a module attribute."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", "")
    return (_importable(module, registry) and "." not in qualname
            and getattr(sys.modules[module], qualname, None) is obj)


def _stable(value, registry):
    kind = type(value)
    if kind in _SCALARS:
        return True
    if kind is tuple:
        return all(_stable(v, registry) for v in value)
    if kind is types.ModuleType:
        return sys.modules.get(value.__name__) is value and _importable(value.__name__, registry)
    if kind is types.BuiltinFunctionType:
        # A builtin bound to an object (``some_list.append``) pickles that
        # object; one of a module does not.
        owner = value.__self__
        return owner is None or (type(owner) is types.ModuleType and _stable(owner, registry))
    if kind is types.FunctionType or isinstance(value, type):
        return _by_reference(value, registry)
    return False


def _cells(func):
    """The closure's values, or None when a cell is empty."""
    closure = func.__closure__
    if not closure:
        return ()
    try:
        return tuple(cell.cell_contents for cell in closure)
    except ValueError:
        return None


def _same(values, expected):
    return len(values) == len(expected) and all(a is b for a, b in zip(values, expected))


def dumps(func):
    """``cloudpickle.dumps(func, protocol=5)``, reused when it would give the
    same bytes (see the module doc)."""
    if type(func) is not types.FunctionType:
        return cloudpickle.dumps(func, protocol=5)
    entry = _entries.get(id(func))
    if entry is not None and entry.func is func and _valid(entry, func):
        return entry.blob
    # What it captures is taken before pickling and checked again after:
    # another thread may rebind a global meanwhile.
    entry = _entry(func)
    blob = cloudpickle.dumps(func, protocol=5)
    if entry is not None and len(blob) <= MAX_BLOB and _valid(entry, func):
        entry.blob = blob
        if len(_entries) >= CAPACITY:
            try:
                _entries.pop(next(iter(_entries)), None)
            except (RuntimeError, StopIteration):
                pass        # another thread changed it meanwhile
        _entries[id(func)] = entry
    return blob


def _described(func):
    """What the pickle takes from the function object besides its captures."""
    return (func.__name__, func.__qualname__, func.__module__, func.__doc__, func.__annotations__)


def _submodules(values, names):
    """The loaded submodules of the modules among ``values`` that ``names``
    reach (``xml.dom.minidom`` from ``xml`` with ``dom`` and ``minidom``):
    cloudpickle pickles those with the function, so loading one more is a
    change."""
    stack = [v.__name__ for v in values if type(v) is types.ModuleType]
    found = []
    while stack:
        prefix = stack.pop()
        for name in names:
            child = f"{prefix}.{name}"
            if child in sys.modules and child not in found:
                found.append(child)
                stack.append(child)
    return tuple(found)


def _valid(entry, func):
    if func.__code__ is not entry.code or func.__defaults__ is not entry.defaults or func.__kwdefaults__:
        return False
    if func.__dict__ or not _same(_described(func), entry.described):
        return False
    cells = _cells(func)
    if cells is None or not _same(cells, entry.closure):
        return False
    g = func.__globals__
    names = _code_names(entry.code)
    if not _same(tuple(g.get(name, _MISSING) for name in names), entry.globals):
        return False
    if entry.modules and _submodules(entry.modules, names) != entry.submodules:
        return False
    return entry.registry == cloudpickle.list_registry_pickle_by_value()


def _entry(func):
    """What to check before reusing the function's pickle, or None if it
    may not be reused."""
    if func.__kwdefaults__ or func.__dict__:
        return None
    cells = _cells(func)
    if cells is None:
        return None
    g = func.__globals__
    names = _code_names(func.__code__)
    values = tuple(g.get(name, _MISSING) for name in names)
    registry = cloudpickle.list_registry_pickle_by_value()
    captured = [v for v in values if v is not _MISSING] + list(cells) + list(func.__defaults__ or ())
    if not all(_stable(v, registry) for v in captured):
        return None
    entry = _Entry()
    entry.func = func
    entry.code = func.__code__
    entry.defaults = func.__defaults__
    entry.described = _described(func)
    entry.closure = cells
    entry.globals = values
    entry.modules = tuple(v for v in captured if type(v) is types.ModuleType)
    entry.submodules = _submodules(entry.modules, names) if entry.modules else ()
    # Which modules go by value decides how captured modules, functions and
    # classes are pickled, and the function itself.
    entry.registry = registry
    return entry
