"""A helper process spoken to in JSON lines: the tests that run trainer ranks and receivers as
processes of their own (each a script under tests/helpers) send it commands on stdin and read its
answers from stdout, each a JSON object on one line, with a deadline; its stderr is kept for the
failure message."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, ClassVar


class JsonLinesProcess:
    """`python <script> <args>`; subclasses name the script and how long an answer may take."""

    script: ClassVar[Path]
    answer_timeout: ClassVar[float] = 60.0

    def __init__(self, *args: str):
        self.process = subprocess.Popen([sys.executable, str(self.script), *args], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.errors: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.errors.extend(self.process.stderr or ()), daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout or ():
            self.lines.put(json.loads(line))

    def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def next(self, timeout: float | None = None) -> dict[str, Any]:
        timeout = self.answer_timeout if timeout is None else timeout
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no answer within {timeout}s (exit {self.process.poll()}): "
                                 f"{''.join(self.errors)[-3000:]}") from None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
