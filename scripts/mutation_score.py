"""Print the score of the last `mutmut run` per module, then the mutants that need attention.

Reads mutmut 3's result files under ./mutants (one `<source>.py.meta` JSON per mutated file,
mapping each mutant to the exit code of its test run) for the files `[tool.mutmut]` in
pyproject.toml selects, so it agrees with `mutmut results`. Run it from anywhere:

    python scripts/mutation_score.py                 # table, survivors, untested functions
    python scripts/mutation_score.py --markdown      # the same as Markdown (mutation/baseline.md)
    python scripts/mutation_score.py --sample mutants/sample.txt   # a sample (scripts/mutate.py)

score = (killed + timeout) / total. A timeout counts as caught: the mutant made a test hang.
With --sample, only the named mutants count, and the last line estimates the whole core's score
from them, with a 95% Wilson interval (each module weighted by its share of all mutants).
"equivalent" counts the survivors that mutation/equivalent.md answers (they stay in "survived").
Survivors named in mutation/equivalent.md (`- <mutant name>: <reason>`) are listed apart as
judged equivalent; an entry whose mutant no longer survives, or no longer exists, is reported
as stale so that its reason gets checked again. `mutmut show <mutant name>` prints a full diff.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT = ROOT / "mutation" / "equivalent.md"
CAUGHT = ("killed", "timeout")
NOT_RUN = ("not checked", "check was interrupted by user", "skipped")
COLUMNS = ("killed", "timeout", "survived", "equivalent", "no tests", "other")
_ENTRY = re.compile(r"^\s*[-*]\s+`?([\w.ǁ]+__mutmut_\d+)`?\s*:\s*(.+?)\s*$")


@dataclass
class Mutant:
    name: str  # sftlens.metrics.geometry.x_linear_cka__mutmut_12
    module: str  # sftlens.metrics.geometry
    path: str  # src/sftlens/metrics/geometry.py
    status: str
    line: int = 0  # first changed source line, when a diff was read
    old: str = ""
    new: str = ""
    kind: str = ""

    @property
    def function(self) -> str:
        mangled = self.name.partition("__mutmut_")[0].rpartition(".")[2]
        return mangled[2:] if mangled.startswith("x_") else mangled[2:].replace("ǁ", ".")

    @property
    def number(self) -> str:
        return self.name.rpartition("__mutmut_")[2]


def load(with_diffs: bool) -> list[Mutant]:
    """Every mutant of the selected files, with its status (and first diff line if asked)."""
    from mutmut.configuration import config
    from mutmut.stats import status_by_exit_code
    from mutmut.utils.file_utils import walk_mutatable_files

    config()  # read [tool.mutmut] from ./pyproject.toml
    mutants: list[Mutant] = []
    for path in walk_mutatable_files():
        meta = Path("mutants") / f"{path}.meta"
        if not meta.is_file():
            continue
        codes = _read_json(meta)["exit_code_by_key"]
        for name, code in codes.items():
            module = name.partition("__mutmut_")[0].rpartition(".")[0]
            mutants.append(Mutant(name, module, str(path), status_by_exit_code[code]))
    if with_diffs:
        _add_diffs([m for m in mutants if m.status == "survived"])
    return mutants


def _read_json(path: Path) -> dict:
    """mutmut rewrites a .meta file in place after each mutant: retry a torn read."""
    for attempt in range(10):
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            if attempt == 9:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def _function_starts(path: str) -> dict[str, int]:
    """First source line (decorators included) of each function and method, by mangled name."""
    starts: dict[str, int] = {}
    tree = ast.parse(Path(path).read_text())

    def visit(body: list[ast.stmt], cls: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                key = f"xǁ{cls}ǁ{node.name}" if cls else f"x_{node.name}"
                starts[key] = min([node.lineno] + [d.lineno for d in node.decorator_list])
            elif isinstance(node, ast.ClassDef):
                visit(node.body, f"{cls}.{node.name}" if cls else node.name)

    visit(tree.body, "")
    return starts


def _add_diffs(mutants: list[Mutant]) -> None:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    starts: dict[str, dict[str, int]] = {}
    for m in mutants:
        if m.path not in starts:
            starts[m.path] = _function_starts(m.path)
        diff = get_diff_for_mutant(m.name, path=m.path).splitlines()
        hunk = next((d for d in diff if d.startswith("@@")), "")
        match = re.match(r"@@ -(\d+)", hunk)
        first = int(match.group(1)) if match else 1
        body = diff[diff.index(hunk) + 1 :] if hunk else []
        offset = next((i for i, d in enumerate(body) if d[:1] in "-+"), 0)
        removed = [d[1:].strip() for d in body if d.startswith("-")]
        added = [d[1:].strip() for d in body if d.startswith("+")]
        start = starts[m.path].get(m.name.partition("__mutmut_")[0].rpartition(".")[2], 1)
        m.line = start + first - 1 + offset
        m.old, m.new = " / ".join(removed), " / ".join(added)
        m.kind = _kind(m.old, m.new)


def _kind(old: str, new: str) -> str:
    """A rough class of the change, for grouping survivors (not a judgement)."""
    if ("XX" in new and "XX" not in old) or (old != new and old.lower() == new.lower()):
        return "string"
    if re.sub(r"\d+(\.\d+)?", "0", old) == re.sub(r"\d+(\.\d+)?", "0", new):
        return "number"
    if new.count("None") > old.count("None"):
        return "None"
    if new.count(",") < old.count(",") or ", )" in new or "(, " in new:
        return "argument removed"
    return "operator/name/keyword"


def read_equivalent(path: Path) -> dict[str, str]:
    """The reasons in ``path``, and in its siblings ``<stem>-*.md`` (one file per module group,
    e.g. mutation/equivalent-tuning.md, so that parallel edits do not collide)."""
    reasons: dict[str, str] = {}
    for file in [path, *sorted(path.parent.glob(f"{path.stem}-*.md"))]:
        if not file.is_file():
            continue
        for line in file.read_text().splitlines():
            match = _ENTRY.match(line)
            if match:
                reasons[match.group(1)] = match.group(2)
    return reasons


def table(mutants: list[Mutant], reasons: dict[str, str]) -> list[tuple[str, Counter[str]]]:
    """Counts per module; "equivalent" counts the survivors with a reason (also in "survived")."""
    by_module: dict[str, Counter[str]] = defaultdict(Counter)
    for m in mutants:
        column = m.status if m.status in COLUMNS else "other"
        by_module[m.module][column] += 1
        by_module[m.module]["equivalent"] += m.status == "survived" and m.name in reasons
        by_module[m.module]["total"] += 1
    rows = sorted(by_module.items())
    total: Counter[str] = Counter()
    for _, c in rows:
        total.update(c)
    return [*rows, ("TOTAL", total)]


def score(c: Counter[str]) -> str:
    caught = sum(c[k] for k in CAUGHT)
    return f"{caught}/{c['total']} = {100 * caught / c['total']:.1f}%" if c["total"] else "-"


def wilson(caught: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``caught / n``.

    >>> [round(x, 3) for x in wilson(80, 100)]
    [0.711, 0.867]
    >>> wilson(0, 0)
    (0.0, 1.0)
    """
    if n == 0:
        return 0.0, 1.0
    p = caught / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return centre - half, centre + half


