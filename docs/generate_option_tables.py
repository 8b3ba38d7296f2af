"""Regenerates the option tables of docs/flux_train_network.md from the real parser.

    python docs/generate_option_tables.py           # rewrite the generated parts of the page
    python docs/generate_option_tables.py --check   # exit 1 if the page is out of date

The page holds generated blocks between ``<!-- BEGIN GENERATED name -->`` and
``<!-- END GENERATED name -->`` lines; everything else is hand-written and left alone:

- ``option-tables``: every option of ``flux_train_network.setup_parser()``, group by group, with
  its value type, default and help text (the help text is the one ``--help`` prints);
- ``option-tables-ja``: the same groups' Japanese names, for the Japanese section;
- ``compat-table`` / ``compat-table-ja``: the flags accepted for compatibility with sd-scripts
  that warn (``IGNORED_FOR_FLUX``) or stop the run (``REFUSED_FOR_FLUX``) on FLUX.

``tests/test_docs.py`` fails when the page and the parser disagree.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "flux_train_network.md"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GROUPS_JA = {
    "dataset": "データセット",
    "caches": "キャッシュ",
    "model": "モデル",
    "training": "学習",
    "optimizer": "オプティマイザ",
    "learning-rate schedule": "学習率スケジュール",
    "network": "ネットワーク（LoRA）",
    "noise and loss": "ノイズと損失",
    "saving": "保存",
    "metadata": "メタデータ",
    "logging": "ログ",
    "sample images": "サンプル画像",
    "validation": "検証",
    "config files": "設定ファイル",
    "accepted for sd-scripts compatibility (no effect on FLUX)": (
        "sd-scripts互換のため受け付けるオプション（FLUXでは効果なし）"
    ),
    "DiT training": "DiT学習",
    "deprecated": "非推奨",
    "FLUX / Chroma": "FLUX / Chroma",
}


def _parser() -> argparse.ArgumentParser:
    import flux_train_network

    return flux_train_network.setup_parser()


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (no pipes, no stray HTML or emphasis)."""
    text = " ".join(str(text).split())
    for raw, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|"), ("*", "\\*")):
        text = text.replace(raw, escaped)
    return text


def _code(text: str) -> str:
    return f"`{text}`" if "`" not in text else f"`` {text} ``"


def _is_flag(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))


def value_kind(action: argparse.Action) -> str:
    """How the option takes its value: ``flag``, ``int``, ``float``, ``text``, ``path``, choices or a list."""
    if _is_flag(action):
        return "flag"
    if action.choices:
        kind = " \\| ".join(_code(str(c)) for c in action.choices)
    else:
        kind = {int: "int", float: "float", str: "text", Path: "path", None: "text"}.get(action.type)
        if kind is None:
            kind = "steps, ratio or %" if getattr(action.type, "__name__", "") == "int_or_float" else "value"
    if action.nargs in ("*", "+"):
        kind = f"list of {kind}"
    return kind


def default_text(action: argparse.Action) -> str:
    """The parser's default as the tables show it."""
    default = action.default
    if _is_flag(action):
        return "off" if not default else "on"
    if default is None:
        return "not set"
    if default == "":
        return '`""`'
    if isinstance(default, os.PathLike):
        default = os.fspath(default)
    return _code(str(default))


def help_text(action: argparse.Action) -> str:
    """The help string with %-placeholders expanded, as ``--help`` shows it (without the added default)."""
    if not action.help:
        return ""
    return argparse.HelpFormatter(prog="flux_train_network.py")._expand_help(action)


def _groups(parser: argparse.ArgumentParser):
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if actions:
            yield group.title, actions


