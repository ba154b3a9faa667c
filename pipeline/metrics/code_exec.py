"""Sandboxed execution of generated code: pass@1 against a task's unit tests.

Generated code is untrusted. It never runs inside the pipeline's process: each program runs
in a fresh ``python -I`` child with

- a wall-clock timeout (the whole process group is killed when it passes),
- ``RLIMIT_AS`` (address space), ``RLIMIT_CPU`` (CPU seconds), ``RLIMIT_FSIZE`` (largest
  file it may write), ``RLIMIT_CORE`` = 0 and ``RLIMIT_NPROC`` = 0 (it cannot fork or
  start threads; a root user is exempt from this one),
- a temporary working directory that is deleted afterwards (also its ``HOME``),
- a minimal environment built from scratch (``PATH``, ``LANG``, ``HOME``, ``TMPDIR``): no
  variable of the parent (tokens, keys, credentials) is inherited,
- isolated mode (``-I``): no ``PYTHON*`` variables, no user site, no script folder on
  ``sys.path``,
- when the pipeline runs as root, the child drops to user ``nobody`` (no supplementary
  groups) before it starts: it cannot write outside its folder or read root-only files.
  If nobody cannot reach this interpreter (a pyenv under /root), the system ``python3``
  runs the program instead (generated code needs only the standard library).

Not covered (documented in docs/quality.md): network access and the file system outside
the working folder are not blocked (that needs namespaces or a container).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the defaults: enough for the shipped tasks' tests, far below what could hurt the machine
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 512
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


@dataclass(frozen=True)
class ExecResult:
    """How one program ended: ``status`` is passed, failed (an exception, a failed assert),
    timeout (wall clock or CPU limit), memory (the address-space limit) or error (it could
    not be started); ``detail`` is the tail of its stderr."""

    status: str
    returncode: int | None
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def extract_code(text: str) -> str:
    """The code in a generation: the first fenced block (```python ... ```, an unclosed
    fence runs to the end), else the text itself."""
    m = _FENCE.search(text)
    code = m.group(1) if m else text
    return code.strip("\n") + "\n"


#: the user a root pipeline runs generated code as (``nobody``)
NOBODY = 65534


#: runs first in the child: sets the limits (soft = hard, so they cannot be raised again),
#: then replaces itself with the candidate's interpreter (limits survive exec). No
#: ``preexec_fn``: that is unsafe in a parent with threads (the RSS sampler, torch's).
_BOOTSTRAP = """\
import os, resource, sys
mem, cpu = int(sys.argv[1]), int(sys.argv[2])
for lim, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu),
                 (resource.RLIMIT_FSIZE, 16 * 2**20), (resource.RLIMIT_CORE, 0),
                 (resource.RLIMIT_NPROC, 0)):
    resource.setrlimit(lim, (val, val))
os.execv(sys.executable, [sys.executable, "-I", "-B", sys.argv[3]])
"""


def _reachable_by_others(path: str) -> bool:
    """Whether a user with no privileges can run ``path``: every folder above it, and
    above the file it links to, is searchable and the file readable and executable by
    others (a venv's ``bin/python`` in a root-only folder links to a reachable system
    Python, yet cannot be run through the link)."""
    import stat

    given = Path(os.path.abspath(path))
    p = Path(os.path.realpath(path))
    try:
        if (p.stat().st_mode & (stat.S_IROTH | stat.S_IXOTH)) != (stat.S_IROTH | stat.S_IXOTH):
            return False
        return all(d.stat().st_mode & stat.S_IXOTH for d in (*given.parents, *p.parents))
    except OSError:
        return False


def interpreter(drop_privileges: bool) -> str:
    """The Python the child runs: this one, or, when privileges are dropped and ``nobody``
    cannot reach it (a pyenv under /root), the first system ``python3`` it can."""
    if not drop_privileges:
        return sys.executable
    base = getattr(sys, "_base_executable", sys.executable)
    for cand in (sys.executable, base, "/usr/bin/python3", "/usr/local/bin/python3"):
        if Path(cand).exists() and _reachable_by_others(cand):
            return cand
    raise RuntimeError("the pass@1 sandbox runs generated code as user nobody when the "
                       "pipeline runs as root, but no Python is executable by nobody "
                       f"({sys.executable} is not); install a system python3")


def minimal_env(workdir: str) -> dict[str, str]:
    """The child's whole environment: nothing is copied from this process."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
            "PYTHONDONTWRITEBYTECODE": "1"}


