"""One-process Axolotl commands (`axolotl train --launcher python`, `preprocess`, `merge-lora`) and llama.cpp's
converters as a fork of the warm test worker instead of a fresh interpreter.

A one-process Axolotl run of the tiny Llama spends ~15 of its ~20 s importing torch, transformers, trl,
wandb, numba... before it logs a line, a converter ~6 s; the suite starts dozens of them, most from
`tools` calls that `tests.helpers.run_forked` already runs in a fork of the worker. `install()`
(tests/conftest.py, in every worker and so in every forked `tools`) makes `subprocess.Popen` start
exactly those commands as one more fork, which runs the program's own entry point (Axolotl's console
script `axolotl.cli.main:main`, the converter script as ``__main__``) on the same argv, in the same
folder, with the same environment and pipes, PYTHONPATH's folders first on sys.path with their modules
imported afresh (the converters' own gguf-py), and for Axolotl the same start-up shim
(recipes/seeding/sitecustomize.py: seeding, the hooks, dying with its parent): a tiny run 20 s -> 5 s.
The rest of the verb (its log, progress, checkpoints, artifact) is untouched.

A command is forked only when nothing it would read at import time differs: the worker's hash seed is
0 (`PYTHONHASHSEED=0`, which `tools train` gives Axolotl: peft's set order), and the environment differs
from the worker's only in variables read at run time (RUN_TIME_ENV). Several processes (torchrun,
accelerate) stay real, and so does everything the demo test starts (`tools run` and its steps, as
`make demo` runs them), so the real launch path is still run end to end (tests/tools/test_demo.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

AXOLOTL = str(Path(sys.executable).parent / "axolotl")
# read by the shim, `tools` or Axolotl when they run, never at import time (OMP_NUM_THREADS is, by torch: a fork
# applies it with torch.set_num_threads)
RUN_TIME_ENV = frozenset({"PATH", "PYTHONPATH", "PYTHONHASHSEED", "MEDILORA_SEED", "MEDILORA_DIE_WITH_PARENT",
                          "MEDILORA_TRACE_SAMPLES", "OMP_NUM_THREADS",
                          "MEDILORA_DEVICE", "ACCELERATE_USE_CPU"})   # the shim's; accelerate's PartialState
# a new interpreter's warnings filters (`python -c "import warnings; print(warnings.filters)"`)
DEFAULT_WARNINGS = (("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                    ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                    ("ignore", ResourceWarning, ""))
# what `axolotl train` imports beyond tests.helpers' _WARM (measured with -X importtime)
WARM = ("transformers.trainer", "accelerate", "trl", "bitsandbytes", "wandb", "numba", "evaluate")


def _converter(args: list[str]) -> bool:
    """``python SCRIPT ...`` for one of llama.cpp's converters (release.llamasrc.run_script)."""
    from release.llamasrc import llama_cpp_dir

    if not (len(args) >= 2 and args[0] == sys.executable and args[1].endswith(".py")):
        return False
    try:
        return Path(args[1]).parent == llama_cpp_dir(download=False)
    except Exception:  # noqa: BLE001 - none installed, or a test's LLAMA_CPP_DIR: then not a converter we fork
        return False


def _axolotl(args: list[str]) -> bool:
    """``axolotl train --launcher python|preprocess|merge-lora ...``: one process (other launchers start several)."""
    if len(args) < 3 or args[0] != AXOLOTL:
        return False
    if args[1] == "train":
        return "--" not in args and "--launcher" in args and args[args.index("--launcher") + 1] == "python"
    return args[1] in ("merge-lora", "preprocess")


def forkable(args, env) -> bool:
    """Whether ``args`` is a one-process Axolotl command or llama.cpp converter that a fork of this interpreter runs
    as a new interpreter would."""
    if not isinstance(args, (list, tuple)):
        return False
    args = [str(a) for a in args]
    if not (_axolotl(args) or _converter(args)):
        return False
    if env is None or sys.flags.hash_randomization or env.get("PYTHONHASHSEED") != "0":
        return False
    changed = {k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)}
    return changed <= RUN_TIME_ENV


