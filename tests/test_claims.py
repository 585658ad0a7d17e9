"""plots/CLAIMS.md: every row has one allowed verdict, the counts at the top match the rows, and
every figure or results file a row names is committed."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEDGER = ROOT / "plots" / "CLAIMS.md"
VERDICTS = ("partially reproduced", "not reproduced", "reproduced", "contradicted", "not run")


def rows():
    table = [line for line in LEDGER.read_text().splitlines() if re.match(r"^\| *[A-Z]?\d+ *\|", line)]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table]


def verdict_of(cell):
    text = cell.replace("*", "").strip()
    return next((v for v in VERDICTS if text.startswith(v)), None)


def test_each_row_has_one_allowed_verdict_and_a_reason_when_not_run():
    table = rows()
    assert len(table) >= 25
    for row in table:
        verdict = verdict_of(row[-1])
        assert verdict, row
        if verdict == "not run":
            assert re.match(r"not run \(.+\)", row[-1].replace("*", "")), row


def test_counts_at_the_top_match_the_rows():
    counts = {}
    for row in rows():
        counts[verdict_of(row[-1])] = counts.get(verdict_of(row[-1]), 0) + 1
    header = LEDGER.read_text().split("| # |")[0]
    for verdict, n in counts.items():
        assert re.search(rf"{verdict}\*?\*?: {n}\b", header), (verdict, n)


def test_named_files_exist():
    for row in rows():
        for name in re.findall(r"`([\w./-]+\.(?:png|json|csv|md))`", " ".join(row)):
            path = ROOT / "plots" / name
            assert path.exists(), f"row {row[0]} names {name}, not committed"


def test_readme_links_the_ledger_and_quotes_its_counts():
    counts = {}
    for row in rows():
        counts[verdict_of(row[-1])] = counts.get(verdict_of(row[-1]), 0) + 1
    readme = (ROOT / "README.md").read_text()
    assert "plots/CLAIMS.md" in readme
    sentence = re.search(r"Of its (\d+) claims, ([^.]*)\.", readme)
    assert sentence and int(sentence.group(1)) == len(rows())
    for verdict, n in counts.items():
        assert re.search(rf"\b{n} {verdict}\b", sentence.group(2)), (verdict, n)
