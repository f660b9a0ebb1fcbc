"""A function's pickle is reused across calls only while what it captures is
unchanged: each change below must reach the next pickle."""

import os
import pickle
import threading

import cloudpickle
import pytest

from picloud import _fncache


def define(source, **names):
    """Runs ``source`` as if in ``__main__`` (so its functions are pickled by
    value) with ``names`` as globals; returns its namespace."""
    namespace = {"__name__": "__main__", **names}
    exec(source, namespace)
    return namespace


def run(blob, *args):
    return pickle.loads(blob)(*args)


def test_a_function_that_captures_nothing_mutable_is_pickled_once():
    ns = define("import math\ndef f(x, k=2):\n    return math.floor(x) * k + OFFSET\n", OFFSET=1)
    first = _fncache.dumps(ns["f"])
    assert _fncache.dumps(ns["f"]) is first
    assert run(first, 3.5) == 7


def test_a_rebound_global_is_seen():
    ns = define("def f():\n    return LIMIT\n", LIMIT=1)
    assert run(_fncache.dumps(ns["f"])) == 1
    ns["LIMIT"] = 2
    assert run(_fncache.dumps(ns["f"])) == 2
    del ns["LIMIT"]
    with pytest.raises(NameError):
        run(_fncache.dumps(ns["f"]))


def test_a_global_defined_after_the_first_pickle_is_seen():
    ns = define("def f():\n    return later()\n")
    with pytest.raises(NameError):
        run(_fncache.dumps(ns["f"]))
    ns["later"] = len
    with pytest.raises(TypeError):            # len() takes one argument
        run(_fncache.dumps(ns["f"]))


def test_a_rebound_closure_cell_is_seen():
    ns = define("def make():\n    n = 1\n    def f():\n        return n\n"
                "    def set(v):\n        nonlocal n\n        n = v\n    return f, set\n")
    f, set_n = ns["make"]()
    assert run(_fncache.dumps(f)) == 1
    set_n(5)
    assert run(_fncache.dumps(f)) == 5


def test_new_defaults_and_new_code_are_seen():
    ns = define("def f(x=1):\n    return x\n")
    f = ns["f"]
    assert run(_fncache.dumps(f)) == 1
    f.__defaults__ = (3,)
    assert run(_fncache.dumps(f)) == 3
    f.__code__ = (lambda x=0: -x).__code__
    assert run(_fncache.dumps(f)) == -3


def test_a_global_read_inside_a_nested_function_is_watched():
    ns = define("def f():\n    return [SCALE * v for v in (1, 2)]\n", SCALE=1)
    assert run(_fncache.dumps(ns["f"])) == [1, 2]
    ns["SCALE"] = 10
    assert run(_fncache.dumps(ns["f"])) == [10, 20]


@pytest.mark.parametrize("captured", [
    [1],                          # a list can change in place
    {"a": 1},
    bytearray(b"x"),
    ([1],),                       # a tuple holding one
])
def test_mutable_captures_are_pickled_every_time(captured):
    ns = define("def f():\n    return DATA\n", DATA=captured)
    first = _fncache.dumps(ns["f"])
    second = _fncache.dumps(ns["f"])
    assert second is not first
    assert run(second) == captured


def test_an_in_place_change_of_a_captured_list_is_seen():
    ns = define("def f():\n    return sum(DATA)\n", DATA=[1, 2])
    assert run(_fncache.dumps(ns["f"])) == 3
    ns["DATA"].append(10)
    assert run(_fncache.dumps(ns["f"])) == 13


def test_a_builtin_bound_to_an_object_is_not_trusted():
    items = []
    ns = define("def f(v):\n    add(v)\n", add=items.append)
    assert _fncache.dumps(ns["f"]) is not _fncache.dumps(ns["f"])


def test_a_by_value_helper_is_pickled_every_time():
    ns = define("def helper():\n    return 1\ndef f():\n    return helper()\n")
    assert _fncache.dumps(ns["f"]) is not _fncache.dumps(ns["f"])


