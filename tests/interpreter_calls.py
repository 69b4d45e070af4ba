"""Device-function calls inside an interpreted Triton launch, without re-patching triton.language.

The interpreter (triton.runtime.interpreter) patches triton.language once per launch
(GridExecutor.__call__, restored when the grid ends), and again on every call of a @triton.jit
helper from inside the kernel (InterpretedFunction.__call__), which walks the language modules
with inspect.getmembers: about 1.7 ms a call, over half the interpreted time of kernels that call
helpers per block (tl.sum, tl.max and tl.zeros are such helpers). Nothing restores a helper's
patch before the launch ends, so a helper that sees no language module beyond those the launch or
an earlier helper of it patched would only patch them again: its call skips that here, other
calls run as before. The numbers the kernels compute are unchanged; what is interpreted is the
same code. Where the interpreter's internals differ from those named here, nothing is changed."""

from __future__ import annotations

import inspect
import threading


def _langs(fn, lang_modules) -> frozenset:
    """The language modules in fn's globals that the interpreter patches for it (ids)."""
    return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in lang_modules)


def skip_repatching_in_device_calls() -> bool:
    """Install the shortcut; False where triton or the expected interpreter internals are absent."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter as ti
    except ImportError:
        return False
    grid_cls, fn_cls = getattr(ti, "GridExecutor", None), getattr(ti, "InterpretedFunction", None)
    if grid_cls is None or fn_cls is None or not hasattr(ti, "_patch_lang") or not hasattr(fn_cls, "rewrite"):
        return False
    if getattr(fn_cls.__call__, "_skips_repatching", False):
        return True
    try:  # the body replaced below: patch, rewrite, call
        body = inspect.getsource(fn_cls.__call__)
    except OSError:
        return False
    if "_patch_lang(self.fn)" not in body or "self.rewrite()" not in body:
        return False
    lang_modules = [tl, tl.core]
    launches = threading.local()  # .active: per running launch of this thread, the modules patched so far
    cache: dict = {}
    grid_call, device_call = grid_cls.__call__, fn_cls.__call__

    def langs(fn) -> frozenset:
        if fn not in cache:
            cache[fn] = _langs(fn, lang_modules)
        return cache[fn]

    def patched_grid_call(self, *args, **kwargs):
        if not hasattr(launches, "active"):
            launches.active = []
        launches.active.append(set(langs(self.fn)))
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            launches.active.pop()

    def patched_device_call(self, *args, **kwargs):
        active = getattr(launches, "active", None)
        if not active:
            return device_call(self, *args, **kwargs)
        fn = self.rewrite()  # (its first rewrite adds the interpreter's globals to the helper's)
        if not langs(self.fn) <= active[-1]:
            active[-1] |= langs(self.fn)
            return device_call(self, *args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise ti.InterpreterError(repr(e)) from e

    patched_device_call._skips_repatching = True
    grid_cls.__call__, fn_cls.__call__ = patched_grid_call, patched_device_call
    return True
