"""bench/bad_inputs.py's matrix: every bad input to every command ends in one clear line naming the field or file."""

import sys
from pathlib import Path


def test_every_bad_input_gets_one_clear_line_and_nothing_on_disk_changes(tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    try:
        from bad_inputs import run
    finally:
        sys.path.pop(0)
    rows = run(tmp_path)
    assert len(rows) >= 37  # every case listed in bench/bad_inputs.py ran (none dropped by accident)
    unclear = [(name, outcome, message) for name, outcome, message in rows if outcome != "clear"]
    assert not unclear, unclear
