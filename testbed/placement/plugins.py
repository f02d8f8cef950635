"""Placement algorithms from outside the testbed: a file, a module, or an installed package.

Owns loading and checking a plug-in and guarding its calls:
- `load(spec)`: `path/to/file.py:ClassName` (the file is loaded under a module name of its
  own), `package.module:ClassName` (imported), or a name an installed distribution
  registers in the entry-point group `edge_llm_testbed.algorithms`; the target must be a
  class that can be created with no arguments and whose instance has `name` (str),
  `dynamic` (bool) and a callable `place(snapshot)`. Anything else is `PluginRefused`, with
  a one-line message.
- `Checked`: the plug-in instance the controller calls. It hands `place` a snapshot with
  read-only matrices and checks what comes back (`algorithm.check_placement`); a plug-in
  that raises (anything but `Infeasible`) or returns an invalid placement raises
  `PluginFailed`, which carries the reason and the plug-in's traceback.
- `guarded`: every call into plug-in code after loading (creating it, `place`) runs in a
  thread of its own under a time limit (`Plugin.decision_timeout_s`; default
  `DECISION_TIMEOUT_S`, a plug-in may declare its own `decision_timeout_s`, the runner's
  `--decision-timeout` overrides both). Past it, or when that code raises `SystemExit` or
  `KeyboardInterrupt` (or any other exception), the plug-in has failed, not the command: a
  real Ctrl-C reaches the main thread, which only waits. Python cannot stop a thread: a
  call past its limit is sent an exception (which stops Python code, not a C call that
  blocks) and is otherwise left behind, its answer discarded.
The protocol is in algorithm.py; docs/plugins.md is the tutorial.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import math
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from . import ALGORITHM_NAMES
from .algorithm import check_placement
from .problem import Infeasible, Placement, Snapshot

ENTRY_POINT_GROUP = "edge_llm_testbed.algorithms"
# seconds one call into a plug-in (a decision, its constructor) may take: generous, since
# an exact solver may need minutes; a plug-in may declare its own `decision_timeout_s`
DECISION_TIMEOUT_S = 600.0
T = TypeVar("T")


class PluginRefused(ValueError):
    """A plug-in that cannot be used: not found, not a class, not an Algorithm. One line."""


class PluginFailed(Exception):
    """A plug-in failed while placing: it raised, or returned an invalid placement."""

    def __init__(self, message: str, tb: str | None = None, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.message, self.traceback, self.problems = message, tb, problems or []

    def record(self) -> dict[str, Any]:
        """What meta.json keeps of it (`error`)."""
        return {"message": self.message, "traceback": self.traceback, "problems": self.problems}


def is_plugin_spec(spec: str) -> bool:
    """`file.py:Class` or `module:Class` (entry-point names have no colon)."""
    return ":" in spec


def one_line(text: str, limit: int = 200) -> str:
    """An exception message as one line of at most `limit` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _describe(e: BaseException) -> str:
    if isinstance(e, SystemExit):
        return f"SystemExit (sys.exit({e.code!r}))"
    msg = one_line(str(e))
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class TimedOut(Exception):
    """A call into a plug-in did not return within its limit."""


class CtrlC(KeyboardInterrupt):
    """A real Ctrl-C while waiting for a plug-in (not a KeyboardInterrupt the plug-in raised)."""


class _Abandoned(BaseException):
    """Sent into a plug-in's thread past its limit, to stop Python code that loops."""


def guarded(call: Callable[[], T], limit_s: float, what: str) -> T:
    """call() in a daemon thread, waited for at most `limit_s` seconds. Its result, or what
    it raised (any BaseException: SystemExit and KeyboardInterrupt raised by plug-in code
    are the plug-in's), re-raised here; TimedOut past the limit. The wait is interruptible,
    so a real Ctrl-C (delivered to the main thread) still interrupts."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        try:
            box["value"] = call()
        except BaseException as e:  # handed to the caller, whatever it is
            box["error"] = e
        finally:
            done.set()

    t = threading.Thread(target=work, name=f"plug-in: {what}", daemon=True)
    limit_s = limit_s if math.isfinite(limit_s) else 1e9
    with _ctrl_c() as interrupted:
        t.start()
        end = time.monotonic() + limit_s
        while not done.wait(max(0.0, min(0.1, end - time.monotonic()))):
            if interrupted.is_set():
                raise CtrlC
            if time.monotonic() >= end:
                if t.ident is not None:  # stops a Python loop; a blocking C call ignores it
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(t.ident),
                                                               ctypes.py_object(_Abandoned))
                raise TimedOut(f"{what} did not return within {limit_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


@contextlib.contextmanager
def _ctrl_c() -> Iterator[threading.Event]:
    """An event set by a real Ctrl-C (SIGINT) while the block runs, on the main thread. The
    handler in force is still called: asyncio's (a run's loop) only cancels the main task,
    which cannot happen while the loop waits here, so `guarded` raises KeyboardInterrupt
    itself; Python's default one raises it at once."""
    flag = threading.Event()
    prev = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if not callable(prev):  # not the main thread, or SIGINT ignored or left to C
        yield flag
        return

    handler: Callable[[int, Any], Any] = prev

    def on_sigint(signum: int, frame: Any) -> None:
        flag.set()
        handler(signum, frame)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, handler)


