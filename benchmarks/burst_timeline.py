"""Where a served burst's requests spent their way in, read from a `serve run` log.

    python benchmarks/burst_timeline.py serve.log          # tools/device_e2e.sh leaves it in $OUT

Ray Serve logs every call a replica finishes (`... vlm_ImagePreprocessor <replica> <request id> --
CALL process OK 12.3ms`), so each call's start is its line's time less its duration; the model
replica also logs each batch it hands to the engine ("Admitting a batch: batch_size=N"). Per burst
(requests whose model calls began within 0.5 s of each other; bursts smaller than `--min-size` are
skipped) this prints, in seconds after the burst's first model call began, when the ingress began
the requests, when their images were preprocessed, when the model replica's `generate` began, and
when it admitted them to the engine. Run with RAY_DEDUP_LOGS=0 (tools/device_env.sh sets it), or
Ray folds the replicas' repeated lines into one.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

_CALL = re.compile(r"(\d\d:\d\d:\d\d,\d+) vlm_(\w+) \w+ ([0-9a-f-]{36}) -- (?:CALL \w+|POST \S+) (?:OK|200) ([\d.]+)ms")
_ADMIT = re.compile(r"(\d\d:\d\d:\d\d,\d+) vlm_VLMServer \w+ -- Admitting a batch: batch_size=(\d+)")


@dataclass(frozen=True)
class Call:
    deployment: str
    request_id: str
    start: float
    end: float


def _seconds(stamp: str) -> float:
    return datetime.strptime(stamp, "%H:%M:%S,%f").timestamp()


def parse(lines: list[str]) -> tuple[list[Call], list[tuple[float, int]]]:
    calls, admissions = [], []
    for line in lines:
        if match := _CALL.search(line):
            end = _seconds(match.group(1))
            calls.append(Call(match.group(2), match.group(3), end - float(match.group(4)) / 1e3, end))
        elif match := _ADMIT.search(line):
            admissions.append((_seconds(match.group(1)), int(match.group(2))))
    return calls, admissions


def bursts(calls: list[Call], min_size: int) -> list[list[Call]]:
    model = sorted((c for c in calls if c.deployment == "VLMServer"), key=lambda c: c.start)
    groups: list[list[Call]] = []
    for call in model:
        if groups and call.start - groups[-1][-1].start <= 0.5:
            groups[-1].append(call)
        else:
            groups.append([call])
    return [g for g in groups if len(g) >= min_size]


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    values = sorted(values)
    return f"{values[0]:.3f} .. {statistics.median(values):.3f} .. {values[-1]:.3f} ({len(values)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", type=Path)
    parser.add_argument("--min-size", type=int, default=8, help="skip bursts of fewer requests")
    args = parser.parse_args(argv)
    calls, admissions = parse(args.log.read_text(errors="replace").splitlines())
    for number, burst in enumerate(bursts(calls, args.min_size), 1):
        t0, ids = burst[0].start, {c.request_id for c in burst}
        mine = [c for c in calls if c.request_id in ids]
        print(f"burst {number}: {len(burst)} requests (seconds after the first model call began; first .. median .. last)")
        for name, label in (("Ingress", "ingress began"), ("ImagePreprocessor", "image preprocessing began"),
                            ("ImagePreprocessor", "image preprocessing ended"), ("VLMServer", "model generate began")):
            times = [(c.end if label.endswith("ended") else c.start) - t0 for c in mine if c.deployment == name]
            print(f"  {label:<28}{_spread(times)}")
        admitted = [(t - t0, n) for t, n in admissions if -0.1 < t - t0 < burst[-1].end - t0]
        print(f"  {'admitted to the engine':<28}" + ", ".join(f"{n} at {t:.3f}" for t, n in admitted))
        print(f"  {'model generate ended':<28}{_spread([c.end - t0 for c in burst])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
