"""Run mutmut on a seeded, stratified sample of the core's mutants (or on all of them).

The whole core is ~7800 mutants, 3-4 h on 2 cores; a 10% sample drawn per module estimates its
score within a few points in ~30 min (random mutant sampling: the score of a uniform sample is
an unbiased estimate of the whole's). The sample is a function of the seed and of the mutants
that exist, so two runs of one commit with one seed test the same mutants:

    python scripts/mutate.py                          # 10% of every module, seed 0
    python scripts/mutate.py --sample 1               # every mutant of the core
    python scripts/mutate.py 'sftlens.run.*'          # every mutant of run.py (patterns: all)
    python scripts/mutate.py --sample 0.3 'sftlens.tuning.*' --seed 2
    python scripts/mutate.py --rerun                  # again, the sample's survivors too

It first generates the mutants exactly as `mutmut run` does (the same mutmut functions, so
`mutmut run` then finds them up to date), writes the chosen names to mutants/sample.txt, and runs
`mutmut run <names>` on those without a result yet: a rerun resumes, and a function whose source
changed has its results reset by mutmut's generation, so its mutants run again. `--rerun` also
retests the sample's survivors (after writing tests for them). Then
`python scripts/mutation_score.py --sample mutants/sample.txt` reports the sample.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_FILE = Path("mutants") / "sample.txt"


def module_of(name: str) -> str:
    """sftlens.metrics.geometry.x_linear_cka__mutmut_12 -> sftlens.metrics.geometry"""
    return name.partition("__mutmut_")[0].rpartition(".")[0]


def check_fraction(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise ValueError(
            f"--sample must be in (0, 1], got {fraction}: 0.1 tests 10% of each module"
        )


def choose(
    names: list[str], fraction: float, seed: int, patterns: list[str] | None = None
) -> list[str]:
    """The names matching ``patterns`` (all when none), then ``fraction`` of each module's,
    at least one per module, drawn by a generator seeded with ``seed`` and the module's name
    (so adding a module leaves the others' draws alone). Sorted, so the result does not depend
    on the order ``names`` came in.

    >>> names = [f"m.a.x_f__mutmut_{i}" for i in range(1, 21)] + ["m.b.x_g__mutmut_1"]
    >>> picked = choose(names, 0.1, seed=0)
    >>> len(picked), sum(n.startswith("m.b.") for n in picked)
    (3, 1)
    >>> picked == choose(list(reversed(names)), 0.1, seed=0) != choose(names, 0.1, seed=1)
    True
    >>> choose(names, 1.0, 0, ["m.b.*"])
    ['m.b.x_g__mutmut_1']
    """
    check_fraction(fraction)
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    by_module: dict[str, list[str]] = defaultdict(list)
    for name in sorted(set(names)):
        by_module[module_of(name)].append(name)
    picked: list[str] = []
    for module, members in sorted(by_module.items()):
        k = len(members) if fraction == 1 else max(1, round(fraction * len(members)))
        picked += random.Random(f"{seed}:{module}").sample(members, k)
    return sorted(picked)


def generate() -> dict[str, int | None]:
    """Generate (or update) ./mutants as `mutmut run` does; every mutant's current exit code."""
    from mutmut.__main__ import (
        copy_also_copy_files,
        copy_src_dir,
        create_mutants,
        store_lines_covered_by_tests,
    )
    from mutmut.configuration import config
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.utils.file_utils import walk_mutatable_files

    config()
    Path("mutants").mkdir(exist_ok=True)
    copy_src_dir()
    copy_also_copy_files()
    store_lines_covered_by_tests()
    create_mutants(os.cpu_count() or 2)
    codes: dict[str, int | None] = {}
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        codes.update(data.exit_code_by_key)
    return codes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("patterns", nargs="*", help="mutant name patterns (fnmatch); default all")
    parser.add_argument(
        "--sample",
        type=float,
        default=None,
        help="fraction of each module's mutants (default 0.1, or 1 when patterns are given)",
    )
    parser.add_argument("--seed", type=int, default=0, help="which sample (default 0)")
    parser.add_argument("--rerun", action="store_true", help="retest the sample's survivors too")
    parser.add_argument("--dry-run", action="store_true", help="write the sample, run nothing")
    args = parser.parse_args(argv)
    fraction = args.sample if args.sample is not None else (1.0 if args.patterns else 0.1)
    try:
        check_fraction(fraction)
    except ValueError as e:
        parser.error(str(e))
    os.chdir(ROOT)

    codes = generate()
    picked = choose(list(codes), fraction, args.seed, args.patterns)
    if not picked:
        print(f"no mutant matches {' '.join(args.patterns)}", file=sys.stderr)
        return 2
    SAMPLE_FILE.write_text("".join(f"{n}\n" for n in picked))
    from mutmut.stats import status_by_exit_code

    def pending(name: str) -> bool:
        code = codes[name]
        return code is None or (args.rerun and status_by_exit_code[code] == "survived")

    todo = [n for n in picked if pending(n)]
    print(
        f"sample: {len(picked)} of {len(codes)} mutants ({fraction:g} of each module, "
        f"seed {args.seed}) in {SAMPLE_FILE}; {len(todo)} to run, "
        f"{len(picked) - len(todo)} with a result already"
    )
    if args.dry_run or not todo:
        return 0
    mutmut = Path(sys.executable).with_name("mutmut")
    return subprocess.call([str(mutmut), "run", *todo])


if __name__ == "__main__":
    raise SystemExit(main())
