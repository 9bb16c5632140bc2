"""The demo's report: the document, its HTML / Markdown renderings, the sentences computed from the numbers."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from sp_ray.drawing.draw import save_png
from sp_ray.run.report.document import (
    Commands,
    Figure,
    Paragraph,
    Report,
    Section,
    Table,
    missing_links,
    split_code_spans,
)
from sp_ray.run.report.html import render_html
from sp_ray.run.report.markdown import render_markdown
from sp_ray.run.report.run_report import sp_gap_sentences
from sp_ray.run.report.write import write_report


def html_links(text: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', text)


def markdown_links(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def sample_report() -> Report:
    return Report(
        title="A <demo> & report",
        intro=(Paragraph("Run `sp-ray demo` then look; a < b."),),
        sections=(
            Section("Results", (
                Table(("model", "AP"), (("K-Net | SP", "1.50"), ("scratch", "0.30")), caption="AP", numeric=(1,)),
                Figure("figures/a.png", "the curve", ("sp-ray finetune --config x.yaml",)),
                Commands(("sp-ray demo --redo report",), "Redraw:"),
            )),
            Section("More", (Figure("kernels/k.png", "kernels"),)),
        ),
    )


def write_figures(folder: Path) -> None:
    for rel in ("figures/a.png", "kernels/k.png"):
        save_png(np.zeros((4, 4, 3), np.uint8), folder / rel)


def test_split_code_spans():
    assert split_code_spans("run `a` now") == [("run ", False), ("a", True), (" now", False)]
    assert split_code_spans("plain") == [("plain", False)]
    # An unpaired backtick opens nothing: it stays in the text.
    assert split_code_spans("a `b` c ` d") == [("a ", False), ("b", True), (" c ` d", False)]


@pytest.mark.parametrize("path", ["/abs/a.png", "../a.png", "figures/../../a.png", "figures\\a.png"])
def test_figure_paths_must_stay_inside_the_report_folder(path):
    with pytest.raises(ValueError, match="relative"):
        Figure(path, "caption")


def test_table_rows_must_match_the_header():
    with pytest.raises(ValueError, match="row 1 has 1 cells"):
        Table(("a", "b"), (("1", "2"), ("3",)))


def test_html_escapes_text_and_links_every_figure(tmp_path):
    text = render_html(sample_report())
    assert "<title>A &lt;demo&gt; &amp; report</title>" in text
    assert "<code>sp-ray demo</code>" in text and "a &lt; b" in text
    assert html_links(text) == ["figures/a.png", "kernels/k.png"]
    assert '<td class="num">1.50</td>' in text and "<td>K-Net | SP</td>" in text
    assert "<pre>sp-ray finetune --config x.yaml</pre>" in text


def test_markdown_tables_figures_and_commands():
    text = render_markdown(sample_report())
    assert text.startswith("# A <demo> & report\n")
    assert "| model | AP |\n|---|---:|\n| K-Net \\| SP | 1.50 |" in text
    assert markdown_links(text) == ["figures/a.png", "kernels/k.png"]
    assert "```bash\nsp-ray demo --redo report\n```" in text


def test_write_report_checks_links_first(tmp_path):
    report = sample_report()
    assert missing_links(report, tmp_path) == ["figures/a.png", "kernels/k.png"]
    with pytest.raises(FileNotFoundError, match="figures/a.png"):
        write_report(report, tmp_path)
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "report.md").exists()
    write_figures(tmp_path)
    paths = write_report(report, tmp_path)
    for link in html_links(paths["html"].read_text()) + markdown_links(paths["md"].read_text()):
        assert (tmp_path / link).is_file()


def _benchmark(verdict: str, mean: float, low: float, high: float) -> dict:
    interval = {"mean": mean, "ci_low": low, "ci_high": high, "n": 6, "verdict": verdict}
    return {"comparisons": [{"fraction": 0.1, "high": "sp", "low": "scratch", "AP": interval},
                            {"fraction": 0.1, "high": "sp", "low": "ssl", "AP": {**interval, "mean": -9.0}}],
            "sizes": {"labeled_train": 320, "unlabeled_pool": 2320},
            "args": {"ssl_epochs": 4, "pretrain_epochs": 3, "epochs": 40}}


def test_sp_gap_sentences_follow_the_sign_of_the_numbers():
    gain = _benchmark("above 0", 2.5, 0.75, 4.25)
    ahead = sp_gap_sentences({0.05: 1.5, 0.1: 3.25}, gain)
    assert ahead == [
        "One seed per run: at 5% K-Net from SP is 1.50 AP above K-Net from scratch; "
        "at 10% K-Net from SP is 3.25 AP above K-Net from scratch.",
        "The benchmark (`benchmarks/results/low_data_knet.json`) measures the same comparison under other "
        "settings (an unlabeled pool of 2320 images, DenseCL 4 and SP 3 epochs over it, 40 fine-tuning "
        "epochs): at 10% SP - scratch is +2.50 AP [+0.75, +4.25] over 6 paired runs (interval above 0): this run's "
        "gap has the same sign. Its intervals are the spread of its own runs, not of this table's rows, whose "
        "settings differ.",
    ]
    behind = sp_gap_sentences({0.1: -1.44}, gain)
    assert "at 10% K-Net from SP is 1.44 AP below K-Net from scratch." in behind[0]
    assert "(interval above 0): this run's gap does not have that sign." in behind[1]
    loss = sp_gap_sentences({0.1: -1.44}, _benchmark("below 0", -2.0, -3.0, -1.0))
    assert "[-3.00, -1.00] over 6 paired runs (interval below 0): this run's gap has the same sign." in loss[1]
    unsettled = sp_gap_sentences({0.1: 0.0}, _benchmark("includes 0", 0.5, -1.0, 2.0))
    assert "level with K-Net from scratch" in unsettled[0]
    assert "(interval includes 0): it establishes neither sign." in unsettled[1]
    # No benchmark result: the one-seed gap is reported, and said to decide nothing.
    alone = sp_gap_sentences({0.1: 3.25}, None)
    assert len(alone) == 2 and "decides nothing" in alone[1]