@dataclass(frozen=True)
class Plugin:
    """A loaded and checked plug-in class; `create()` makes a fresh, guarded instance."""

    label: str  # how errors name it: the spec as given, or `entry point 'NAME' (module:Class)`
    cls: type
    name: str
    origin: dict[str, str] = field(default_factory=dict)  # recorded in meta.json
    decision_timeout_s: float = DECISION_TIMEOUT_S  # per call into it (guarded)

    def create(self) -> Checked:
        try:
            inst = guarded(self.cls, self.decision_timeout_s, f"{self.name}: {self.cls.__name__}()")
        except TimedOut as e:
            raise PluginFailed(f"{e} (its decision time limit)") from None
        except CtrlC:
            raise
        except BaseException as e:  # whatever the plug-in raised is its failure
            raise PluginFailed(f"{self.name}: creating {self.cls.__name__}() raised {_describe(e)}",
                               _own_traceback(e)) from None
        return Checked(inst, self.name, self.decision_timeout_s)


class Checked:
    """A plug-in instance as the controller sees it: same `name` and `dynamic`, and a
    `place` that never hands out the controller's arrays nor lets a bad answer through."""

    def __init__(self, inner: Any, name: str, decision_timeout_s: float = DECISION_TIMEOUT_S) -> None:
        self.inner, self.name, self.decision_timeout_s = inner, name, decision_timeout_s
        self.dynamic = bool(inner.dynamic)
        self.decision_cost = getattr(inner, "decision_cost", None)  # its declared cost, if any (policy.py)

    def place(self, snap: Snapshot) -> Placement:
        view = _read_only(snap)
        try:
            p = guarded(lambda: self.inner.place(view), self.decision_timeout_s, f"{self.name}: place()")
        except Infeasible:
            raise
        except TimedOut as e:
            raise PluginFailed(f"{e} (the decision time limit; --decision-timeout sets it)") from None
        except CtrlC:
            raise
        except BaseException as e:  # SystemExit, KeyboardInterrupt too: the plug-in's failure
            raise PluginFailed(f"{self.name}: place() raised {_describe(e)}", _own_traceback(e)) from None
        problems = check_placement(snap, p)
        if problems:
            more = f" (+{len(problems) - 1} more, see meta.json)" if len(problems) > 1 else ""
            raise PluginFailed(f"{self.name}: invalid placement: {problems[0]}{more}", None, problems)
        return Placement(snap.spec, tuple(int(j) for j in p.assign))


def _own_traceback(e: BaseException) -> str:
    """e's traceback from the plug-in's frames on (this module's calls into it left out)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(e), e, tb))


def _read_only(snap: Snapshot) -> Snapshot:
    def ro(a: np.ndarray) -> np.ndarray:
        a = np.array(a, copy=True)
        a.flags.writeable = False
        return a

    return snap.with_(rate=ro(snap.rate), latency=ro(snap.latency), burst=ro(snap.burst),
                      context=dict(snap.context))


# ---------------------------------------------------------------------------- loading


def entry_points() -> dict[str, list[importlib.metadata.EntryPoint]]:
    """Installed plug-ins: name -> the entry points registering it (normally one)."""
    out: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if all(ep.value != other.value for other in out.get(ep.name, [])):
            out.setdefault(ep.name, []).append(ep)
    return out


def load(spec: str) -> Plugin:
    """The plug-in `spec` names (file.py:Class, module:Class or an installed name), checked;
    PluginRefused with a one-line reason otherwise."""
    if is_plugin_spec(spec):
        where, _, attr = spec.rpartition(":")
        if not where or not attr:
            raise PluginRefused(f"{spec!r}: expected path/to/file.py:ClassName or package.module:ClassName")
        if where.endswith(".py") or "/" in where or "\\" in where:
            module, origin = _load_file(spec, where), {"file": str(Path(where).resolve())}
        else:
            module, origin = _import(spec, where), {"module": where}
        target = _attribute(spec, module, attr)
        return _check(spec, target, {"spec": spec, **origin})
    eps = entry_points().get(spec)
    if not eps:
        raise PluginRefused(f"unknown algorithm {spec!r} (built-in: {', '.join(ALGORITHM_NAMES)}; "
                            f"installed plug-ins: {', '.join(sorted(entry_points())) or 'none'}; "
                            "or give path/to/file.py:ClassName or package.module:ClassName)")
    if len(eps) > 1:
        raise PluginRefused(f"{spec!r} is registered by several installed packages "
                            f"({', '.join(ep.value for ep in eps)}): give module:ClassName instead")
    ep = eps[0]
    label = f"entry point {spec!r} ({ep.value})"
    try:
        target = ep.load()
    except Exception as e:
        raise PluginRefused(f"{label}: loading it raised {_describe(e)}") from None
    return _check(label, target, {"spec": spec, "entry_point": f"{ENTRY_POINT_GROUP}:{spec}", "value": ep.value})


def _load_file(spec: str, where: str) -> Any:
    path = Path(where)
    if not path.exists():
        raise PluginRefused(f"{spec}: no such file {where!r}")
    if not path.is_file() or path.suffix != ".py":
        raise PluginRefused(f"{spec}: {where!r} is not a Python file (.py)")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    name = f"_testbed_plugin_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"
    mod_spec = importlib.util.spec_from_file_location(name, resolved)
    if mod_spec is None or mod_spec.loader is None:
        raise PluginRefused(f"{spec}: cannot load {where!r} as a Python module")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module  # dataclasses, pickling and typing look modules up here
    try:
        mod_spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # a real Ctrl-C while loading interrupts the command
        del sys.modules[name]
        raise PluginRefused(f"{spec}: loading {where} raised {_describe(e)}{_line_in(e, resolved)}") from None
    return module


def _line_in(e: BaseException, file: Path) -> str:
    """` (line N)`: the last line of `file` in e's traceback, if any."""
    if isinstance(e, SyntaxError) and e.lineno:
        return ""  # its message names the line already
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if Path(f.filename) == file]
    return f" (line {lines[-1]})" if lines else ""


