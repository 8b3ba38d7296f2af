"""The documentation works as written.

- Code blocks marked ``<!-- runnable -->`` (on the line before the fence) in README.md, docs/*.md
  and examples/README.md run as a new user would run them, from a copy of the checkout (the
  Quick start is left to CI).
- Every ``flux_train_network.py`` command line in the docs, and every argument-file TOML, parses
  with the real parser; their ``--network_args`` parse with the network module's own checks.
- Every dataset TOML in the docs loads through the dataset loader with tiny images in place of
  its folders; the metadata-file examples load as a fine-tuning subset.
- The generated option tables match the parser; the dataset key table matches the schema's keys,
  levels and the command-line defaults; the network_args table lists every known arg; every
  ``--flag`` the docs mention exists; internal links point at existing files and headings.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import toml

import flux_train_network
from library.config_file import parse_args_with_config, read_config_file
from library.dataset_config import CLI_TO_KEY, GENERAL, SCHEMA, SUBSET, load_dataset_configs
from tests.dataset_helpers import make_folder

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "README.md"]
RUNNABLE = "<!-- runnable -->"
NOT_RUN_SECTIONS = ("Quick start",)  # CI runs these


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    text: str
    runnable: bool
    section: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    blocks, section, marker = [], "", False
    lines = path.read_text(encoding="utf-8").split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        fence = re.match(r"^(\s*)```(\w*)\s*$", line)
        if fence:
            indent, lang, body, start = fence.group(1), fence.group(2), [], i + 1
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
                i += 1
            blocks.append(Block(path, start, lang, "\n".join(body) + "\n", marker, section))
            marker = False
        elif line.strip() == RUNNABLE:
            marker = True
        elif line.strip():
            marker = False
        i += 1
    return blocks


ALL_BLOCKS = [b for path in DOCS for b in code_blocks(path)]


@pytest.fixture(scope="module")
def parser():
    return flux_train_network.setup_parser()


def load_generator():
    spec = importlib.util.spec_from_file_location("generate_option_tables", ROOT / "docs" / "generate_option_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- generated tables ---------------------------------------------------------------------------


def test_option_tables_match_the_parser(parser):
    generator = load_generator()
    doc = (ROOT / "docs" / "flux_train_network.md").read_text(encoding="utf-8")
    assert generator.render(doc, generator.generated_blocks(parser)) == doc, (
        "docs/flux_train_network.md is out of date with the parser: run python docs/generate_option_tables.py"
    )


def test_option_tables_list_every_option_once(parser):
    doc = (ROOT / "docs" / "flux_train_network.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\| `(--[\w-]+)`", doc, flags=re.MULTILINE)
    options = [s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    reference = doc[doc.index("BEGIN GENERATED option-tables (") : doc.index("END GENERATED option-tables -->")]
    in_reference = re.findall(r"^\| `(--[\w-]+)`", reference, flags=re.MULTILINE)
    assert sorted(in_reference) == sorted(options)
    assert set(options) <= set(listed)


# ---- runnable blocks ----------------------------------------------------------------------------

RUN_BLOCKS = [b for b in ALL_BLOCKS if b.runnable and b.section not in NOT_RUN_SECTIONS]


def test_docs_have_runnable_blocks_and_mark_only_shell():
    assert len(RUN_BLOCKS) >= 3
    assert all(b.lang == "bash" for b in ALL_BLOCKS if b.runnable), [b.where for b in ALL_BLOCKS if b.runnable]


@pytest.fixture
def checkout_copy(tmp_path):
    """The checkout as a new user has it (files linked, not copied), with a fresh output/."""
    for entry in ROOT.iterdir():
        if entry.name not in (".git", "output") and not entry.name.startswith("."):
            os.symlink(entry, tmp_path / entry.name)
    return tmp_path


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[b.where for b in RUN_BLOCKS])
def test_runnable_block_runs(block, checkout_copy):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block.text],
        cwd=checkout_copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"{block.where} failed:\n{block.text}\n{output}"


# ---- command lines and argument files -----------------------------------------------------------

SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "2>", "&"}


def training_command_lines() -> list[tuple[str, list[str]]]:
    """(where, argv after flux_train_network.py) for every command in code blocks and inline code."""
    commands = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        candidates = [(b.where, b.text) for b in code_blocks(path) if b.lang in ("bash", "sh", "")]
        candidates += [(f"{path.relative_to(ROOT)} (inline)", m) for m in re.findall(r"`([^`\n]+)`", text)]
        for where, snippet in candidates:
            for line in snippet.replace("\\\n", " ").split("\n"):
                if "flux_train_network.py" not in line or line.lstrip().startswith("#"):
                    continue
                tokens = shlex.split(line, comments=True)
                script = next((i for i, t in enumerate(tokens) if t.endswith("flux_train_network.py")), None)
                if script is None:
                    continue
                argv = []
                for token in tokens[script + 1 :]:
                    if token in SHELL_OPERATORS:
                        break
                    argv.append(token)
                if "--help" in argv or "-h" in argv or "..." in argv:  # help, or an abbreviated command
                    continue
                commands.append((where, argv))
    return commands


COMMANDS = training_command_lines()


def check_network_args(items: list[str] | None) -> None:
    """The values the network module would accept (no model needed)."""
    from networks import lora_flux_args as na

    kwargs = flux_train_network.train_network.parse_network_args(items)
    na.check_known_args(kwargs)
    for key in na.TYPE_DIM_KEYS:
        na.parse_int(key, kwargs.get(key))
    if "in_dims" in kwargs:
        na.parse_in_dims(kwargs["in_dims"])
    for key, total in (("train_double_block_indices", 19), ("train_single_block_indices", 38)):
        if key in kwargs:
            na.parse_block_selection(key, kwargs[key], total)
    if "network_reg_dims" in kwargs:
        na.parse_regex_pairs("network_reg_dims", kwargs["network_reg_dims"], na.rank_value)
    if "network_reg_lrs" in kwargs:
        na.parse_regex_pairs("network_reg_lrs", kwargs["network_reg_lrs"], float)
    for key in ("split_qkv", "train_t5xxl", "verbose"):
        na.parse_bool(key, kwargs.get(key, False))
    na.dropout_args(kwargs, None)
    na.ggpo_args(kwargs)
    na.loraplus_ratios(kwargs)


def test_docs_contain_training_commands():
    wheres = {w.split(":")[0] for w, _ in COMMANDS}
    assert len(COMMANDS) >= 10
    assert {"README.md", "docs/flux_train_network.md"} <= {w.split(" ")[0] for w in wheres}


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[f"{w}#{i}" for i, (w, _) in enumerate(COMMANDS)])
def test_training_command_in_docs_parses(parser, where, argv, monkeypatch):
    monkeypatch.chdir(ROOT)  # argument files in examples/ are named relative to the checkout
    try:
        args = parse_args_with_config(parser, argv)
    except SystemExit as e:
        pytest.fail(f"{where}: the parser rejects {' '.join(argv)} (exit {e.code})")
    check_network_args(args.network_args)
    from library.flow_matching import FlowMatchingConfig

    FlowMatchingConfig.from_args(args)
    if args.model_type == "chroma":
        assert args.apply_t5_attn_mask, f"{where}: Chroma needs --apply_t5_attn_mask"


ARGUMENT_FILE_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "toml" and "[[datasets" not in b.text]


@pytest.mark.parametrize("block", ARGUMENT_FILE_BLOCKS, ids=[b.where for b in ARGUMENT_FILE_BLOCKS])
def test_argument_file_in_docs_has_only_known_keys(parser, block, tmp_path, caplog):
    path = tmp_path / "args.toml"
    path.write_text(block.text, encoding="utf-8")
    values = read_config_file(str(path), parser)
    assert not [r for r in caplog.records if "unknown key" in r.getMessage()], block.where
    assert values
    check_network_args(values.get("network_args"))


# ---- dataset TOMLs ------------------------------------------------------------------------------

DATASET_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "toml" and "[[datasets" in b.text]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("doc_images")
    sizes = {"a.png": (64, 64), "b.png": (96, 64), "c.png": (64, 96), "d.png": (80, 80)}
    return make_folder(folder, sizes, {name: "my_subject, tag one, tag two" for name in sizes}, ext=".txt")


def substitute_folders(config: dict, image_folder: str, out_dir: Path) -> dict:
    """Points every image_dir at tiny images (one link per distinct folder) and every metadata_file
    at a metadata file listing them."""
    config = copy.deepcopy(config)
    links: dict[str, str] = {}
    images = sorted(p for p in os.listdir(image_folder) if p.endswith(".png"))
    metadata = out_dir / "metadata.json"
    metadata.write_text(json.dumps({p: {"caption": "my_subject", "tags": "one, two"} for p in images}))
    for ds in config["datasets"]:
        for sub in ds["subsets"]:
            if "image_dir" in sub:
                if sub["image_dir"] not in links:
                    link = out_dir / f"folder{len(links)}"
                    os.symlink(image_folder, link)
                    links[sub["image_dir"]] = str(link)
                sub["image_dir"] = links[sub["image_dir"]]
            if "metadata_file" in sub:
                sub["metadata_file"] = str(metadata)
                sub["image_dir"] = image_folder
    return config


def load_dataset_text(parser, text: str, image_folder: str, tmp_path: Path, *argv: str):
    from library.datasets import build_dataset_groups

    config = substitute_folders(toml.loads(text), image_folder, tmp_path)
    path = tmp_path / "dataset.toml"
    path.write_text(toml.dumps(config), encoding="utf-8")
    args = parser.parse_args(["--dataset_config", str(path), *argv])
    configs = load_dataset_configs(args)
    train, val = build_dataset_groups(configs, seed=0)
    assert len(train) > 0
    return configs, train, val


@pytest.mark.parametrize("block", DATASET_BLOCKS, ids=[b.where for b in DATASET_BLOCKS])
def test_dataset_toml_in_docs_loads(parser, block, image_folder, tmp_path):
    configs, _, val = load_dataset_text(parser, block.text, image_folder, tmp_path)
    if "validation_split" in block.text:
        assert val is not None and len(val) > 0, f"{block.where}: no validation images"


def test_metadata_file_examples_load_as_a_fine_tuning_subset(parser, tmp_path):
    from library.datasets import build_dataset_groups

    doc = ROOT / "docs" / "dataset_config.md"
    blocks = [b for b in code_blocks(doc) if b.section.startswith("4.")]
    json_block = next(b for b in blocks if b.lang == "json")
    jsonl_block = next(b for b in blocks if b.lang == "text" and "image_path" in b.text)
    images = tmp_path / "images"
    make_folder(images, {"photo1.png": (64, 64), "photo2.jpg": (96, 64)})
    (images / "metadata.json").write_text(json_block.text, encoding="utf-8")
    (images / "metadata.jsonl").write_text(jsonl_block.text, encoding="utf-8")
    for name in ("metadata.json", "metadata.jsonl"):
        config = tmp_path / f"{name}.toml"
        config.write_text(
            f'[[datasets]]\nresolution = 64\n\n  [[datasets.subsets]]\n  metadata_file = "{images / name}"\n'
            f'  image_dir = "{images}"\n',
            encoding="utf-8",
        )
        configs = load_dataset_configs(parser.parse_args(["--dataset_config", str(config)]))
        train, _ = build_dataset_groups(configs, seed=0)
        captions = sorted(e.caption for e in train.entries())
        assert captions[0] == "a photo of my_subject on a beach,beach, summer", name
        assert len(captions) == 2


def dataset_key_rows() -> dict[str, list[str]]:
    text = (ROOT / "docs" / "dataset_config.md").read_text(encoding="utf-8")
    section = text[text.index("## 2. Every key") : text.index("## 3.")]
    rows = {}
    for line in section.split("\n"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 7 and re.fullmatch(r"`\w+`", cells[0]):
            rows[cells[0].strip("`")] = cells
    return rows


def test_dataset_key_table_matches_the_schema(parser):
    rows = dataset_key_rows()
    assert set(rows) == set(SCHEMA), "docs/dataset_config.md section 2 must list exactly the schema's keys"
    for key, cells in rows.items():
        levels = tuple(
            level for level, mark in zip((GENERAL, "[[datasets]]", SUBSET), cells[1:4], strict=True) if mark == "✓"
        )
        assert levels == SCHEMA[key][1], f"{key}: documented levels {levels}, schema {SCHEMA[key][1]}"


def test_dataset_key_defaults_match_the_command_line_fallbacks(parser):
    cli = {CLI_TO_KEY.get(a.dest, a.dest): a for a in parser._actions}
    checked = 0
    for key, cells in dataset_key_rows().items():
        default = cells[5].strip("`")
        action = cli.get(key)
        if action is None or action.default is None or not cells[5].startswith("`"):
            continue
        value = toml.loads(f"x = {default}")["x"]
        assert value == action.default, f"{key}: documented default {default}, command line default {action.default!r}"
        checked += 1
    assert checked >= 20


# ---- tables, flags and links --------------------------------------------------------------------


def test_network_args_table_lists_every_known_arg():
    from networks.lora_flux_args import KNOWN_NETWORK_ARGS

    doc = (ROOT / "docs" / "flux_train_network.md").read_text(encoding="utf-8")
    table = doc[doc.index("### 9.1") : doc.index("### 9.2")]
    documented = set(re.findall(r"`(\w+)`", table))
    assert KNOWN_NETWORK_ARGS <= documented, sorted(KNOWN_NETWORK_ARGS - documented)


# flags of other programs the docs mention: sample-prompt options, accelerate, the helper tools
PROMPT_OPTIONS = {"--w", "--h", "--d", "--s", "--l", "--g", "--n", "--ss", "--cn", "--ctr", "--rcfg", "--fs"}
PROMPT_OPTIONS |= {"--m", "--c"}  # flux_minimal_inference.py --interactive
OTHER_PROGRAMS = {"--num_cpu_threads_per_process", "--quiet", "--check", "--logdir", "--doc"}
OTHER_PROGRAMS |= {"--multi_gpu", "--num_processes"}  # accelerate launch
HELPER_TOOLS = {  # script as the docs call it -> module with setup_parser()
    "flux_minimal_inference.py": "flux_minimal_inference",
    "networks/flux_merge_lora.py": "networks.flux_merge_lora",
    "networks/flux_extract_lora.py": "networks.flux_extract_lora",
    "convert_flux_lora.py": "networks.convert_flux_lora",
    "networks/convert_flux_lora.py": "networks.convert_flux_lora",
}


def helper_parser(script: str):
    import importlib

    return importlib.import_module(HELPER_TOOLS[script]).setup_parser()


def test_every_flag_the_docs_mention_exists(parser):
    known = {s for a in parser._actions for s in a.option_strings} | PROMPT_OPTIONS | OTHER_PROGRAMS
    for script in HELPER_TOOLS:
        known |= {s for a in helper_parser(script)._actions for s in a.option_strings}
    unknown = {}
    for path in DOCS:
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", path.read_text(encoding="utf-8")):
            if flag not in known:
                unknown.setdefault(flag, str(path.relative_to(ROOT)))
    assert not unknown, f"flags that no parser defines: {unknown}"


def helper_tool_commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, argv) of every helper-tool command in the docs' code blocks."""
    commands = []
    for path in DOCS:
        for block in code_blocks(path):
            if block.lang != "bash":
                continue
            for line in block.text.replace("\\\n", " ").split("\n"):
                if not any(script in line for script in HELPER_TOOLS):
                    continue
                tokens = shlex.split(line, comments=True)
                for i, token in enumerate(tokens[:-1] if tokens else []):
                    if token in HELPER_TOOLS and tokens[i - 1 : i] in (["python"], ["python3"]):
                        argv = tokens[i + 1 :]
                        if "--help" not in argv:
                            commands.append((block.where, token, argv))
    return commands


