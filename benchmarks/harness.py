"""What the benchmark cases share: side-by-side timing, the ledger router, and the
loopback servers (moto's S3 API and a delaying TCP proxy) in processes of their own."""

from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class LedgerRouter:
    """Sends the ledger to the database named in ``target`` (the scale benchmark
    switches between a 1,000-row and a 1,000,000-row ledger); else to default."""

    target: str | None = None

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        return self.target

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return self.target

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool | None:
        return None


@contextmanager
def ledger_database(alias: str | None) -> Iterator[None]:
    LedgerRouter.target = alias
    try:
        yield
    finally:
        LedgerRouter.target = None


@dataclass
class SideBySide:
    """Times of the package's side (``subject``) and the floor (``floor``), one
    pair per round, taken in alternating order."""

    subject: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)

    def ratios(self) -> list[float]:
        """Per round: subject time / floor time (lower is better)."""
        return [s / f for s, f in zip(self.subject, self.floor, strict=True)]

    def paired_ratios(self) -> list[float]:
        """Per pair of rounds (subject first, then floor first): the geometric mean
        of their two ratios. On this machine whichever side ran first in a round
        of the drain was 20 to 40 % slower, for both sides alike; pairing the two
        orders cancels that. A last round without its pair counts alone."""
        ratios = self.ratios()
        pairs = [
            math.sqrt(ratios[i] * ratios[i + 1]) for i in range(0, len(ratios) - 1, 2)
        ]
        if len(ratios) % 2:
            pairs.append(ratios[-1])
        return pairs

    def median_ratio(self) -> float:
        return statistics.median(self.paired_ratios())

    def median_throughput(self) -> float:
        """floor time / subject time (higher is better): the median over pairs."""
        return statistics.median([1 / r for r in self.paired_ratios()])

    def as_dict(self) -> dict[str, Any]:
        return {
            "subject_seconds": [round(t, 6) for t in self.subject],
            "floor_seconds": [round(t, 6) for t in self.floor],
            "ratios": [round(r, 4) for r in self.ratios()],
            "paired_ratios": [round(r, 4) for r in self.paired_ratios()],
        }


def side_by_side(
    rounds: int,
    subject: Callable[[int], float],
    floor: Callable[[int], float],
) -> SideBySide:
    """Run ``rounds`` rounds of both, alternating which goes first; each callable
    gets the round number and returns the seconds its timed part took."""
    result = SideBySide()
    for number in range(rounds):
        if number % 2:
            floor_time = floor(number)
            subject_time = subject(number)
        else:
            subject_time = subject(number)
            floor_time = floor(number)
        result.subject.append(subject_time)
        result.floor.append(floor_time)
    return result


def settle() -> None:
    """Write dirty pages out. Before a timed part: so that one side's files are
    not written out on the other side's time. At its end, inside the timing: so
    that both sides pay for writing their files, since a database commit (an
    fsync) on ext4 writes out every file written before it, and a raw loop
    without commits would otherwise leave that work for after the clock stops."""
    os.sync()


def timed(func: Callable[[], Any]) -> tuple[float, Any]:
    settle()
    start = time.perf_counter()
    value = func()
    settle()
    return time.perf_counter() - start, value


def bench_dir() -> Path:
    path = Path(os.environ.get("QUEUED_STORAGE_BENCH_DIR", tempfile.gettempdir()))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=bench_dir()))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    return env


@contextmanager
def server_process(module: str, *args: str) -> Iterator[str]:
    """Run ``python -m module args``; it prints ``host:port`` on its first line
    once it listens. Yields that address and stops the process at the end."""
    process = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=_python_env(),
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"{module} did not start (exit {process.poll()})")
        yield line
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 API on 127.0.0.1 (a free port), in its own process so that its
    CPU time is not the benchmark's GIL time. Yields the endpoint URL."""
    with server_process("benchmarks.servers", "moto") as address:
        yield f"http://{address}"


@contextmanager
def latency_proxy(endpoint: str, delay: float) -> Iterator[str]:
    """A TCP proxy on 127.0.0.1 in front of ``endpoint`` that holds every chunk
    ``delay`` seconds each way: ``2 * delay`` of added round trip per request."""
    target = endpoint.removeprefix("http://")
    with server_process("benchmarks.servers", "proxy", target, str(delay)) as address:
        yield f"http://{address}"


S3_CREDENTIALS: dict[str, Any] = {
    "access_key": "testing",
    "secret_key": "testing",
    "region_name": "us-east-1",
    "addressing_style": "path",
}


def make_bucket(endpoint: str) -> str:
    import boto3

    name = f"bench-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=name)
    return name


def s3_options(endpoint: str, bucket: str, **extra: Any) -> dict[str, Any]:
    return {
        **S3_CREDENTIALS,
        "endpoint_url": endpoint,
        "bucket_name": bucket,
        **extra,
    }
