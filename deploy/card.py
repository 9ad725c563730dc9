"""The Space's card, its README.md: the YAML front matter the Hub reads (sdk, app_file, models, ...) and the body,
deploy/space_card.md with its {{placeholders}} filled for one DeployConfig."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from common.cli import UsageError
from deploy.config import GGUF_PATTERN

# The card's template stays beside the app it describes; the deploy renders it and leaves the file itself behind.
TEMPLATE = Path(__file__).resolve().with_name("space_card.md")
PACKAGE = "space"  # deploy/tree.py's SPACE_DIR goes to space/ in the Space whatever its name: the app imports space.*
APP_NAME = "app.py"  # in SPACE_DIR
APP_FILE = f"{PACKAGE}/{APP_NAME}"  # the card's app_file: the Space runs `python space/app.py` from its root
PYTHON_VERSION = "3.11"  # the version the app is tested with here

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
