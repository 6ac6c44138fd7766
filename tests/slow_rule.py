"""When tests marked slow run: tests/conftest.py's rule, in a module of its own so that
tests/test_slow_rule.py can import it (``import conftest`` finds tests/gpu/conftest.py in a whole run)."""
import re


def runs_slow(expr) -> bool:
    """Whether ``-m expr`` asks for slow tests: it names the word slow, or it selects by a marker at
    all (``-m gpu``: false for a test without markers), unlike ``-m "not gpu"``."""
    expr = expr or ""
    if not expr.strip():
        return False
    if "slow" in re.findall(r"[\w.]+", expr):
        return True
    try:
        from _pytest.mark.expression import Expression
        return not Expression.compile(expr).evaluate(lambda name, **kwargs: False)
    except Exception:  # noqa: BLE001  pytest's private parser moved: the words alone
        return re.search(r"(?<!not )\bgpu\b", expr) is not None
