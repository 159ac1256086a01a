"""Budget strings (fractions and counts) and the errors for budgets that cannot work."""
import pytest

import deltakit
from search.budget import check_fits, parse_budget
from search.errors import BudgetError

N = 117_655_298   # multilingual-e5-small with a 2-label head


@pytest.mark.parametrize("text, expected", [
    ("0.01%", 11_765), ("1.39‱", 16_354), ("1.39%%", 16_354), ("0.5‰", 58_827), ("1e-4", 11_765),
    ("0.0001", 11_765), ("25k", 25_000), ("25K", 25_000), ("6.3M", 6_300_000), ("25000", 25_000),
    (" 2.5 k ", 2_500), ("1G", 1_000_000_000),
])
def test_budget_forms(text, expected):
    b = parse_budget(text, N)
    assert b.params == expected
    assert b.fraction == pytest.approx(expected / N)


@pytest.mark.parametrize("text", ["", "abc", "10 params", "1..2%", "%", "0", "0%", "-1%", "-25k", "1.5", "150%",
                                  "100%", "nan", "inf", "1e-12", "0.0000001%"])
def test_bad_budgets_are_deltakit_errors(text):
    with pytest.raises(BudgetError) as info:
        parse_budget(text, N)
    assert isinstance(info.value, deltakit.DeltakitError)
    assert "0.01%" in str(info.value) or "must" in str(info.value) or "less than one" in str(info.value)


def test_budget_must_fit_the_space():
    b = parse_budget("25k", N)
    with pytest.raises(BudgetError, match="whole search space"):
        check_fits(b, [10_000, 10_000])
    with pytest.raises(BudgetError, match="smaller than the cheapest candidate"):
        check_fits(b, [30_000, 40_000])
    check_fits(b, [20_000, 10_000])   # fits: no error
    with pytest.raises(BudgetError, match="no candidates"):
        check_fits(b, [])


def test_cli_reports_bad_budget_before_any_work(capsys, tmp_path):
    from search.s3pet import main
    assert main(["--budget", "lots", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot read budget 'lots'" in err and "0.01%" in err
    assert not (tmp_path / "out").exists()     # nothing was loaded or written
