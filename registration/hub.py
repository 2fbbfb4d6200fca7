"""Publish checkpoint folders to the Hugging Face Hub, with a generated model card.

    python -m registration.hub card checkpoints/mnist/matcher
    python -m registration.hub push checkpoints/mnist/matcher ORG/REPO [--path-in-repo mnist/matcher]
                                    [--revision main] [--create] [--private]

``push`` verifies the folder (manifest, no pickle files), stages its files plus a ``README.md``
model card (data set, model kind, config, training command and metrics from ``metrics.json``) and
uploads them in one commit with ``HfApi.upload_folder`` to ``<path-in-repo>/`` (default: the
folder's last two parts, ``<dataset>/<model>``), which is where
``registration.checkpoint.load(dataset, model)`` looks. Remote files in that folder that are not
part of the upload are deleted, so the Hub folder is exactly the checkpoint. A folder without a
``manifest.json`` gets one generated in the upload. The token comes from the usual places
(``HF_TOKEN`` or ``hf auth login``); ``HF_ENDPOINT`` is honoured.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from . import checkpoint as ck

CARD = "README.md"


def _load_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return d if isinstance(d, dict) else None


def _cell(v) -> str:
    s = json.dumps(v) if isinstance(v, (list, tuple, dict, bool)) or v is None else str(v)
    return s.replace("|", "\\|")


def default_path_in_repo(folder: str | os.PathLike) -> str:
    folder = Path(folder).resolve()
    return f"{folder.parent.name}/{folder.name}"


def model_card(folder: str | os.PathLike, *, repo_id: str | None = None,
               path_in_repo: str | None = None) -> str:
    """Markdown model card for a checkpoint folder (offline; reads only JSON files)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json, not a checkpoint folder")
    path_in_repo = (path_in_repo or default_path_in_repo(folder)).strip("/")
    dataset, _, model = path_in_repo.partition("/")
    repo_id = repo_id or ck.hub_repo()[0]
    cfg = _load_json(folder / "config.json") or {}
    metrics = _load_json(folder / "metrics.json")
    manifest = ck.read_manifest(folder)
    kind = cfg.get("kind", "unknown")

    out = [f"# {path_in_repo}: {kind} checkpoint", "",
           f"Data set **{dataset}**, model **{model}** (kind `{kind}`), from the "
           "`registration` package (localize → segment → match image registration). "
           "Weights are safetensors (no pickle); `config.json` rebuilds the exact network and "
           "`manifest.json` holds the sha256 of every file, checked on load.", "",
           "## Load", "", "```python",
           "import os",
           f"os.environ['REGISTRATION_HUB_REPO'] = {repo_id!r}",
           "from registration.checkpoint import load",
           f"model = load({dataset!r}, {model!r})",
           "```", "",
           "## Training", ""]
    if metrics is None:
        out += ["No `metrics.json` in this folder: the training command and metrics are not "
                "recorded.", ""]
    else:
        command = metrics.get("command")
        out += (["```bash", str(command), "```", ""] if command
                else ["The training command was not recorded.", ""])
        scalars = {k: v for k, v in metrics.items() if k != "command"
                   and (v is None or isinstance(v, (str, int, float, bool)))}
        others = {k: v for k, v in metrics.items() if k != "command" and k not in scalars}
        out += ["## Metrics", "", "| metric | value |", "| --- | --- |"]
        out += [f"| {k} | {_cell(v)} |" for k, v in sorted(scalars.items())]
        out.append("")
        for k, v in sorted(others.items()):
            n = (f"{len(v)} entr{'y' if len(v) == 1 else 'ies'}" if isinstance(v, (list, dict))
                 else type(v).__name__)
            out.append(f"`{k}`: {n}, see `metrics.json`.")
        if others:
            out.append("")
    out += ["## Config (`config.json`)", "", "| field | value |", "| --- | --- |"]
    out += [f"| {k} | {_cell(v)} |" for k, v in sorted(cfg.items())]
    out.append("")
    if manifest is not None:
        out += ["## Files", "", "| file | bytes | sha256 |", "| --- | --: | --- |"]
        out += [f"| {n} | {e['size']} | `{e['sha256']}` |"
                for n, e in sorted(manifest["files"].items())]
        out.append("")
    return "\n".join(out)


