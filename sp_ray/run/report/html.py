"""A `Report` as one self-contained HTML page (inline CSS, images by relative path)."""

from __future__ import annotations

from html import escape

from sp_ray.run.report.document import Block, Commands, Figure, Paragraph, Report, Table, split_code_spans

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222;
       line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: .2em;
     margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; } th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .3em; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .92em; color: #444; margin: .3em 0; }
pre { background: #f6f8fa; padding: .6em .8em; overflow-x: auto; font-size: .85em; }
code { background: #f6f8fa; padding: 0 .2em; }
.label { font-size: .85em; color: #666; margin-bottom: -.5em; }
"""


def _inline(text: str) -> str:
    return "".join(f"<code>{escape(piece)}</code>" if code else escape(piece) for piece, code in split_code_spans(text))


def _commands(lines: tuple[str, ...], label: str) -> str:
    head = f'<p class="label">{escape(label)}</p>' if label else ""
    return f"{head}<pre>{escape(chr(10).join(lines))}</pre>"


def _block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{_inline(block.text)}</p>"
    if isinstance(block, Table):
        caption = f"<caption>{_inline(block.caption)}</caption>" if block.caption else ""
        head = "".join(f"<th>{_inline(cell)}</th>" for cell in block.header)
        body = "".join(
            "<tr>" + "".join(
                f'<td class="num">{_inline(cell)}</td>' if i in block.numeric else f"<td>{_inline(cell)}</td>"
                for i, cell in enumerate(row)
            ) + "</tr>"
            for row in block.rows
        )
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(block, Commands):
        return _commands(block.lines, block.caption)
    if isinstance(block, Figure):
        reproduce = _commands(block.commands, "Reproduce:") if block.commands else ""
        return (f'<figure><img src="{escape(block.path, quote=True)}" alt="{escape(block.caption, quote=True)}">'
                f"<figcaption>{_inline(block.caption)}</figcaption>{reproduce}</figure>")
    raise TypeError(f"unknown report block {type(block).__name__}")


def render_html(report: Report) -> str:
    """The whole page as a string (UTF-8 when written)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(report.title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(report.title)}</h1>",
        *(_block(block) for block in report.intro),
    ]
    for section in report.sections:
        parts.append(f"<h2>{escape(section.title)}</h2>")
        parts.extend(_block(block) for block in section.blocks)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
