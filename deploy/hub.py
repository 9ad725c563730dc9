"""The deploy's talks with the Hub: may this account create the Space, the upload (variables, then the tree in one
commit), and does the Space, once built, answer. Every failure is one HubError line (common/hub.py) that names the
Space and the fix, never the token.

Since 2026-07-21 a Gradio (or Docker) Space runs on paid compute: creating one needs PRO on a personal account, or
an organization on a Team or Enterprise plan; the Hub answers any other create with HTTP 402. Free personal accounts
may host up to 2 Gradio Spaces on ZeroGPU, which this app cannot use (README, "Serve"). A Space that already exists
is updated without a create call, whatever the account.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from huggingface_hub import CommitOperationAdd
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from common.hub import HTTP_FIXES, HubError, hub_errors, masked_line
from deploy.config import HARDWARE, VARIABLE_DESCRIPTIONS, DeployConfig
from deploy.tree import SpaceTree

PLAN_NEEDED = ("creating a Gradio Space needs a paid Hugging Face plan since 2026-07-21: PRO for a personal account, "
               "Team or Enterprise for an organization (https://huggingface.co/pricing)")
FREE_ALTERNATIVES = ("without one: `python space/app.py --share` serves the app from Colab or a laptop through a "
                     "public Gradio link, and a --space-id that already exists (created earlier, or by an "
                     "organization with a plan) is updated without a create")
# Stages (huggingface_hub.SpaceStage) after which the Space needs a person, not more waiting.
FAILED_STAGES = {"BUILD_ERROR": "build", "RUNTIME_ERROR": "container", "CONFIG_ERROR": "build",
                 "NO_APP_FILE": "build"}
STOPPED_STAGES = ("STOPPED", "PAUSED", "DELETING")
CHECK_MESSAGE = "Say hello in three words."  # the short chat the hosted Space answers for each model
CHECK_TOKENS = 8
# The fix for the HTTP statuses a deploy typically meets, on top of common/hub.py's (401, 403, 429).
DEPLOY_HTTP_FIXES = {
    **HTTP_FIXES,
    402: f"the Hub wants payment for this Space: {PLAN_NEEDED}",  # create_repo's 402 keeps the Hub's text too
}


class SpaceCheckError(HubError):
    """The Space was uploaded but does not run or answer: one line with the Hub's message and the logs link."""


def logs_url(space_id: str, kind: str = "build") -> str:
    """The Space page with its build or container log open.

    >>> logs_url("alice/chat", "container")
    'https://huggingface.co/spaces/alice/chat?logs=container'
    """
    return f"https://huggingface.co/spaces/{space_id}?logs={kind}"


def existing_space(client, space_id: str):
    """The Space's SpaceInfo, or None where the Hub has no Space by that id (a private Space of someone else reads
    as missing too: its create then fails with the Hub's own message)."""
    try:
        return client.space_info(space_id)
    except RepositoryNotFoundError:
        return None


def create_problem(space_id: str, account: dict) -> str | None:
    """Why this account cannot create `space_id`, or None when it can or whoami does not say. Only the case the
    answer settles is stopped here: a free personal account (`isPro` false) creating under its own name. An
    organization's plan is left to the Hub (its 402 says so, kept in the error), as whoami's plan fields for
    organizations are not documented.

    >>> create_problem("alice/chat", {"name": "alice", "isPro": False})[:54]
    "alice/chat: 'alice' is a free account, and creating a "
    >>> create_problem("alice/chat", {"name": "alice", "isPro": True}) is None
    True
    >>> create_problem("team/chat", {"name": "alice", "isPro": False, "orgs": [{"name": "team"}]}) is None
    True
    """
    owner = space_id.split("/", 1)[0]
    if owner == account.get("name") and account.get("isPro") is False:
        return (f"{space_id}: {owner!r} is a free account, and {PLAN_NEEDED}; {FREE_ALTERNATIVES}; a free account "
                "may also ask an organization with a plan to create the Space, then deploy to it")
    return None