def _stage(folder: Path, staging: Path, card: str) -> list[str]:
    """Copy (hard-link when possible) the checkpoint files, the manifest and the card."""
    manifest = ck.verify_folder(folder)  # IntegrityError on tampering / pickle files
    if manifest is not None:
        names = list(manifest["files"]) + [ck.MANIFEST]
    else:
        names = [p.name for p in sorted(folder.iterdir())
                 if p.is_file() and not p.name.startswith(".") and p.name != CARD]
    for f in ck.FILES:
        if f not in names:
            raise FileNotFoundError(f"{folder}: no {f}, not a checkpoint folder")
    for name in names:
        try:
            os.link(folder / name, staging / name)
        except OSError:
            shutil.copy2(folder / name, staging / name)
    if manifest is None:
        ck.write_manifest(staging)
        names.append(ck.MANIFEST)
    if CARD not in names:  # a README.md listed in the manifest is kept as is
        (staging / CARD).write_text(card)
        names.append(CARD)
    return sorted(names)


def push(folder: str | os.PathLike, repo_id: str, *, path_in_repo: str | None = None,
         revision: str = "main", create: bool = False, private: bool = False,
         commit_message: str | None = None, token: str | None = None):
    """Upload a verified checkpoint folder + model card to ``repo_id`` under ``path_in_repo``.
    Returns the ``CommitInfo`` of the upload."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    path_in_repo = (path_in_repo or default_path_in_repo(folder)).strip("/")
    if len([p for p in path_in_repo.split("/") if p]) != 2:
        raise ValueError(f"--path-in-repo must be DATASET/MODEL (what load(dataset, model) "
                         f"reads), got {path_in_repo!r}")
    card = model_card(folder, repo_id=repo_id, path_in_repo=path_in_repo)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="registration-hub-") as tmp:
        names = _stage(folder, Path(tmp), card)
        if create:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
        print(f"uploading {', '.join(names)} to {repo_id}@{revision}:{path_in_repo}/",
              file=sys.stderr)
        return api.upload_folder(
            repo_id=repo_id, folder_path=tmp, path_in_repo=path_in_repo, revision=revision,
            commit_message=commit_message or f"Upload checkpoint {path_in_repo}",
            delete_patterns="*")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m registration.hub", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("card", help="print the model card of a checkpoint folder")
    c.add_argument("folder")
    c.add_argument("--repo-id", default=None, help="repo shown in the load snippet")
    c.add_argument("--path-in-repo", default=None, metavar="DATASET/MODEL")
    u = sub.add_parser("push", help="upload a checkpoint folder with its model card")
    u.add_argument("folder")
    u.add_argument("repo_id")
    u.add_argument("--path-in-repo", default=None, metavar="DATASET/MODEL",
                   help="folder in the repo (default: the folder's last two path parts)")
    u.add_argument("--revision", default="main", help="branch to commit to (default main)")
    u.add_argument("--create", action="store_true",
                   help="create the repo (and branch) if missing")
    u.add_argument("--private", action="store_true", help="with --create: a private repo")
    u.add_argument("-m", "--commit-message", default=None)
    args = p.parse_args(argv)

    try:
        if args.cmd == "card":
            print(model_card(args.folder, repo_id=args.repo_id, path_in_repo=args.path_in_repo))
            return 0
        info = push(args.folder, args.repo_id, path_in_repo=args.path_in_repo,
                    revision=args.revision, create=args.create, private=args.private,
                    commit_message=args.commit_message)
        print(getattr(info, "commit_url", info))
        return 0
    except (ck.IntegrityError, FileNotFoundError, ValueError) as e:
        p.exit(1, f"{p.prog}: error: {e}\n")
    except Exception as e:  # Hub errors: no token, no write access, missing repo / branch, network
        from huggingface_hub.errors import (HfHubHTTPError, RepositoryNotFoundError,
                                            RevisionNotFoundError)

        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, RepositoryNotFoundError) or (
                isinstance(e, HfHubHTTPError)
                and getattr(e.response, "status_code", None) in (401, 403)):
            msg += ("\n(is the token set, via HF_TOKEN or `hf auth login`, with write access? "
                    "does the repo exist? pass --create to create it)")
        elif isinstance(e, RevisionNotFoundError):
            msg += f"\n(branch {args.revision!r} does not exist; pass --create to create it)"
        p.exit(1, f"{p.prog}: error: push to {args.repo_id}@{args.revision} failed: "
                  f"{type(e).__name__}: {msg}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
