"""A `Report` as GitHub-flavoured Markdown (pipe tables, fenced commands, images by relative path)."""

from __future__ import annotations

from sp_ray.run.report.document import Block, Commands, Figure, Paragraph, Report, Table


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fence(lines: tuple[str, ...]) -> str:
    return "```bash\n" + "\n".join(lines) + "\n```"


def _block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Table):
        rule = ["---:" if i in block.numeric else "---" for i in range(len(block.header))]
        lines = [f"| {' | '.join(_cell(c) for c in block.header)} |", f"|{'|'.join(rule)}|"]
        lines += [f"| {' | '.join(_cell(c) for c in row)} |" for row in block.rows]
        table = "\n".join(lines)
        return f"**{block.caption}**\n\n{table}" if block.caption else table
    if isinstance(block, Commands):
        return (f"{block.caption}\n\n" if block.caption else "") + _fence(block.lines)
    if isinstance(block, Figure):
        alt = block.caption.replace("[", "(").replace("]", ")").replace("\n", " ")
        text = f"![{alt}]({block.path})\n\n*{block.caption}*"
        return text + (f"\n\nReproduce:\n\n{_fence(block.commands)}" if block.commands else "")
    raise TypeError(f"unknown report block {type(block).__name__}")


def render_markdown(report: Report) -> str:
    """The whole document as a string."""
    parts = [f"# {report.title}", *(_block(block) for block in report.intro)]
    for section in report.sections:
        parts.append(f"## {section.title}")
        parts.extend(_block(block) for block in section.blocks)
    return "\n\n".join(parts) + "\n"