def payment_error(action: str, error: HfHubHTTPError, token: str | None) -> HubError:
    """A 402 as one line: the Hub's own text first, then the plan that hosts the Space and the free alternatives."""
    hub_text = masked_line(error.server_message or str(error).splitlines()[0], token)
    return HubError(f"{action} failed (HTTP 402): {hub_text}; {PLAN_NEEDED}; {FREE_ALTERNATIVES}")


def check_account(client, config: DeployConfig, token: str | None = None):
    """Before the upload: the Space's SpaceInfo when it exists (then it is only updated), else whether this account
    may create it (create_problem); one-line HubError otherwise."""
    with hub_errors(f"deploying to the Space {config.space_id}", token, DEPLOY_HTTP_FIXES, retry="deploy again"):
        info = existing_space(client, config.space_id)
        problem = None if info is not None else create_problem(config.space_id, client.whoami())
    if problem:
        raise HubError(problem)
    return info


def upload(client, config: DeployConfig, tree: SpaceTree, token: str | None = None,
           exists: bool = False) -> dict:
    """Create the Space unless it `exists`, set its variables, and upload the tree in one commit.

    client has HfApi's interface (HfApi(token=...) in real use). Variables go first: each change restarts the Space,
    and setting them before the commit lets the build that the commit starts see them. Files already in the Space
    that the tree lacks are reported, never deleted (they may be data someone put there). A 402 on the create keeps
    the Hub's text and names the plan. Returns {"space_url", "commit_url", "commit_sha", "stale"}.
    """
    space_id, action = config.space_id, f"deploying to the Space {config.space_id}"
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content)
                  for name, content in tree.files.items()]
    with hub_errors(action, token, DEPLOY_HTTP_FIXES, retry="deploy again"):
        if not exists:
            try:
                client.create_repo(space_id, repo_type="space", space_sdk="gradio", space_hardware=HARDWARE,
                                   private=config.private, exist_ok=True)
            except HfHubHTTPError as error:
                if getattr(error.response, "status_code", None) == 402:
                    raise payment_error(action, error, token) from error
                raise
        for key, value in tree.variables.items():
            client.add_space_variable(space_id, key, value, description=VARIABLE_DESCRIPTIONS.get(key))
        existing = client.list_repo_files(space_id, repo_type="space")
        commit = client.create_commit(space_id, operations, repo_type="space",
                                      commit_message=f"Deploy the chat Space: {len(operations)} files",
                                      commit_description="Models: " + ", ".join(
                                          model.get("repo_id") or model["label"] for model in config.catalog()))
    # .gitattributes is the Hub's own (LFS rules); it is never part of the tree.
    stale = sorted(set(existing) - set(tree.files) - {".gitattributes"})
    return {"space_url": f"https://huggingface.co/spaces/{space_id}", "stale": stale,
            "commit_url": getattr(commit, "commit_url", None), "commit_sha": getattr(commit, "oid", None)}


BUILD_STAGES = ("BUILDING", "RUNNING_BUILDING", "APP_STARTING", "RUNNING_APP_STARTING")


@dataclass
class Wait:
    poll_interval: float = 15.0  # seconds between two get_space_runtime calls
    timeout: float = 1800.0  # the first build compiles llama.cpp: 10-15 minutes
    # Where the runtime does not name its commit: RUNNING this long with no build seen means the push did not
    # rebuild the Space (the Hub starts a build within seconds of a commit that changes its files).
    settle: float = 60.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic


def wait_until_running(client, space_id: str, commit_sha: str | None, wait: Wait, say=print):
    """Follow the Space's runtime until it runs this commit, then its SpaceInfo (where the app answers);
    SpaceCheckError on a failed stage, a stopped Space or the timeout.

    Right after the commit the runtime may still show the previous build RUNNING. Where it names its commit (`sha`),
    only this commit counts; where it does not, RUNNING counts once a build stage was seen, or after `settle`
    seconds of RUNNING with none. RUNNING_BUILDING is the old build serving while the new one builds."""
    say("waiting for the build (the first compiles llama.cpp, 10-15 minutes; --no-wait skips this):")
    deadline, last, rebuilt, running_since = wait.clock() + wait.timeout, None, False, None
    while True:
        runtime = client.get_space_runtime(space_id)
        stage, raw = str(getattr(runtime.stage, "value", runtime.stage)), runtime.raw or {}
        rebuilt = rebuilt or stage in BUILD_STAGES
        running_since = (running_since or wait.clock()) if stage == "RUNNING" else None
        if raw.get("sha") is not None:
            current = commit_sha is None or raw["sha"] == commit_sha
        else:
            current = rebuilt or (running_since is not None and wait.clock() - running_since >= wait.settle)
        if stage in FAILED_STAGES:
            kind = FAILED_STAGES[stage]
            message = masked_line(raw.get("errorMessage") or "the Hub gave no message", None)
            raise SpaceCheckError(f"the Space {space_id} stopped at {stage}: {message}; read the {kind} log at "
                                  f"{logs_url(space_id, kind)}, fix the cause and deploy again")
        if stage in STOPPED_STAGES:
            raise SpaceCheckError(f"the Space {space_id} is {stage}: restart it on its Settings tab "
                                  f"(https://huggingface.co/spaces/{space_id}/settings), then deploy again")
        if stage == "RUNNING" and current:
            say(f"  {stage} ({runtime.hardware or 'hardware not reported'})")
            return client.space_info(space_id)
        shown = stage
        if not current and stage not in BUILD_STAGES:
            shown += " (still the previous commit)" if raw.get("sha") else " (waiting for the new build to start)"
        if shown != last:
            say(f"  {shown}")
            last = shown
        if wait.clock() >= deadline:
            raise SpaceCheckError(f"the Space {space_id} is still {stage} after {wait.timeout:g} s: follow it at "
                                  f"{logs_url(space_id)} (or wait longer: --wait-timeout)")
        wait.sleep(wait.poll_interval)


def space_url(info, space_id: str) -> str:
    """Where the running app answers: the Space's own host (https://USER-NAME.hf.space)."""
    if getattr(info, "host", None):
        return info.host
    subdomain = getattr(info, "subdomain", None) or space_id.replace("/", "-").replace("_", "-").replace(".", "-")
    return f"https://{subdomain.lower()}.hf.space"


def check_answers(url: str, labels: list[str], token: str | None, space_id: str, say=print) -> None:
    """One short greedy chat per model through the app's /chat API; SpaceCheckError unless each answers a token."""
    from gradio_client import Client

    say(f"chatting once with each model at {url}:")
    try:
        app = Client(url, token=token, verbose=False)
    except Exception as error:  # gradio_client raises many kinds: all mean "the app does not answer"
        raise SpaceCheckError(f"the Space {space_id} runs but its app at {url} does not answer "
                              f"({masked_line(error, token)[:200]}); read {logs_url(space_id, 'container')}") from error
    for label in labels:
        try:
            # /chat's inputs: message, model, system prompt, temperature, top_p, max new tokens (greedy here);
            # its history is session state, which the API leaves out.
            answer, stats = app.predict(CHECK_MESSAGE, label, "", 0.0, 1.0, CHECK_TOKENS, api_name="/chat")
        except Exception as error:
            raise SpaceCheckError(f"the Space {space_id}: /chat with {label!r} failed "
                                  f"({masked_line(error, token)[:200]}); read {logs_url(space_id, 'container')}") \
                from error
        if not answer or "token" not in str(stats):  # an error reply has text but no statistics
            raise SpaceCheckError(f"the Space {space_id}: {label!r} answered no token "
                                  f"({masked_line(answer, token)[:200]!r}); read {logs_url(space_id, 'container')}")
        say(f"  {label}: {masked_line(answer, token)[:60]!r} ({stats})")
