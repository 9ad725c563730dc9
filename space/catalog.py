"""The models the Space may serve: space/models.yaml, the SPACE_MODELS variable that overrides it, or local GGUFs.
An entry is a Hub GGUF (repo_id + filename), a local GGUF (path), or an OpenAI-compatible server (base_url + model,
optionally api_key_env: the environment variable or Space secret holding its key), served by space/remote.py.

    from space.catalog import catalog_from_paths, load_catalog
    load_catalog()                                    # $SPACE_MODELS if set, else space/models.yaml
    catalog_from_paths(["Tiny-Q4_K_M.gguf"])          # `python space/app.py --model PATH`

Every problem of every entry is reported at once, in one UserError.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from common.cli import one_line
from space.replies import UserError

__all__ = ["ModelSpec", "load_catalog", "catalog_from_paths", "catalog_from_servers", "CATALOG_ENV",
           "DEFAULT_CATALOG"]

DEFAULT_CATALOG = Path(__file__).with_name("models.yaml")
CATALOG_ENV = "SPACE_MODELS"


@dataclass(frozen=True)
class ModelSpec:
    """One model the Space may serve: a Hub repo + filename glob, a local GGUF path, or a server's base URL + model."""

    label: str
    repo_id: str | None = None
    filename: str | None = None  # glob matching exactly one file in repo_id, e.g. "*Q4_K_M.gguf"
    path: str | None = None
    base_url: str | None = None  # an OpenAI-compatible API, e.g. http://10.0.0.5:8080/v1
    model: str | None = None  # the model name that server expects
    api_key_env: str | None = None  # the environment variable holding its API key (never the key itself)

    @property
    def is_remote(self) -> bool:
        return self.base_url is not None


_SPEC_KEYS = ("label", "repo_id", "filename", "path", "base_url", "model", "api_key_env")


def _spec_problems(entry, position: int) -> list[str]:
    """What is wrong with one catalog entry (empty when it is valid).

    >>> _spec_problems({"label": "1B", "path": "1b.gguf"}, 1)
    []
    >>> _spec_problems({"label": "1B", "path": "1b.gguf", "size": "1B"}, 2)
    ["entry 2 ('1B'): unknown key(s) size; allowed: label, repo_id, filename, path, base_url, model, api_key_env"]
    >>> _spec_problems({"label": "1B", "base_url": "localhost:8080"}, 3)  # doctest: +NORMALIZE_WHITESPACE
    ["entry 3 ('1B'): base_url 'localhost:8080' must start with http:// or https://",
     "entry 3 ('1B'): base_url and model go together (model: the name the server expects)"]
    """
    if not isinstance(entry, Mapping):
        return [f"entry {position}: expected a mapping like {{label, repo_id, filename}} or {{label, path}}, "
                f"got {one_line(repr(entry), 80)}"]
    name = f"entry {position} ({entry['label']!r})" if isinstance(entry.get("label"), str) else f"entry {position}"
    problems = []
    unknown = sorted(str(key) for key in entry if key not in _SPEC_KEYS)
    if unknown:
        problems.append(f"{name}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_SPEC_KEYS)}")
    for key in _SPEC_KEYS:
        value = entry.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            problems.append(f"{name}: {key} must be a non-empty string")
    if not entry.get("label"):
        problems.append(f"{name}: needs a label")
    has_hub = bool(entry.get("repo_id") or entry.get("filename"))
    has_remote = bool(entry.get("base_url") or entry.get("model") or entry.get("api_key_env"))
    if has_hub + bool(entry.get("path")) + has_remote != 1:
        problems.append(f"{name}: give one of repo_id + filename (a Hub GGUF), path (a local GGUF) or base_url + "
                        "model (an OpenAI-compatible server)")
    elif has_hub and not (entry.get("repo_id") and entry.get("filename")):
        problems.append(f"{name}: repo_id and filename go together (e.g. filename: \"*Q4_K_M.gguf\")")
    elif has_remote:
        url = entry.get("base_url")
        if isinstance(url, str) and not url.startswith(("http://", "https://")):
            problems.append(f"{name}: base_url {url!r} must start with http:// or https://")
        if not (url and entry.get("model")):
            problems.append(f"{name}: base_url and model go together (model: the name the server expects)")
    return problems


