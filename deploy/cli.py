"""Deploy the chat Space: create (or update) a Gradio Space on CPU hardware that serves the q4_k_m GGUFs, wait for
its build and check that every model answers. The logic of scripts/deploy_space.py, its entry point (more commands
in its docstring):

    python scripts/deploy_space.py --space-id USER/finetome-chat --model-1b USER/X-GGUF --dry-run out/space

The steps: the flags (deploy/config.py), the Space's files (deploy/tree.py, the card: deploy/card.py), then the Hub
(deploy/hub.py). The model catalog reaches the app as the Space variable SPACE_MODELS (--base-models adds the untuned
Llama-3.2 1B and 3B Instruct GGUFs); --votes-repo also sets SPACE_VOTES_REPO, --report ships compare's report and
sets SPACE_REPORT, and --variable KEY=VALUE any other variable the app reads (SPACE_VOTES_PATH, SPACE_N_CTX,
SPACE_COMPARE_MODE). Variables persist on the Space: one a previous deploy set and this one does not mention is left
as it is.

The token comes from HF_TOKEN or the saved login (`hf auth login`), is checked before any work, and only ever goes
to HfApi(token=...). --dry-run DIR needs neither a token nor the network: it writes the exact tree that would be
uploaded into DIR, plus DIR/.space_variables.json (the variables; not part of the upload).

Creating a Gradio Space needs a paid plan (PRO, or an organization on Team or Enterprise; deploy/hub.py): a free
account is stopped before the upload, with its free alternatives; a Space that exists is updated without a create.
After the commit the deploy follows the Space's build to RUNNING and chats once with every model through the app's
/chat API; --no-wait commits and returns.
"""

from __future__ import annotations

from pathlib import Path

from common.cli import UsageError, report_problem
from common.hub import HubError, hub_errors, resolve_token
from deploy.config import HARDWARE, VARIABLES_FILE, config_from_args
from deploy.hub import Wait, check_account, check_answers, space_url, upload, wait_until_running
from deploy.tree import SpaceTree, build_tree, write_dry_run

NO_TOKEN = ("deploying needs a Hugging Face token with write access: set HF_TOKEN or run `hf auth login` "
            "(--dry-run DIR builds the Space's files without one)")


def _print_tree(tree: SpaceTree) -> None:
    for name, content in tree.files.items():
        print(f"  {name}  ({len(content):,} bytes)")
    for name, reason in tree.left_out:
        print(f"  left out: space/{name} ({reason})")
    for key, value in tree.variables.items():
        print(f"  variable {key} = {value}")


def main(argv: list[str] | None = None, client=None) -> int:
    try:
        config = config_from_args(argv)
    except UsageError as error:
        return error.report()

    token = None
    if not config.dry_run:
        try:
            token = resolve_token(missing=NO_TOKEN)  # before any work: a missing token should not cost a build first
        except HubError as error:
            return report_problem(error)

    try:
        tree = build_tree(config)
        if config.dry_run:
            target = Path(config.dry_run).expanduser()
            write_dry_run(target, config, tree)
            print(f"dry run: the Space {config.space_id} would get these files, now in {target}/ "
                  f"(variables in {target / VARIABLES_FILE}, not uploaded):")
            _print_tree(tree)
            print("nothing was uploaded; run again without --dry-run to deploy")
            return 0
    except UsageError as error:
        return error.report()

    if client is None:
        from huggingface_hub import HfApi

        client = HfApi(token=token)
    try:
        info = check_account(client, config, token)
        print(f"{'updating' if info else 'creating'} the Space {config.space_id} ({HARDWARE}):")
        _print_tree(tree)
        result = upload(client, config, tree, token=token, exists=info is not None)
        for name in result["stale"]:
            print(f"note: the Space also has {name}, which this deploy did not write; delete it on the Space's Files "
                  "tab if it is left over from an earlier version")
        if result["commit_url"]:
            print(f"commit: {result['commit_url']}")
        if config.no_wait:
            print("the first build compiles llama.cpp (about 10-15 minutes); follow it in the Space's Logs tab")
        else:
            with hub_errors(f"following the Space {config.space_id}", token, retry="deploy again"):
                info = wait_until_running(client, config.space_id, result["commit_sha"],
                                          Wait(config.poll_interval, config.wait_timeout))
            check_answers(space_url(info, config.space_id), [model["label"] for model in config.catalog()], token,
                          config.space_id)
            print("every model answered: the Space is up")
    except HubError as error:
        return report_problem(error)
    print(f"Space: {result['space_url']}")
    return 0
