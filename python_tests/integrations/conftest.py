"""With VLCORE_REQUIRE_INTEGRATIONS=1 (.ci/integration_env.sh, the environment built to run these tests) a
skipped test is a failure: a skip there means the environment is broken, not that a library is absent."""

import pytest

from python_tests.integrations.helpers import REQUIRED


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRED and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped where VLCORE_REQUIRE_INTEGRATIONS=1 requires it to run: {report.longrepr}"
