"""The report rendered from stored results: a section, a verdict and an embedded image for every claim."""

from __future__ import annotations

import json
from html.parser import HTMLParser

from normkit.lab import report
from normkit.lab.stats import VERDICTS
from normkit.lab.studies import STUDIES


class Sections(HTMLParser):
    """Collects, per ``<section id="claim-...">``, its images, verdict badges and Chinese quotes."""

    def __init__(self):
        super().__init__()
        self.sections: dict[str, dict] = {}
        self.current: str | None = None
        self.capture: str | None = None
        self.images_outside: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section" and attrs.get("id", "").startswith("claim-"):
            self.current = attrs["id"][len("claim-") :]
            self.sections[self.current] = {"images": [], "verdicts": [], "zh": ""}
        elif tag == "img":
            (self.sections[self.current]["images"] if self.current else self.images_outside).append(attrs.get("src", ""))
        elif self.current and tag == "span" and attrs.get("class") == "verdict":
            self.capture = "verdicts"
        elif self.current and tag == "blockquote" and attrs.get("lang") == "zh":
            self.capture = "zh"

    def handle_endtag(self, tag):
        if tag == "section":
            self.current = None
        if tag in ("span", "blockquote"):
            self.capture = None

    def handle_data(self, data):
        if self.current and self.capture == "verdicts":
            self.sections[self.current]["verdicts"].append(data)
        elif self.current and self.capture == "zh":
            self.sections[self.current]["zh"] += data


def test_report_from_stored_results(tiny_lab):
    _, out = tiny_lab
    stored = json.loads((out / "results.json").read_text())
    html_text = report.render_html(stored, out)
    parser = Sections()
    parser.feed(html_text)
    assert set(parser.sections) == set(STUDIES)
    for study in stored["studies"]:
        section = parser.sections[study["id"]]
        assert section["verdicts"] and section["verdicts"][0] in VERDICTS
        assert section["verdicts"][0] == study["verdict"]
        assert section["zh"] == study["claim"]["zh"]
        assert section["images"] and all(src.startswith("data:image/png;base64,") for src in section["images"])
    assert parser.images_outside and parser.images_outside[0].startswith("data:image/png;base64,")  # the cube figure
    assert "src=\"http" not in html_text and "href=\"http" not in html_text  # opens offline


def test_markdown_lists_every_claim(tiny_lab):
    _, out = tiny_lab
    md = (out / "report.md").read_text(encoding="utf-8")
    stored = json.loads((out / "results.json").read_text())
    for study in stored["studies"]:
        assert f"## {study['number']}. {study['title']}" in md
        assert study["claim"]["zh"] in md
        for figure in study["figures"]:
            assert f"]({figure})" in md and (out / figure).exists()
