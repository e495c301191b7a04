"""The benchmark process for one database: ``python -m benchmarks.child MODE
CASES OUTPUT [--verbose]`` (the runner, ``python -m benchmarks``, starts it)."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def main(argv: list[str]) -> int:
    mode, cases, output = argv[:3]
    verbose = "--verbose" in argv
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from benchmarks.cases import CASES, FULL, QUICK

    for alias in settings.DATABASES:
        call_command("migrate", run_syncdb=True, verbosity=0, database=alias)
    sizes = FULL if mode == "full" else QUICK
    figures = []
    status = 0
    for case in cases.split(","):
        started = time.monotonic()
        try:
            found = CASES[case](sizes)
        except Exception:
            traceback.print_exc()
            found = [
                {
                    "figure": f"{case}: crashed",
                    "target": "",
                    "measured": 0,
                    "unit": "",
                    "passed": False,
                    "error": traceback.format_exc(limit=5),
                }
            ]
            status = 1
        seconds = time.monotonic() - started
        for item in found:
            item["case"] = case
            item["case_seconds"] = round(seconds, 1)
            summary = {k: item[k] for k in ("figure", "measured", "unit", "passed")}
            print(f"  {case} ({seconds:.1f} s): {summary}", flush=True)
            if verbose:
                print(json.dumps(item, indent=1, default=str)[:3000], flush=True)
        figures.extend(found)
        with open(output, "w") as handle:
            json.dump(figures, handle, indent=1, default=str)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
