"""The Space's card (README.md): YAML front matter the Hub reads, and the body from space/README_space.md; and which
files of space/ the Space gets. Deploy-only, like space/deploy.py: it is not uploaded."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import yaml

from common.cli import UsageError
from common.llama3 import Q4_K_M_GLOB

TEMPLATE = Path(__file__).with_name("README_space.md")
PACKAGE = "space"  # SPACE_DIR's files go to space/ in the Space whatever the folder's name: the app imports space.*
APP_NAME = "app.py"  # in SPACE_DIR
APP_FILE = f"{PACKAGE}/{APP_NAME}"  # the card's app_file: the Space runs `python space/app.py` from its root
PYTHON_VERSION = "3.11"  # the version the app is tested with here
GGUF_PATTERN = Q4_K_M_GLOB  # Llama.from_pretrained accepts a glob; export/to_gguf.py names files <Name>-Q4_K_M.gguf

CARD = {  # front matter of the Space card, in the order the Hub's docs list the keys
    "title": "Llama-3.2 FineTome Chat",
    "emoji": "🦙",
    "colorFrom": "indigo",
    "colorTo": "yellow",
    "short_description": "Chat with and compare Llama-3.2 1B/3B FineTome GGUFs on CPU",  # the Hub's limit: 60
    "license": "llama3.2",
    "datasets": ["mlabonne/FineTome-100k"],
    "tags": ["llama-cpp", "gguf", "llama-3.2", "finetome", "chatbot", "cpu"],
}


def card_front_matter(config, gradio_version: str) -> dict:
    return {
        "title": CARD["title"], "emoji": CARD["emoji"], "colorFrom": CARD["colorFrom"], "colorTo": CARD["colorTo"],
        "sdk": "gradio", "sdk_version": gradio_version, "app_file": APP_FILE, "python_version": PYTHON_VERSION,
        "pinned": False, "short_description": CARD["short_description"], "license": CARD["license"],
        "models": [model["repo_id"] for model in config.catalog() if "repo_id" in model], "datasets": CARD["datasets"],
        "tags": CARD["tags"],
    }


def fill_template(template: str, values: dict[str, str]) -> str:
    """Replace each {{name}}; a name the template uses but `values` lacks, or the reverse, is an error, so the card
    never ships with a raw placeholder or silently drops a section. A leading <!-- comment --> is removed.

    >>> fill_template("<!-- note -->\\n# {{title}}\\n", {"title": "Chat"})
    '# Chat\\n'
    """
    template = re.sub(r"\A\s*<!--.*?-->\s*", "", template, flags=re.DOTALL)
    used = set(re.findall(r"{{\s*(\w+)\s*}}", template))
    unknown, unused = sorted(used - set(values)), sorted(set(values) - used)
    if unknown or unused:
        raise UsageError([f"{TEMPLATE.name}: placeholders {', '.join(unknown) or '-'} have no value and "
                          f"{', '.join(unused) or '-'} are not used; the known ones are: {', '.join(sorted(values))}"])
    return re.sub(r"{{\s*(\w+)\s*}}", lambda match: values[match.group(1)], template)


def render_card(config, template: str, gradio_version: str, llama_cpp_version: str) -> str:
    """README.md of the Space for a DeployConfig (its catalog, vote repo and report link)."""
    models = "\n".join(f"- **{model['label']}**: [{model['repo_id']}](https://huggingface.co/{model['repo_id']})"
                       if "repo_id" in model else f"- **{model['label']}**: served by an OpenAI-compatible server "
                       "(llama.cpp's llama-server)" for model in config.catalog())
    if config.votes_repo:
        votes = (f"Votes are appended to a log on the Space and pushed to the dataset "
                 f"[{config.votes_repo}](https://huggingface.co/datasets/{config.votes_repo}).")
    else:
        votes = ("Votes are appended to a log on the Space's own disk, which is reset when the Space restarts "
                 "(cpu-basic hardware has no persistent storage).")
    if config.report_url:
        report = (f"`scripts/compare.py` runs both models on the same prompts: "
                  f"[read the comparison report]({config.report_url}).")
    else:
        report = ("`python scripts/compare.py` in the project repository runs both models on the same prompts and "
                  "writes the comparison report (link to come once it is published).")
    body = fill_template(template, {
        "title": CARD["title"], "models": models, "gguf_pattern": GGUF_PATTERN, "votes": votes, "report": report,
        "gradio_version": gradio_version, "llama_cpp_version": llama_cpp_version,
    })
    front_matter = yaml.safe_dump(card_front_matter(config, gradio_version), sort_keys=False, allow_unicode=True,
                                  width=1000)
    return f"---\n{front_matter}---\n\n{body}"


SILENT_REASON = "the Space card template, rendered into README.md"
DEPLOY_REASON = "the deploy's own code: it runs here, the Space never imports it"
# The deploy's own code, in space/ beside the app: it runs here, the Space never imports it.
DEPLOY_MODULES = ("deploy.py", Path(__file__).name, "deploy_hub.py")
QUIET_REASONS = ("Python bytecode", SILENT_REASON, DEPLOY_REASON)  # not worth a line: expected every time


def leave_out_reason(path: PurePosixPath) -> str | None:
    """Why a file of space/ is not part of the Space, or None when it is. `path` is relative to space/.

    >>> [leave_out_reason(PurePosixPath(p)) for p in ["app.py", "engine.py", "models.yaml", "static/style.css"]]
    [None, None, None, None]
    >>> leave_out_reason(PurePosixPath("deploy.py"))
    "the deploy's own code: it runs here, the Space never imports it"
    >>> leave_out_reason(PurePosixPath("__pycache__/engine.cpython-311.pyc"))
    'Python bytecode'
    >>> leave_out_reason(PurePosixPath("votes/votes.jsonl"))
    'vote log or app output'
    >>> leave_out_reason(PurePosixPath(".pytest_cache/v/cache/nodeids"))
    'hidden (cache or editor file)'
    >>> leave_out_reason(PurePosixPath("README_space.md"))
    'the Space card template, rendered into README.md'
    """
    if "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo"):
        return "Python bytecode"
    if any(part.startswith(".") for part in path.parts):
        return "hidden (cache or editor file)"
    if path == PurePosixPath(TEMPLATE.name):
        return SILENT_REASON
    if path.as_posix() in DEPLOY_MODULES:
        return DEPLOY_REASON
    if {"votes", "flagged"} & set(path.parts[:-1]) or path.suffix in (".jsonl", ".log"):
        return "vote log or app output"
    if path.suffix in (".gguf", ".safetensors", ".bin"):
        return "model file (the Space downloads its models from their repos)"
    if path.suffix in (".tmp", ".partial"):
        return "temporary file"
    return None


def space_files(space_dir: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """The files of space/ that the Space gets, and the ones left out with the reason (sorted, POSIX paths)."""
    kept, left_out = [], []
    for path in sorted(space_dir.rglob("*")):
        if not path.is_file():
            continue
        relative = PurePosixPath(path.relative_to(space_dir).as_posix())
        reason = leave_out_reason(relative)
        if reason is None:
            kept.append(str(relative))
        elif reason not in QUIET_REASONS:  # the rest is worth a line
            left_out.append((str(relative), reason))
    return kept, left_out