def option_tables(parser: argparse.ArgumentParser) -> str:
    groups = list(_groups(parser))
    count = sum(len(actions) for _, actions in groups)
    lines = [
        f"{count} options in {len(groups)} groups, in the order `--help` prints them. "
        '"not set" means the option is off unless given; the description says what is used then.',
        "",
    ]
    for title, actions in groups:
        lines += [f"#### Options: {title}", "", "| Option | Value | Default | Description |", "|---|---|---|---|"]
        for action in actions:
            names = ", ".join(_code(s) for s in action.option_strings)
            lines.append(f"| {names} | {value_kind(action)} | {default_text(action)} | {_cell(help_text(action))} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def option_tables_ja(parser: argparse.ArgumentParser) -> str:
    lines = ["| グループ（英語の見出し） | 日本語 | オプション数 |", "|---|---|---|"]
    for title, actions in _groups(parser):
        link = f"[{_cell(title)}](#{anchor('Options: ' + title)})"
        lines.append(f"| {link} | {_cell(GROUPS_JA.get(title, title))} | {len(actions)} |")
    return "\n".join(lines)


def _compat_rows(parser: argparse.ArgumentParser):
    from library.train_args import IGNORED_FOR_FLUX, REFUSED_FOR_FLUX

    actions = {a.dest: a for a in parser._actions}
    for dest, why in REFUSED_FOR_FLUX.items():
        yield actions[dest], "refused", why
    for dest, why in IGNORED_FOR_FLUX.items():
        yield actions[dest], "ignored", why


def compat_table(parser: argparse.ArgumentParser) -> str:
    what = {
        "refused": "**stops** before any work, with the message on the right",
        "ignored": "one warning, training goes on",
    }
    lines = [
        "| Option | Default | When set to anything but the default | Why, or what to do instead |",
        "|---|---|---|---|",
    ]
    for action, kind, why in _compat_rows(parser):
        names = ", ".join(_code(s) for s in action.option_strings)
        lines.append(f"| {names} | {default_text(action)} | {what[kind]} | {_cell(why)} |")
    return "\n".join(lines)


def compat_table_ja(parser: argparse.ArgumentParser) -> str:
    what = {"refused": "開始前に**エラーで停止**", "ignored": "警告を1回表示し、学習は続行"}
    lines = ["| オプション | 既定値 | 既定値以外を指定したとき | 理由・代わりの方法（英語） |", "|---|---|---|---|"]
    for action, kind, why in _compat_rows(parser):
        names = ", ".join(_code(s) for s in action.option_strings)
        lines.append(f"| {names} | {default_text(action)} | {what[kind]} | {_cell(why)} |")
    return "\n".join(lines)


def generated_blocks(parser: argparse.ArgumentParser | None = None) -> dict[str, str]:
    """name -> the Markdown that belongs between that name's markers."""
    parser = parser or _parser()
    return {
        "option-tables": option_tables(parser),
        "option-tables-ja": option_tables_ja(parser),
        "compat-table": compat_table(parser),
        "compat-table-ja": compat_table_ja(parser),
    }


def _block_re(name: str) -> re.Pattern:
    return re.compile(
        rf"(<!-- BEGIN GENERATED {re.escape(name)} [^\n]*-->\n)(.*?)(<!-- END GENERATED {re.escape(name)} -->)",
        re.DOTALL,
    )


def render(text: str, blocks: dict[str, str] | None = None) -> str:
    """``text`` with every generated block replaced by its current content; raises if a marker is missing."""
    blocks = blocks if blocks is not None else generated_blocks()
    for name, body in blocks.items():
        pattern = _block_re(name)
        if not pattern.search(text):
            raise ValueError(f"marker pair for {name!r} not found (<!-- BEGIN GENERATED {name} ... -->)")
        text = pattern.sub(lambda m, body=body: m.group(1) + "\n" + body + "\n\n" + m.group(3), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if the page is out of date")
    parser.add_argument("--doc", default=str(DOC), help="the page to update (default docs/flux_train_network.md)")
    args = parser.parse_args(argv)
    path = Path(args.doc)
    text = path.read_text(encoding="utf-8")
    new = render(text)
    if args.check:
        if new != text:
            print(f"{path}: option tables are out of date; run python docs/generate_option_tables.py", file=sys.stderr)
            return 1
        print(f"{path}: option tables match the parser")
        return 0
    if new != text:
        path.write_text(new, encoding="utf-8")
        print(f"updated {path}")
    else:
        print(f"{path}: already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