def _catalog_from_entries(entries, source: str) -> list[ModelSpec]:
    """Validated ModelSpecs; every problem of every entry reported at once in one UserError."""
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{source}: expected a non-empty list of models, got {one_line(repr(entries), 80)}")
    problems = [problem for position, entry in enumerate(entries, 1) for problem in _spec_problems(entry, position)]
    labels = [entry.get("label") for entry in entries if isinstance(entry, Mapping)]
    duplicates = sorted({label for label in labels if isinstance(label, str) and labels.count(label) > 1})
    if duplicates:
        problems.append(f"duplicate label(s) {', '.join(map(repr, duplicates))}; labels must be unique")
    if problems:
        raise UserError(f"{source}: " + "; ".join(problems))
    return [ModelSpec(**entry) for entry in entries]


def load_catalog(path: Path = DEFAULT_CATALOG, env: Mapping[str, str] | None = None) -> list[ModelSpec]:
    """The models to serve: $SPACE_MODELS (a JSON list, set by scripts/deploy_space.py) or else the YAML file.

    Both hold the same entries: `{"label", "repo_id", "filename"}`, `{"label", "path"}` or
    `{"label", "base_url", "model"[, "api_key_env"]}`.
    """
    env = os.environ if env is None else env  # now, not at import time
    if env.get(CATALOG_ENV, "").strip():
        try:
            entries = json.loads(env[CATALOG_ENV])
        except json.JSONDecodeError as error:
            raise UserError(f"{CATALOG_ENV}: not valid JSON ({error}); expected a list like "
                            '[{"label": "1B", "repo_id": "user/repo", "filename": "*Q4_K_M.gguf"}]') from error
        return _catalog_from_entries(entries, CATALOG_ENV)
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"{path}: cannot read the model catalog ({one_line(error)})") from error
    if not isinstance(document, Mapping) or "models" not in document:
        raise UserError(f"{path}: expected a top-level `models:` list")
    return _catalog_from_entries(document["models"], str(path))


def catalog_from_paths(paths: Sequence[str]) -> list[ModelSpec]:
    """A catalog of local GGUF files (`app.py --model PATH`, repeatable), labelled by file name.

    >>> catalog_from_paths([__file__, __file__])[1].label
    'catalog (2)'
    """
    if not paths:
        raise UserError("--model: give at least one GGUF file")
    missing = [path for path in paths if not Path(path).expanduser().is_file()]
    if missing:
        raise UserError(f"--model: no such file: {', '.join(missing)}; give the path of a .gguf file "
                        "(export/to_gguf.py writes them)")
    specs: list[ModelSpec] = []
    for path in paths:
        stem, label, copy = Path(path).stem, Path(path).stem, 1
        while any(spec.label == label for spec in specs):
            copy += 1
            label = f"{stem} ({copy})"
        specs.append(ModelSpec(label=label, path=str(Path(path).expanduser())))
    return specs


def catalog_from_servers(arguments: Sequence[str]) -> list[ModelSpec]:
    """`app.py --server LABEL=URL#MODEL` (repeatable): OpenAI-compatible servers, checked like catalog entries.

    >>> catalog_from_servers(["1B=http://10.0.0.5:8080/v1#llama-1b"])[0].model
    'llama-1b'
    """
    entries = []
    for argument in arguments:
        label, equals, rest = argument.partition("=")
        url, _, model = rest.partition("#")
        if not (equals and label.strip() and url.strip() and model.strip()):
            raise UserError(f"--server {argument!r}: expected LABEL=URL#MODEL, e.g. "
                            "1B=http://10.0.0.5:8080/v1#llama-1b")
        entries.append({"label": label.strip(), "base_url": url.strip(), "model": model.strip()})
    return _catalog_from_entries(entries, "--server") if entries else []