TOOL_COMMANDS = helper_tool_commands()


def test_docs_show_every_helper_tool():
    assert {script for _, script, _ in TOOL_COMMANDS} >= {
        "flux_minimal_inference.py",
        "networks/flux_merge_lora.py",
        "networks/flux_extract_lora.py",
        "convert_flux_lora.py",
    }


@pytest.mark.parametrize("where,script,argv", TOOL_COMMANDS, ids=[f"{w}:{s}" for w, s, _ in TOOL_COMMANDS])
def test_helper_tool_command_in_docs_parses(where, script, argv):
    try:
        helper_parser(script).parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: {script} rejects {' '.join(argv)} (exit {e.code})")


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


def test_internal_links_resolve():
    broken = []
    for path in DOCS:
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"https?://", target):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_sample_prompt_lines_in_docs_parse(tmp_path):
    from library.sample_prompts import load_prompts

    doc = ROOT / "docs" / "flux_train_network.md"
    blocks = [b for b in code_blocks(doc) if b.lang == "text" and " --" in b.text and b.section.startswith("12.")]
    assert blocks
    for block in blocks:
        path = tmp_path / "prompts.txt"
        path.write_text(block.text, encoding="utf-8")
        prompts = load_prompts(str(path))
        assert prompts and all(p.width and p.height and p.seed is not None for p in prompts), block.where