def run_sandboxed(program: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                  memory_mb: int = DEFAULT_MEMORY_MB, cpu_s: int | None = None) -> ExecResult:
    """Run ``program`` (Python source) in a limited child process; see the module doc.

    ``cpu_s`` defaults to the wall-clock timeout rounded up. Exit code 0 is a pass.
    """
    cpu = int(cpu_s if cpu_s is not None else max(1, -(-timeout_s // 1)))
    drop_to = NOBODY if os.geteuid() == 0 else None
    with tempfile.TemporaryDirectory(prefix="infersweep-sandbox-") as work:
        script = Path(work) / "candidate.py"
        script.write_text(program, encoding="utf-8")
        who: dict = {}
        if drop_to is not None:  # root: the child gives up every privilege before it starts
            os.chown(work, drop_to, drop_to)
            os.chown(script, drop_to, drop_to)
            who = {"user": drop_to, "group": drop_to, "extra_groups": []}
        # stderr goes to an unlinked file, never a pipe: the child's RLIMIT_FSIZE bounds
        # it, while a pipe read by communicate() would hold everything the program writes
        # in this process (a print loop: gigabytes within the timeout)
        with tempfile.TemporaryFile() as errf:
            try:
                python = interpreter(drop_to is not None)
                proc = subprocess.Popen(
                    [python, "-I", "-B", "-c", _BOOTSTRAP, str(memory_mb * 2**20), str(cpu),
                     str(script)], cwd=work, env=minimal_env(work),
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errf,
                    start_new_session=True, close_fds=True, **who,
                )
            except (OSError, RuntimeError) as e:
                return ExecResult("error", None, f"could not start: {e}")
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait()
                return ExecResult("timeout", proc.returncode, f"killed after {timeout_s:g} s")
            tail = _tail(errf)
        rc = proc.returncode
        if rc == 0:
            return ExecResult("passed", rc, tail)
        if rc == -signal.SIGXCPU or rc == -signal.SIGKILL:
            return ExecResult("timeout", rc, tail or f"CPU limit of {cpu} s")
        if "MemoryError" in tail:
            return ExecResult("memory", rc, tail)
        return ExecResult("failed", rc, tail)


def _tail(f: Any, chars: int = 2000) -> str:
    """The last ``chars`` characters of what the child wrote to ``f`` (read from the end:
    never more than a few KiB into memory)."""
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - 4 * chars))
    return f.read().decode("utf-8", "replace")[-chars:]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it started
    except ProcessLookupError:
        pass


def check_program(generation: str, tests: str) -> str:
    """The program a candidate is judged by: its extracted code, then the tests."""
    return f"{extract_code(generation)}\n\n# --- tests ---\n{tests}\n"


def pass_at_1(generations: list[str], tests: list[str], timeout_s: float = DEFAULT_TIMEOUT_S,
              memory_mb: int = DEFAULT_MEMORY_MB) -> list[ExecResult]:
    """Run each generation against its tests in the sandbox (one sample per task, so the
    mean of ``passed`` is pass@1)."""
    if len(generations) != len(tests):
        raise ValueError(f"{len(generations)} generations but {len(tests)} test sets")
    return [run_sandboxed(check_program(g, t), timeout_s=timeout_s, memory_mb=memory_mb)
            for g, t in zip(generations, tests, strict=True)]