def _import(spec: str, module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise PluginRefused(f"{spec}: no module named {e.name!r}") from None
        raise PluginRefused(f"{spec}: importing {module} raised {_describe(e)}") from None
    except (Exception, SystemExit) as e:
        raise PluginRefused(f"{spec}: importing {module} raised {_describe(e)}") from None


def _attribute(spec: str, module: Any, attr: str) -> Any:
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            classes = sorted(n for n, v in vars(module).items()
                             if inspect.isclass(v) and v.__module__ == module.__name__ and not n.startswith("_"))
            known = f" (its classes: {', '.join(classes)})" if classes else " (it defines no classes)"
            raise PluginRefused(f"{spec}: {attr!r} not found{known}")
        target = getattr(target, part)
    return target


def _check(label: str, target: Any, origin: dict[str, str]) -> Plugin:
    if not inspect.isclass(target):
        what = "a function" if inspect.isroutine(target) else f"a {type(target).__name__}"
        raise PluginRefused(f"{label}: is {what}, not a class")
    limit = getattr(target, "decision_timeout_s", DECISION_TIMEOUT_S)
    if isinstance(limit, bool) or not isinstance(limit, int | float) or not limit > 0:
        raise PluginRefused(f"{label}: `decision_timeout_s` must be a positive number of seconds, got {limit!r}")
    try:
        inst = guarded(target, float(limit), f"{target.__name__}()")
    except TimedOut as e:
        raise PluginRefused(f"{label}: {e}") from None
    except CtrlC:
        raise
    except BaseException as e:  # SystemExit, KeyboardInterrupt too: the plug-in's
        raise PluginRefused(f"{label}: {target.__name__}() with no arguments raised {_describe(e)}") from None
    missing = [a for a in ("name", "dynamic", "place") if not hasattr(inst, a)]
    if missing:
        raise PluginRefused(f"{label}: not an Algorithm: no {', '.join(f'`{a}`' for a in missing)} "
                            "(needs name: str, dynamic: bool, place(snapshot) -> Placement)")
    name, dynamic, place = getattr(inst, "name"), getattr(inst, "dynamic"), getattr(inst, "place")  # noqa: B009 (checked above)
    if not isinstance(name, str) or not name.strip():
        raise PluginRefused(f"{label}: `name` must be a non-empty str, got {name!r}")
    if name in ALGORITHM_NAMES:
        raise PluginRefused(f"{label}: is named {name!r}, like a built-in algorithm: give it another `name`")
    if not isinstance(dynamic, bool):
        raise PluginRefused(f"{label}: `dynamic` must be True or False, got {dynamic!r}")
    if not callable(place):
        raise PluginRefused(f"{label}: `place` is not callable")
    try:
        inspect.signature(place).bind(None)
    except TypeError:
        raise PluginRefused(f"{label}: `place` must take one argument, the snapshot") from None
    except ValueError:
        pass  # no signature to check (a builtin); the call will tell
    origin = {**origin, "class": target.__qualname__}
    return Plugin(label, target, name, origin, float(limit))


def safe_name(name: str) -> str:
    """`name` as a piece of a directory name: letters, digits, `_` and `.` only."""
    s = re.sub(r"[^0-9A-Za-z_.]+", "_", name).strip("._")[:64]
    return s or "algorithm"
