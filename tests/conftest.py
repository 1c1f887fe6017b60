import pytest

from selfsup.kernels.testing import fresh_seed


@pytest.fixture
def seed(request):
    """Seed torch freshly for this test; the seed is shown if the test fails."""
    s = fresh_seed()
    request.node.user_properties.append(("seed", s))
    return s


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            rep.sections.append(("seed", f"SELFSUP_TEST_SEED={seeds[-1]} reproduces this run"))


@pytest.fixture
def backend(monkeypatch):
    """backend("torch") forces a kernel path for the rest of the test."""

    def _set(name: str) -> None:
        monkeypatch.setenv("SELFSUP_KERNELS", name)

    return _set