def estimate(
    sampled: list[Mutant], population: Counter[str], equivalent: frozenset[str] = frozenset()
) -> str:
    """The whole core's score estimated from a sample stratified by module: each module's
    sampled score weighted by its number of mutants; the interval is Wilson's on the pooled
    sample (the strata are drawn in proportion, so the pooled sample is nearly self-weighting).
    Then the same with the survivors judged ``equivalent`` set aside (they are not defects)."""

    def weighted(drop: frozenset[str]) -> tuple[float, int, int, int, int]:
        """(estimate, caught, run, mutants of the modules run, modules run)"""
        ran = [m for m in sampled if m.status not in NOT_RUN and m.name not in drop]
        caught_by = Counter(m.module for m in ran if m.status in CAUGHT)
        run_by = Counter(m.module for m in ran)
        total = sum(population[mod] for mod in run_by)
        value = sum(population[mod] * caught_by[mod] / run_by[mod] for mod in run_by) / (total or 1)
        return value, sum(caught_by.values()), len(ran), total, len(run_by)

    value, caught, n, total, modules = weighted(frozenset())
    if not n:
        return "no sampled mutant has run yet"
    low, high = wilson(caught, n)
    text = (
        f"estimated score of the {total} mutants of the {modules} modules sampled: "
        f"{100 * value:.1f}% (95% interval {100 * low:.1f}-{100 * high:.1f}%, from {n} run)"
    )
    dropped = frozenset(m.name for m in sampled if m.status == "survived" and m.name in equivalent)
    if dropped:
        value, caught, n, _, _ = weighted(dropped)
        low, high = wilson(caught, n)
        text += (
            f"; {100 * value:.1f}% ({100 * low:.1f}-{100 * high:.1f}%) with the "
            f"{len(dropped)} survivors judged equivalent set aside"
        )
    return text


