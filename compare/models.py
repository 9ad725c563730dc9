"""The models to compare: `--model LABEL=PATH_OR_REPO_OR_URL` arguments, and loading each one as the Space does.

    spec = parse_model_argument("1B=alice/Llama-3.2-1B-Instruct-FineTome-GGUF")   # a Hub repo, the q4_k_m file
    load_models(Engine([spec]), [spec])                                        # downloads and loads it
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from common.cli import first_line
from common.hub import looks_like_repo_id
from common.llama3 import Q4_K_M_GLOB
from common.log import stage_logger
from export.errors import ExportError
from export.hub import hub_errors, validate_repo_id
from space.catalog import ModelSpec
from space.engine import Engine
from space.replies import Sampling

DEFAULT_GLOB = Q4_K_M_GLOB  # the same convention as space/models.yaml and scripts/deploy_space.py
GGUF_MAGIC = b"GGUF"

log = stage_logger("compare").info


def parse_model_argument(text: str) -> ModelSpec:
    """`LABEL=PATH` (a local GGUF), `LABEL=OWNER/NAME[:GLOB]` (a Hub repo) or `LABEL=http(s)://HOST/v1[#MODEL]` (an
    OpenAI-compatible server; MODEL, the name it expects, defaults to the label) → ModelSpec; ValueError says what is
    wrong.

    An existing path is always local; otherwise OWNER/NAME with an optional :GLOB is a Hub repo, unless it ends
    in .gguf (then it is a local file that is missing, which the caller reports).

    >>> parse_model_argument("1B=alice/Llama-3.2-1B-Instruct-FineTome-GGUF")  # doctest: +ELLIPSIS
    ModelSpec(label='1B', repo_id='alice/Llama-3.2-1B-Instruct-FineTome-GGUF', filename='*Q4_K_M.gguf', path=None, ...)
    >>> parse_model_argument("q8 = alice/X-GGUF:*Q8_0.gguf").filename
    '*Q8_0.gguf'
    >>> parse_model_argument("tiny=exports/tiny/Tiny-Q4_K_M.gguf")  # doctest: +ELLIPSIS
    ModelSpec(label='tiny', repo_id=None, filename=None, path='exports/tiny/Tiny-Q4_K_M.gguf', ...)
    >>> parse_model_argument("1B=http://10.0.0.5:8080/v1#llama-1b")  # doctest: +ELLIPSIS
    ModelSpec(label='1B', ..., base_url='http://10.0.0.5:8080/v1', model='llama-1b', api_key_env=None)
    >>> parse_model_argument("exports/tiny/Tiny-Q4_K_M.gguf")
    Traceback (most recent call last):
    ValueError: expected LABEL=PATH_OR_REPO, e.g. 1B=exports/1b/X-Q4_K_M.gguf or 1B=USER/X-GGUF
    >>> parse_model_argument("1B=alice/X-GGUF:")
    Traceback (most recent call last):
    ValueError: empty glob after ':'; give one that matches one GGUF in the repo, e.g. alice/X-GGUF:*Q4_K_M.gguf
    """
    label, separator, value = text.partition("=")
    label, value = label.strip(), value.strip()
    if not separator or not label or not value:
        raise ValueError("expected LABEL=PATH_OR_REPO, e.g. 1B=exports/1b/X-Q4_K_M.gguf or 1B=USER/X-GGUF")
    if any(character in label for character in "\n\r\t|"):
        raise ValueError("a label may not contain tabs, line breaks or '|' (it heads a column of the report)")
    if value.startswith(("http://", "https://")):
        url, _, model = value.partition("#")
        return ModelSpec(label=label, base_url=url, model=model.strip() or label)
    if Path(value).expanduser().exists():
        return ModelSpec(label=label, path=value)
    repo, colon, glob = value.partition(":")
    if repo.lower().endswith(".gguf") or value.startswith((".", "/", "~")) or not looks_like_repo_id(repo):
        return ModelSpec(label=label, path=value)  # a local path: the caller reports it if it is missing
    if colon and not glob.strip():
        raise ValueError(f"empty glob after ':'; give one that matches one GGUF in the repo, e.g. {repo}:{DEFAULT_GLOB}")
    return ModelSpec(label=label, repo_id=repo, filename=glob.strip() or DEFAULT_GLOB)


def describe_source(spec: ModelSpec) -> str:
    """Where a model comes from, as one would type it.

    >>> describe_source(ModelSpec("1B", repo_id="alice/X-GGUF", filename="*Q4_K_M.gguf"))
    'alice/X-GGUF:*Q4_K_M.gguf'
    >>> describe_source(ModelSpec("tiny", path="exports/tiny/X.gguf"))
    'exports/tiny/X.gguf'
    >>> describe_source(ModelSpec("1B", base_url="http://h:8080/v1", model="m"))
    'http://h:8080/v1#m'
    """
    if spec.is_remote:
        return f"{spec.base_url}#{spec.model}"
    return spec.path if spec.path else f"{spec.repo_id}:{spec.filename}"


def gguf_problem(path: Path) -> str | None:
    """Why a local path is not a GGUF model file (None when it looks like one)."""
    if not path.exists():
        return "no such file; give a .gguf file (export/to_gguf.py writes them) or a Hub repo USER/NAME"
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        hint = f", e.g. {found[0]}" if found else ""
        return f"is a folder; give the .gguf file in it{hint}"
    try:
        with path.open("rb") as file:
            magic = file.read(4)
    except OSError as error:
        return f"cannot read it ({error.strerror or error})"
    if magic != GGUF_MAGIC:
        return "not a GGUF file (it does not start with the GGUF magic bytes); give a .gguf file export/to_gguf.py wrote"
    return None


def check_model_arguments(texts: list[str]) -> tuple[list[ModelSpec], list[str]]:
    """The models of the --model arguments, and one line per problem with them (a malformed argument, a bad repo
    id, a local path that is not a GGUF, a label given twice): all of them, so that they are reported at once."""
    models: list[ModelSpec] = []
    problems: list[str] = []
    if not texts:
        problems.append("--model: give at least one model, e.g. --model 1B=USER/Llama-3.2-1B-Instruct-FineTome-GGUF "
                        "or --model tiny=exports/tiny/X-Q4_K_M.gguf")
    for text in texts:
        try:
            spec = parse_model_argument(text)
        except ValueError as error:
            problems.append(f"--model {text!r}: {error}")
            continue
        if spec.is_remote:
            pass  # reachable or not is found by load_models, with the server's own answer
        elif spec.repo_id:
            try:
                validate_repo_id(spec.repo_id, "--model")
            except ExportError as error:
                problems.append(f"--model {text!r}: {str(error).split(': ', 1)[-1]}")
                continue
        else:
            problem = gguf_problem(Path(spec.path).expanduser())
            if problem:
                problems.append(f"--model {text!r}: {problem}")
                continue
            spec = replace(spec, path=str(Path(spec.path).expanduser()))
        models.append(spec)
    labels = [text.partition("=")[0].strip() for text in texts]
    for label in sorted({label for label in labels if label and labels.count(label) > 1}):
        problems.append(f"--model: the label {label!r} is given {labels.count(label)} times; give each model its own "
                        "label")
    return models, problems


def load_models(engine: Engine, specs: list[ModelSpec]) -> dict[str, float]:
    """Load (and for Hub repos first download) every model before any measuring, so that a model that cannot be had
    fails the run in seconds rather than after the others were measured. Returns each model's load time.
    Failures become one-line ExportErrors naming the --model argument and the fix."""
    load_s = {}
    for spec in specs:
        log(f"[{spec.label}] loading {describe_source(spec)}" + (" (downloading it if needed)" if spec.repo_id else ""))
        started = time.perf_counter()
        where = f"--model {spec.label}={describe_source(spec)}"
        try:
            if spec.is_remote:  # a one-token question: an unreachable server fails the run now, not after the others
                reply = list(engine.stream_chat(spec.label, "Hi", sampling=Sampling(max_new_tokens=1)))[-1]
                if reply.error:
                    raise ExportError(f"{where}: {reply.error}")
            elif spec.repo_id:
                with hub_errors(f"{where}: downloading from the Hub", None, retry="run the command again", fixes={
                        401: "the repo is private or gated: set HF_TOKEN or run `hf auth login`",
                        404: "no such repo (or it is private): check the id, or give a local .gguf path"}):
                    try:
                        engine.get(spec.label)
                    except ValueError as error:  # Llama.from_pretrained: no file, or several, match the glob
                        raise ExportError(f"{where}: {first_line(error)}; give a glob that matches one GGUF file, "
                                          f"e.g. {spec.repo_id}:{DEFAULT_GLOB}") from error
            else:
                engine.get(spec.label)
        except ExportError:
            raise
        except Exception as error:  # llama.cpp could not load the file, the template is missing, ...
            raise ExportError(f"{where}: could not load it ({first_line(error)}); re-export it with "
                              "export/to_gguf.py") from error
        load_s[spec.label] = round(time.perf_counter() - started, 2)
    return load_s
