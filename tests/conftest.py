import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def missing_local_data(*relative: str) -> list[str]:
    """Which of these data files (paths under a data dir, e.g. ``piqa/valid.jsonl``) are in no local data dir."""
    from prunekit.data import find_local

    return [r for r in relative if find_local(r) is None]


def _reason(missing: list[str]) -> str:
    return (
        f"needs the local data {', '.join(missing)}, which is not under $PRUNEKIT_DATA or ../shared/data "
        "(set PRUNEKIT_DATA to the folder that holds it to run this test)"
    )


def needs_local_data(*relative: str):
    """Mark a test that reads local copies of data sets: it is skipped, with the reason, where they are absent."""
    missing = missing_local_data(*relative)
    return pytest.mark.skipif(bool(missing), reason=_reason(missing))


def require_local_data(*relative: str) -> None:
    """The same, inside a test or fixture (for parametrized tests, or a part of a test): skip unless present."""
    missing = missing_local_data(*relative)
    if missing:  # reported at the test's own location, as a skipif marker's skip is
        raise pytest.skip.Exception(_reason(missing), _use_item_location=True)