def report(
    mutants: list[Mutant], reasons: dict[str, str], markdown: bool, names: bool = False
) -> str:
    out: list[str] = []
    head = ("module", *COLUMNS, "total", "score")
    rows = [
        (mod, *(str(c[k]) for k in (*COLUMNS, "total")), score(c))
        for mod, c in table(mutants, reasons)
    ]
    if markdown:
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        for r in [head, *rows]:
            out.append(
                "  ".join(
                    v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))
                )
            )

    survivors = [m for m in mutants if m.status == "survived"]
    todo = [m for m in survivors if m.name not in reasons]
    equivalent = [m for m in survivors if m.name in reasons]
    status = {m.name: m.status for m in mutants}
    stale = {n: status.get(n, "no such mutant") for n in reasons if status.get(n) != "survived"}

    def line(m: Mutant) -> str:
        where = f"{m.path}:{m.line}" if m.line else m.path
        change = f" [{m.kind}] `{m.old}` -> `{m.new}`" if m.line else ""
        name = f" {m.name}" if names else ""
        return f"- {m.function} #{m.number}{name} ({where}){change}"

    out += ["", f"Survivors to answer (a test, or a reason in mutation/equivalent.md): {len(todo)}"]
    for module in sorted({m.module for m in todo}):
        out += ["", f"{module}:" if not markdown else f"### {module}"]
        here = [m for m in todo if m.module == module]
        out += [line(m) for m in sorted(here, key=lambda m: (m.line, m.function, int(m.number)))]
    out += ["", f"Survivors judged equivalent (mutation/equivalent.md): {len(equivalent)}"]
    out += [f"{line(m)}: {reasons[m.name]}" for m in equivalent]
    if stale:
        out += ["", "Stale entries in mutation/equivalent.md (recheck them):"]
        out += [f"- {n}: now {s}" for n, s in sorted(stale.items())]
    untested: Counter[str] = Counter(
        f"{m.module}.{m.function}" for m in mutants if m.status == "no tests"
    )
    if untested:
        out += ["", "Functions that no selected test reaches (mutants):"]
        out += [f"- {f} ({n})" for f, n in sorted(untested.items())]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print Markdown")
    parser.add_argument("--no-diff", action="store_true", help="skip the changed line per survivor")
    parser.add_argument("--equivalent", type=Path, default=EQUIVALENT, help="survivor reasons")
    parser.add_argument("--names", action="store_true", help="print each survivor's mutmut name")
    parser.add_argument(
        "--sample", type=Path, help="count only the mutants named in this file (one per line)"
    )
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    if not Path("mutants").is_dir():
        print("no ./mutants folder: run `make mutate` first", file=sys.stderr)
        return 2
    mutants = load(with_diffs=not args.no_diff)
    if not mutants:
        print("no mutmut results under ./mutants: run `make mutate` first", file=sys.stderr)
        return 2
    reasons = read_equivalent(args.equivalent)
    if args.sample is None:
        print(report(mutants, reasons, args.markdown, args.names))
        return 0
    wanted = set(args.sample.read_text().split())
    population = Counter(m.module for m in mutants)
    sampled = [m for m in mutants if m.name in wanted]
    if not sampled:
        print(f"no mutant of {args.sample} exists under ./mutants", file=sys.stderr)
        return 2
    reasons = {n: r for n, r in reasons.items() if n in wanted}
    print(report(sampled, reasons, args.markdown, args.names))
    print("\n" + estimate(sampled, population, frozenset(reasons)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