def test_function_attributes_and_keyword_defaults_disable_reuse():
    ns = define("def f():\n    return 1\ndef g(*, k=1):\n    return k\n")
    ns["f"].tag = "x"
    assert _fncache.dumps(ns["f"]) is not _fncache.dumps(ns["f"])
    assert _fncache.dumps(ns["g"]) is not _fncache.dumps(ns["g"])


def test_registering_a_module_by_value_is_a_change(tmp_path, monkeypatch):
    (tmp_path / "fncache_helper_mod.py").write_text("def twice(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import fncache_helper_mod
    ns = define("def f(x):\n    return twice(x)\n", twice=fncache_helper_mod.twice)
    by_reference = _fncache.dumps(ns["f"])
    assert _fncache.dumps(ns["f"]) is by_reference
    cloudpickle.register_pickle_by_value(fncache_helper_mod)
    try:
        by_value = _fncache.dumps(ns["f"])
    finally:
        cloudpickle.unregister_pickle_by_value(fncache_helper_mod)
    assert by_value != by_reference
    assert b"fncache_helper_mod" in by_reference and len(by_value) > len(by_reference)


def test_other_callables_are_pickled_as_before():
    assert pickle.loads(_fncache.dumps(os.path.join))("a", "b") == os.path.join("a", "b")
    lock = threading.Lock()
    with pytest.raises(TypeError):
        _fncache.dumps(define("def f():\n    return LOCK\n", LOCK=lock)["f"])


def test_the_cache_is_bounded():
    functions = [define(f"def f():\n    return {i}\n")["f"] for i in range(_fncache.CAPACITY + 10)]
    for f in functions:
        _fncache.dumps(f)
    assert len(_fncache._entries) <= _fncache.CAPACITY
    assert run(_fncache.dumps(functions[0])) == 0


def test_the_caches_are_bounded_for_code_made_again_and_again():
    for i in range(_fncache.NAMES_CAPACITY + 10):
        _fncache.dumps(define(f"def f():\n    return {i}\n")["f"])
    assert len(_fncache._names) <= _fncache.NAMES_CAPACITY
    assert len(_fncache._entries) <= _fncache.CAPACITY


def test_a_submodule_loaded_after_the_first_pickle_is_a_change():
    import sys
    import xml

    saved = {k: v for k, v in sys.modules.items() if k.startswith("xml.dom")}
    for k in saved:
        del sys.modules[k]
    try:
        ns = define("def f():\n    return xml.dom.minidom.parseString('<a/>').documentElement.tagName\n", xml=xml)
        before = _fncache.dumps(ns["f"])
        assert _fncache.dumps(ns["f"]) is before
        import xml.dom.minidom  # noqa: F401
        after = _fncache.dumps(ns["f"])
        assert after is not before and b"xml.dom.minidom" in after
    finally:
        sys.modules.update(saved)


def test_a_global_rebound_while_pickling_is_not_kept(monkeypatch):
    ns = define("def f():\n    return LIMIT\n", LIMIT=1)
    real = cloudpickle.dumps

    def racing(obj, protocol=None):
        blob = real(obj, protocol=protocol)
        ns["LIMIT"] = 2               # another thread, between the pickle and its checks
        return blob

    monkeypatch.setattr(_fncache.cloudpickle, "dumps", racing)
    assert run(_fncache.dumps(ns["f"])) == 1
    monkeypatch.setattr(_fncache.cloudpickle, "dumps", real)
    assert run(_fncache.dumps(ns["f"])) == 2


def test_a_renamed_function_or_a_large_pickle_is_not_reused():
    ns = define("def f():\n    return 1\n")
    first = _fncache.dumps(ns["f"])
    ns["f"].__qualname__ = "g"
    assert _fncache.dumps(ns["f"]) is not first
    big = define("def f():\n    return len(TEXT)\n", TEXT="x" * (_fncache.MAX_BLOB + 1))
    assert _fncache.dumps(big["f"]) is not _fncache.dumps(big["f"])
