"""Long subprocess checks (GPU compiles: triton.compile + ptxas, nvcc) start as soon as the
tests are collected and run, niced, on the core that the interpreter-bound tests leave idle;
each test then waits for its own job.

A test opts in with ``@pytest.mark.background.with_args(job)`` (``with_args``: a lone
callable argument would be taken for the decorated function): ``job(**params)`` gets the test's
parameters and returns ``Job`` (or None: nothing to start, the test decides why). The test
takes the ``background_result`` fixture and calls it for the finished job's ``Result``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional


@dataclass
class Job:
    command: List[str]
    env: Dict[str, str] = field(default_factory=lambda: dict(os.environ))
    # variables set to paths in the job's scratch directory (kept until the session ends)
    scratch_env: Dict[str, str] = field(default_factory=dict)
    cwd: Optional[str] = None
    timeout_s: float = 900


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    scratch: Path


class _Running:
    def __init__(self, job: Job):
        self.job = job
        self.dir = tempfile.mkdtemp(prefix="fused_mbconv_bg_")
        self.out = open(os.path.join(self.dir, "stdout"), "w+")
        self.err = open(os.path.join(self.dir, "stderr"), "w+")
        env = dict(job.env, **{name: os.path.join(self.dir, relative)
                               for name, relative in job.scratch_env.items()})
        self.proc = subprocess.Popen(job.command, env=env, cwd=job.cwd, stdout=self.out,
                                     stderr=self.err, text=True,
                                     preexec_fn=lambda: os.nice(10))

    def wait(self) -> Result:
        try:
            code = self.proc.wait(timeout=self.job.timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        outputs = []
        for f in (self.out, self.err):
            f.seek(0)
            outputs.append(f.read())
        return Result(code, *outputs, Path(self.dir))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.out.close()
        self.err.close()
        shutil.rmtree(self.dir, ignore_errors=True)


_running: Dict[str, Optional[_Running]] = {}


def start(nodeid: str, job: Optional[Job]) -> None:
    _running[nodeid] = _Running(job) if job is not None else None


def result(nodeid: str) -> Optional[Result]:
    running = _running.get(nodeid)
    return None if running is None else running.wait()


def stop_all() -> None:
    for running in _running.values():
        if running is not None:
            running.close()
    _running.clear()
