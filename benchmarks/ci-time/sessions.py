"""Per nox session of a timestamped `.ci/run` log: install seconds, test seconds and pytest's summary line.

Every log line starts with the seconds since the run started (tsrun.sh); install is a session's start to its
pytest command, tests is that command to the session's end.
"""

import re
import sys


def sessions(log: str) -> list[dict]:
    rows, current = [], None
    for line in open(log, errors="replace"):
        match = re.match(r"\s*(\d+) (.*)", line)
        if not match:
            continue
        seconds, text = int(match.group(1)), match.group(2)
        if text.startswith("nox > Running session "):
            current = {"session": text.split()[-1], "start": seconds, "tests": None, "summary": ""}
        elif current is None:
            continue
        elif text.startswith("nox > ") and "pytest" in text and current["tests"] is None:
            current["tests"] = seconds
        elif re.match(r"nox > Session \S+ (was successful|failed)", text):
            current.update(end=seconds, result="passed" if "successful" in text else "FAILED")
            rows.append(current)
            current = None
        elif re.search(r"\d+ passed", text):
            current["summary"] = text.strip()
    return rows


if __name__ == "__main__":
    print(f"{'session':12} {'install s':>9} {'tests s':>8} {'total s':>8}  result / pytest")
    for row in sessions(sys.argv[1]):
        tests = row["tests"] or row["end"]
        print(
            f"{row['session']:12} {tests - row['start']:9d} {row['end'] - tests:8d} {row['end'] - row['start']:8d}"
            f"  {row['result']} {row['summary']}"
        )
