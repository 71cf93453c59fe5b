"""Compare Parsl's test suite run with BasicMemoizer and with ParslMemoizer.

Usage: python compare.py [--differences OUT] PASS BASIC.json AIOMEMO.json [PASS ...]
       python compare.py --merge RUN.json RERUN.json

Each JSON file is written by ``aiomemo_parsl_plugin`` (``AIOMEMO_PARSL_OUTCOMES``)
for one pass of ``scripts/parsl-suite``. The check, test for test:

* every test has the same outcome under both memoizers, except the tests in
  ``aiomemo_parsl_plugin.EXEMPT`` (deselected under ParslMemoizer: they read
  Parsl's pickle checkpoint format);
* a test that fails (or errors) under both is listed in :data:`ENVIRONMENTAL`
  with the reason it cannot pass on this machine; an unlisted one fails the
  comparison, since a failure shared by both memoizers still hides whatever
  the test was meant to show;
* every DataFlowKernel of the ParslMemoizer run did run a ParslMemoizer, and
  the baseline run passed at least one test (an empty run proves nothing).

Exit status 0 when every pass agrees, 1 otherwise; one line per finding.

A test whose outcome differs, or that fails under both without being listed,
may be flaky (Parsl's suite has timing tests):
``--differences OUT`` writes ``PASS<TAB>NODE`` for each such test;
``scripts/parsl-suite`` runs those tests once more under both memoizers and
``--merge`` folds the rerun's outcomes into the first run's file (the first
outcome is kept under ``first_outcomes``), so the second comparison decides
and names each test that only agreed on the rerun as flaky.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from typing import Any

from aiomemo_parsl_plugin import EXEMPT

#: Parsl tests that fail under BasicMemoizer and ParslMemoizer alike on this
#: kind of machine, for reasons that have nothing to do with memoization.
#: Node ids relative to the parsl package directory, matched as suffixes.
ENVIRONMENTAL: dict[str, str] = {
    "tests/test_bash_apps/test_stdout.py::test_bad_stdout_file": (
        "expects BadStdStreamFile for stdout='/bad/dir/t2.out'; the suite runs as root "
        "here (CI too), so the directory is created and the app succeeds (Parsl marks "
        "the test unix_filesystem_permissions_required)"
    ),
    "tests/test_bash_apps/test_stdout.py::test_bad_stderr_file": (
        "same as test_bad_stdout_file, for stderr='/bad/dir/t2.err': root can create "
        "/bad/dir (unix_filesystem_permissions_required)"
    ),
}

FAILING = {"failed", "error", "collect-error", "xpassed"}

#: node ids whose outcomes differed in the last compare() call
differing: list[str] = []


def merge(run_path: str, rerun_path: str) -> None:
    """Fold a rerun's outcomes into a run's outcome file (the first outcomes are kept)."""
    with open(run_path) as f:
        run = json.load(f)
    with open(rerun_path) as f:
        rerun = json.load(f)
    first = run.setdefault("first_outcomes", {})
    for node, outcome in rerun["outcomes"].items():
        if node in run["outcomes"] and node not in first:
            first[node] = run["outcomes"][node]
        run["outcomes"][node] = outcome
    run["dfk_memoizers"] = run.get("dfk_memoizers", []) + rerun.get("dfk_memoizers", [])
    with open(run_path, "w") as f:
        json.dump(run, f, indent=1)


def _match(node: str, table: dict[str, Any]) -> str | None:
    return next((k for k in table if node.endswith(k)), None)


def compare(name: str, basic: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """Problems found in one pass (empty: the pass agrees)."""
    problems: list[str] = []
    differing.clear()
    b: dict[str, str] = basic["outcomes"]
    a: dict[str, str] = ours["outcomes"]
    if basic.get("memoizer") != "basic" or ours.get("memoizer") != "aiomemo":
        problems.append(
            f"{name}: expected a basic and an aiomemo run, got "
            f"{basic.get('memoizer')!r} and {ours.get('memoizer')!r}"
        )
    dfks = ours.get("dfk_memoizers", [])
    if not dfks:
        problems.append(f"{name}: the ParslMemoizer run started no DataFlowKernel")
    elif any(m != "ok" for m in dfks):
        problems.append(f"{name}: DataFlowKernels ran other memoizers: {sorted(set(dfks))}")
    counts = Counter(b.values())
    if counts["passed"] == 0:
        problems.append(f"{name}: the BasicMemoizer run passed no test")

    env_hit: list[str] = []
    exempt_hit: list[str] = []
    for node in sorted(set(a) | set(b)):
        ob, oa = b.get(node, "absent"), a.get(node, "absent")
        if _match(node, EXEMPT) is not None and oa in ("deselected", "absent"):
            if ob not in ("deselected", "absent"):
                exempt_hit.append(node)
            continue
        if ob != oa:
            problems.append(f"{name}: {node}: BasicMemoizer {ob}, ParslMemoizer {oa}")
            differing.append(node)
        elif ob in FAILING:
            if _match(node, ENVIRONMENTAL) is None:
                problems.append(
                    f"{name}: {node}: {ob} under both memoizers and not listed in "
                    "tests/parsl_harness/compare.py ENVIRONMENTAL"
                )
                differing.append(node)  # run again too: it may be a flaky test
            else:
                env_hit.append(node)
    ran = sum(1 for o in b.values() if o not in ("deselected", "absent"))
    print(
        f"parsl-suite compare: {name}: {ran} tests, both passed "
        f"{sum(1 for n, o in b.items() if o == 'passed' and a.get(n) == 'passed')}, "
        f"both skipped {sum(1 for n, o in b.items() if o == 'skipped' and a.get(n) == 'skipped')}, "
        f"environmental failures {len(env_hit)}, exempt {len(exempt_hit)}, "
        f"differences {len(problems)}"
    )
    first_b = basic.get("first_outcomes", {})
    first_a = ours.get("first_outcomes", {})
    for node in sorted(set(first_b) | set(first_a)):
        if b.get(node) != a.get(node) or (
            b.get(node) in FAILING and _match(node, ENVIRONMENTAL) is None
        ):
            continue  # differed, or failed under both, again: reported as a DIFFERENCE
        print(
            f"  FLAKY (agreed only when run again): {node}: first BasicMemoizer "
            f"{first_b.get(node, b.get(node))}, ParslMemoizer {first_a.get(node, a.get(node))}; "
            f"again: {b.get(node)} / {a.get(node)}"
        )
    for node in env_hit:
        key = _match(node, ENVIRONMENTAL)
        assert key is not None
        print(f"  environmental: {node}: {ENVIRONMENTAL[key]}")
    return problems


def main(argv: list[str]) -> int:
    if argv[:1] == ["--merge"] and len(argv) == 3:
        merge(argv[1], argv[2])
        return 0
    out = None
    if argv[:1] == ["--differences"] and len(argv) >= 2:
        out, argv = argv[1], argv[2:]
    if not argv or len(argv) % 3:
        print(__doc__, file=sys.stderr)
        return 2
    problems: list[str] = []
    diffs: list[str] = []
    for i in range(0, len(argv), 3):
        differing.clear()
        name, bpath, apath = argv[i : i + 3]
        try:
            with open(bpath) as f:
                basic = json.load(f)
            with open(apath) as f:
                ours = json.load(f)
        except (OSError, ValueError) as exc:
            problems.append(f"{name}: cannot read the outcome files: {exc}")
            continue
        problems += compare(name, basic, ours)
        diffs += [f"{name}\t{node}" for node in differing]
    if out is not None:
        with open(out, "w") as f:
            f.write("".join(d + "\n" for d in diffs))
    for p in problems:
        print(f"  DIFFERENCE {p}")
    verdict = "agree" if not problems else f"disagree ({len(problems)} finding(s))"
    print(f"parsl-suite compare: BasicMemoizer and ParslMemoizer {verdict}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