class WarmPopen(subprocess.Popen):
    """``subprocess.Popen`` that forks a `forkable` command (pipes, pid, wait and kill as for any child)."""

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                       creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite, *rest):
        if shell or not forkable(args, env):
            return super()._execute_child(args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                                          creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread,
                                          errwrite, *rest)
        pid = os.fork()
        if pid == 0:
            _child([str(a) for a in args], cwd, env, (p2cread, c2pwrite, errwrite), (p2cwrite, c2pread, errread))
        self.pid = pid
        self._child_created = True
        self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)


def run_then_exit(body) -> None:
    """In a forked child: ``body()``, then exit with the code its interpreter would give (SystemExit's code; 1 and
    the traceback on a crash), the streams flushed; never returns (tests.helpers' forked `tools` too)."""
    import traceback

    code = 1
    try:
        body()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - a crash, as the interpreter would print it
        traceback.print_exc()
    finally:
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def _child(argv: list[str], cwd, env: dict, ours: tuple, theirs: tuple) -> None:
    """In the fork: the child's ends of the pipes on fds 0-2, then the program's entry point; never returns."""
    run_then_exit(lambda: _run(argv, cwd, env, ours, theirs))


def leave_the_worker(fds: tuple) -> None:
    """In a forked child: ``fds`` (stdin, stdout, stderr; -1 keeps one) on fds 0-2 with fresh text streams over
    1 and 2, default signal handlers (pytest's and pytest-timeout's stay in the worker), no root logging handler
    (pytest's capture handlers: a program's root logger has none)."""
    import io
    import logging
    import signal

    for fd, std in zip(fds, (0, 1, 2)):
        if fd != -1:
            os.dup2(fd, std)
    sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), write_through=True)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
        signal.signal(sig, signal.SIG_DFL)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)


def _run(argv: list[str], cwd, env: dict, ours: tuple, theirs: tuple) -> None:
    import warnings

    leave_the_worker(ours)
    for fd in {*ours, *theirs} - {-1, 0, 1, 2}:
        os.close(fd)
    warnings.resetwarnings()   # a new interpreter's filters, not pytest's
    for action, category, module in reversed(DEFAULT_WARNINGS):
        warnings.filterwarnings(action, category=category, module=module)
    if cwd is not None:
        os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    if "torch" in sys.modules and env.get("OMP_NUM_THREADS", "").isdigit():
        sys.modules["torch"].set_num_threads(int(env["OMP_NUM_THREADS"]))
    _python_path(env)
    if argv[0] == AXOLOTL:
        _shim(env)
        sys.argv = argv
        from axolotl.cli.main import main
        main()
    else:   # python SCRIPT ARGS
        import runpy

        sys.argv = argv[1:]
        sys.path.insert(0, str(Path(argv[1]).parent))
        runpy.run_path(argv[1], run_name="__main__")


def _python_path(env: dict) -> None:
    """PYTHONPATH's folders first on sys.path, as a new interpreter has them, and the modules they hold imported
    afresh from there (the converters bring llama.cpp's own gguf-py, not the worker's)."""
    folders = [f for f in env.get("PYTHONPATH", "").split(os.pathsep) if f]
    sys.path[:0] = folders
    mine = {p.stem if p.suffix == ".py" else p.name for f in folders if os.path.isdir(f) for p in Path(f).iterdir()}
    for name in [n for n in sys.modules if n.split(".")[0] in mine]:
        del sys.modules[name]


def _shim(env: dict) -> None:
    """The start-up shim where the command's PYTHONPATH names it, as a new interpreter would run it; its hooks patch
    at once a module the worker already has."""
    import runpy

    from recipes.hardware import SHIM_DIR

    if str(SHIM_DIR) not in env.get("PYTHONPATH", "").split(os.pathsep):
        return
    hooks = runpy.run_path(str(SHIM_DIR / "sitecustomize.py"), run_name="sitecustomize").get("_HOOKS", {})
    for name in [n for n in hooks if n in sys.modules]:
        hooks.pop(name)(sys.modules[name])


def warm() -> None:
    """Import WARM in this worker (once), so that no fork imports them again."""
    import importlib

    for name in WARM:
        if name not in sys.modules:
            importlib.import_module(name)


def install() -> None:
    """From now on this process (and every child it forks) starts a `forkable` command as a fork (tests/conftest.py
    calls it in every worker)."""
    subprocess.Popen = WarmPopen
