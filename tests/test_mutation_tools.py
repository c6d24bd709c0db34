"""scripts/mutate.py (the sample `make mutate` tests) and scripts/mutation_score.py's estimate.

The scripts are not part of the package; they are loaded from their files. No mutmut run here.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest
from scipy.stats import binomtest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


mutate = _load("mutate")
score = _load("mutation_score")


def _names(module: str, n: int) -> list[str]:
    return [f"{module}.x_f__mutmut_{i}" for i in range(1, n + 1)]


def test_the_sample_is_stratified_proportional_and_at_least_one_per_module():
    names = _names("pkg.big", 400) + _names("pkg.mid", 55) + _names("pkg.tiny", 3)
    picked = mutate.choose(names, 0.1, seed=0)
    per_module = Counter(mutate.module_of(n) for n in picked)
    assert per_module == {"pkg.big": 40, "pkg.mid": 6, "pkg.tiny": 1}
    assert set(picked) <= set(names) and len(set(picked)) == len(picked)


def test_the_sample_depends_on_the_seed_not_on_the_order_or_on_other_modules():
    names = _names("pkg.a", 200) + _names("pkg.b", 200)
    first = mutate.choose(names, 0.1, seed=0)
    assert first == mutate.choose(names[::-1], 0.1, seed=0)
    assert first != mutate.choose(names, 0.1, seed=1)
    # a module added (or changed) elsewhere leaves this module's draw alone
    grown = mutate.choose(names + _names("pkg.c", 50), 0.1, seed=0)
    assert [n for n in grown if n.startswith("pkg.a.")] == [
        n for n in first if n.startswith("pkg.a.")
    ]


def test_patterns_select_before_sampling_and_fraction_one_takes_all():
    names = _names("pkg.a", 30) + _names("pkg.b", 30)
    assert mutate.choose(names, 1.0, 0, ["pkg.b.*"]) == sorted(_names("pkg.b", 30))
    assert len(mutate.choose(names, 0.5, 0, ["pkg.a.*"])) == 15
    assert mutate.choose(names, 1.0, 0, ["nothing.*"]) == []


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_a_fraction_outside_zero_one_is_refused_with_the_fix(fraction):
    with pytest.raises(ValueError, match=r"--sample must be in \(0, 1\].*0.1 tests 10%"):
        mutate.choose(["pkg.a.x_f__mutmut_1"], fraction, 0)
    with pytest.raises(SystemExit):
        mutate.main(["--sample", str(fraction), "--dry-run"])


@pytest.mark.parametrize("caught,n", [(1, 1), (0, 7), (80, 100), (691, 780), (3, 40)])
def test_wilson_interval_equals_scipys(caught, n):
    expected = binomtest(caught, n).proportion_ci(0.95, method="wilson")
    low, high = score.wilson(caught, n)
    assert low == pytest.approx(expected.low, abs=1e-3)
    assert high == pytest.approx(expected.high, abs=1e-3)


def test_the_estimate_weights_each_module_by_its_size_and_ignores_what_has_not_run():
    def m(module: str, status: str, i: int):
        return score.Mutant(f"{module}.x_f__mutmut_{i}", module, "src/x.py", status)

    # big: 9 of 10 sampled caught, of 1000 mutants; small: 0 of 2, of 10 (a timeout is caught)
    sampled = [m("big", "killed", i) for i in range(8)] + [m("big", "timeout", 8)]
    sampled += [m("big", "survived", 9), m("small", "survived", 0), m("small", "no tests", 1)]
    sampled += [m("small", "not checked", 2), m("other", "not checked", 0)]
    text = score.estimate(sampled, Counter(big=1000, small=10, other=500))
    weighted = (1000 * 0.9 + 10 * 0.0) / 1010
    low, high = score.wilson(9, 12)
    assert f"{100 * weighted:.1f}%" in text and "of the 1010 mutants of the 2 modules" in text
    assert f"95% interval {100 * low:.1f}-{100 * high:.1f}%, from 12 run" in text
    assert "set aside" not in text
    assert score.estimate([m("big", "not checked", 0)], Counter(big=3)).startswith("no sampled")
    # big's survivor judged equivalent: big is 9 of 9, small still 0 of 2
    text = score.estimate(sampled, Counter(big=1000, small=10), frozenset({"big.x_f__mutmut_9"}))
    low, high = score.wilson(9, 11)
    assert text.endswith(
        f"; {100 * 1000 / 1010:.1f}% ({100 * low:.1f}-{100 * high:.1f}%) with the 1 survivors "
        "judged equivalent set aside"
    )
