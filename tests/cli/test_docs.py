"""The documentation: the generated configuration reference and metrics list under docs/ are kept
current (the metrics list is also checked against what each running service exposes, in
test_verbs_on_a_stack.py), the README stays short, and every relative link leads to a file."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from cli import docs

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 200
#: Markdown links and images: ``[text](target)``; the target ends at a space, ``)`` or ``#``.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s#]*)[^)]*\)")


def test_configuration_reference_is_current() -> None:
    page = (ROOT / "docs" / docs.CONFIGURATION_PAGE).read_text()
    assert docs.config_markdown() in page, "docs/configuration.md is stale: run `make docs`"


def test_metrics_list_is_current() -> None:
    page = (ROOT / "docs" / docs.METRICS_PAGE).read_text()
    assert docs.metrics_markdown() in page, "docs/metrics.md is stale: run `make docs`"


def test_check_finds_a_stale_page_and_make_docs_rewrites_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for page in (docs.CONFIGURATION_PAGE, docs.METRICS_PAGE):
        shutil.copy(ROOT / "docs" / page, tmp_path / page)
    current = {p.name: p.read_text() for p in tmp_path.iterdir()}
    # As if a setting and a metric had been added without regenerating: each page lacks a row.
    rows = {docs.CONFIGURATION_PAGE: "| `FRESHREC_GRPC__PORT` |", docs.METRICS_PAGE: "| `freshrec_rpc_total"}
    for page, row in rows.items():
        text = (tmp_path / page).read_text()
        line = next(line for line in text.splitlines(keepends=True) if line.startswith(row))
        (tmp_path / page).write_text(text.replace(line, "", 1))

    assert docs.main(["--docs-dir", str(tmp_path), "--check"]) == 1
    err = capsys.readouterr().err
    assert docs.CONFIGURATION_PAGE in err and docs.METRICS_PAGE in err
    assert docs.main(["--docs-dir", str(tmp_path)]) == 0
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == current
    assert docs.main(["--docs-dir", str(tmp_path), "--check"]) == 0


def test_every_setting_of_every_service_is_listed() -> None:
    text = docs.config_markdown()
    for service in docs.SETTINGS:
        for variable, _default, _meaning in docs.rows(docs.settings_class(service)()):
            assert f"| `{variable}` |" in text
    assert "| `FRESHREC_GRPC__PORT` | `50054` |" in text  # nested defaults come from the service
    assert "| `FRESHREC_NATS__PASSWORD` | `—` |" in text


def test_metrics_section_is_parsed_per_service() -> None:
    page = (
        f"{docs.METRICS_BEGIN}\n| metric | type | labels | services | meaning |\n|---|---|---|---|---|\n"
        "| `freshrec_a_total` | counter | — | all | a |\n"
        "| `freshrec_b` | gauge | — | feature, trainer | b |\n"
        f"{docs.METRICS_END}"
    )
    found = docs.documented_metrics(page)
    assert found["ingestion"] == {"freshrec_a_total"}
    assert found["feature"] == found["trainer"] == {"freshrec_a_total", "freshrec_b"}


def test_readme_reads_in_five_minutes() -> None:
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md: {lines} lines, over {README_MAX_LINES}: move depth to docs"


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]


def relative_links(text: str) -> list[str]:
    """Targets of links to files of this repository (not web addresses, not anchors on the page)."""
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if t and not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_links_are_found() -> None:
    text = "[a](docs/a.md) ![p](p.png) [b](b.md#part) [c](#here) [d](https://x.org/y) [e](mailto:x@y)"
    assert relative_links(text) == ["docs/a.md", "p.png", "b.md"]


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file(page: Path) -> None:
    links = relative_links(page.read_text())
    missing = [t for t in links if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = ROOT / "README.md"
    linked = {(readme.parent / t).resolve() for t in relative_links(readme.read_text())}
    pages = [*(ROOT / "docs").glob("*.md"), ROOT / "bench" / "README.md"]
    assert pages and not [p.relative_to(ROOT) for p in pages if p.resolve() not in linked]
