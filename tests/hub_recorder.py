"""A stand-in for huggingface_hub.HfApi at the narrowest boundary: it records every call, checks each against
HfApi's real signature (a keyword HfApi would reject fails here too), and answers like the Hub."""

import inspect
from dataclasses import dataclass, field

from huggingface_hub import CommitOperationAdd, HfApi, SpaceInfo, SpaceRuntime
from huggingface_hub.hf_api import CommitInfo, RepoUrl


@dataclass
class Call:
    method: str
    args: tuple
    kwargs: dict
    arguments: dict  # the call bound to HfApi's own signature
    operations: list = field(default_factory=list)  # create_commit: (path_in_repo, local path or bytes)


class RecordingClient:
    """Records each call and answers like the Hub, or raises `fail[method]`.

    `existing`: the files list_repo_files reports (a repo that already has content); `user`, `orgs`, `role` and
    `is_pro`: what whoami reports of the token (its user, the user's organizations, the token's role, and whether the
    user has PRO; None leaves the field out). A Space: `space_exists` (space_info finds it; create_repo makes it
    exist), `host` (where space_info says its app answers) and `runtimes`, the raw runtimes get_space_runtime answers
    one per call, the last one repeated (a runtime without `sha` gets the last commit's, as the Hub reports the
    commit a build runs).
    """

    def __init__(self, token: str | None = None, existing: list[str] | None = None, fail: dict | None = None,
                 user: str = "someone", orgs: tuple[str, ...] = (), role: str = "write", is_pro: bool | None = True,
                 space_exists: bool = False, host: str | None = None, runtimes: list[dict] | None = None):
        self.token = token  # HfApi(token=...) keeps it here too
        self.existing = existing if existing is not None else [".gitattributes", "README.md"]
        self.fail = fail or {}
        self.user, self.orgs, self.role, self.is_pro = user, orgs, role, is_pro
        self.space_exists, self.host = space_exists, host
        self.runtimes = list(runtimes or [{"stage": "RUNNING"}])
        self.last_commit = None
        self.calls: list[Call] = []

    def _record(self, method: str, args: tuple, kwargs: dict) -> Call:
        arguments = inspect.signature(getattr(HfApi, method)).bind(self, *args, **kwargs).arguments
        arguments.pop("self")
        call = Call(method, args, kwargs, arguments)
        self.calls.append(call)
        if method in self.fail:
            raise self.fail[method]
        return call

    @staticmethod
    def _url(arguments: dict) -> str:
        prefix = "spaces/" if arguments.get("repo_type") == "space" else ""
        return f"https://huggingface.co/{prefix}{arguments['repo_id']}"

    def _commit_info(self, call: Call, oid: str) -> CommitInfo:
        return CommitInfo(commit_url=f"{self._url(call.arguments)}/commit/{oid}",
                          commit_message=call.arguments["commit_message"], commit_description="", oid=oid)

    def create_repo(self, *args, **kwargs) -> RepoUrl:
        call = self._record("create_repo", args, kwargs)
        self.space_exists = self.space_exists or call.arguments.get("repo_type") == "space"
        return RepoUrl(self._url(call.arguments))

    def create_commit(self, *args, **kwargs) -> CommitInfo:
        call = self._record("create_commit", args, kwargs)
        operations = list(call.arguments["operations"])
        assert all(isinstance(op, CommitOperationAdd) for op in operations)  # adds only: nothing is deleted
        call.operations = [(op.path_in_repo, op.path_or_fileobj) for op in operations]
        self.last_commit = "0" * 40
        return self._commit_info(call, self.last_commit)

    def space_info(self, *args, **kwargs) -> SpaceInfo:
        call = self._record("space_info", args, kwargs)
        repo_id = call.arguments["repo_id"]
        if not self.space_exists:
            raise hub_error(404, "Repository not found", error_code="RepoNotFound")
        subdomain = repo_id.replace("/", "-").lower()
        return SpaceInfo(id=repo_id, sha=self.last_commit, sdk="gradio", subdomain=subdomain,
                         host=self.host or f"https://{subdomain}.hf.space")

    def get_space_runtime(self, *args, **kwargs) -> SpaceRuntime:
        self._record("get_space_runtime", args, kwargs)
        raw = self.runtimes.pop(0) if len(self.runtimes) > 1 else self.runtimes[0]
        return SpaceRuntime({"hardware": {"current": "cpu-basic", "requested": "cpu-basic"},
                             "sha": self.last_commit, **raw})

    def upload_folder(self, *args, **kwargs) -> CommitInfo:
        return self._commit_info(self._record("upload_folder", args, kwargs), "1" * 40)

    def add_space_variable(self, *args, **kwargs) -> dict:
        self._record("add_space_variable", args, kwargs)
        return {}

    def whoami(self, *args, **kwargs) -> dict:
        """The shape of the Hub's /api/whoami-v2 answer, as far as anything here reads it."""
        self._record("whoami", args, kwargs)
        answer = {"type": "user", "name": self.user, "orgs": [{"name": org} for org in self.orgs],
                  "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": self.role}}}
        return answer if self.is_pro is None else {**answer, "isPro": self.is_pro}

    def list_repo_files(self, *args, **kwargs) -> list[str]:
        self._record("list_repo_files", args, kwargs)
        return list(self.existing)


def hub_error(status: int, message: str, error_code: str | None = None) -> Exception:
    """The exception huggingface_hub itself raises for a Hub response with this status and message (and X-Error-Code:
    "RepoNotFound" makes a RepositoryNotFoundError, as the Hub's header does)."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import hf_raise_for_status

    headers = {"X-Error-Code": error_code} if error_code else {}
    response = httpx.Response(status, json={"error": message}, headers=headers,
                              request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
    try:
        hf_raise_for_status(response)
    except HfHubHTTPError as error:
        return error
    raise AssertionError(f"HTTP {status} raised nothing")
