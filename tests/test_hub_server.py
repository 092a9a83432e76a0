"""The local Hub (hub_server.py) end to end with the real clients, each run in a fresh process online against it:
huggingface_hub pushes (regular files and LFS) and downloads, a PMG model and tokenizer pushed with `push_to_hub` and
loaded with `trust_remote_code` where pmg is not installed, and the client's usual errors for what does not exist.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from hub_server import LFS_THRESHOLD, hub_env

pytest_plugins = ["hub_server"]  # the local_hub fixture


def run_client(script: str, endpoint: str, hf_home: Path, *args: object) -> str:
    """Run `script` with `args` in a fresh Python process that talks to the hub at `endpoint`; return its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        env=hub_env(endpoint, hf_home),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"client failed:\n{result.stdout}\n{result.stderr[-6000:]}"
    return result.stdout


PUSH_FOLDER = """
    import sys
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("org/tiny", exist_ok=True)
    print(api.upload_folder(folder_path=sys.argv[1], repo_id="org/tiny", commit_message="Upload folder").oid)
"""

DOWNLOAD_REVISIONS = """
    import json, sys
    from huggingface_hub import HfApi, RepoFile, snapshot_download

    cache_dir, *revisions = sys.argv[1:]
    snapshots = {
        revision: snapshot_download("org/tiny", revision=revision, cache_dir=cache_dir)
        for revision in revisions
    }
    tree = HfApi().list_repo_tree("org/tiny", recursive=True)
    in_lfs = {entry.path: entry.lfs is not None for entry in tree if isinstance(entry, RepoFile)}
    print(json.dumps({"snapshots": snapshots, "in_lfs": in_lfs}))
"""


def test_folder_round_trips_through_regular_and_lfs_uploads_and_main_follows_new_commits(local_hub, tmp_path):
    folder = tmp_path / "folder"
    (folder / "weights").mkdir(parents=True)
    (folder / "notes.txt").write_text("first version\n")
    (folder / "weights" / "blob.dat").write_bytes(os.urandom(LFS_THRESHOLD + 1024 * 1024))
    original = {path: (folder / path).read_bytes() for path in ("notes.txt", "weights/blob.dat")}
    home = tmp_path / "home"
    first = run_client(PUSH_FOLDER, local_hub, home, folder).strip()
    (folder / "notes.txt").write_text("second version\n")
    second = run_client(PUSH_FOLDER, local_hub, home, folder).strip()  # repo exists: exist_ok, blob.dat unchanged
    assert len(first) == len(second) == 40 and first != second

    fresh_cache = tmp_path / "download-cache"
    answer = json.loads(run_client(DOWNLOAD_REVISIONS, local_hub, home, fresh_cache, "main", first))
    assert answer["in_lfs"] == {".gitattributes": False, "notes.txt": False, "weights/blob.dat": True}
    at_main, at_first = (Path(answer["snapshots"][revision]) for revision in ("main", first))
    assert at_main.name == second and at_first.name == first
    assert (at_main / "notes.txt").read_text() == "second version\n"
    for path, content in original.items():
        assert (at_first / path).read_bytes() == content, path
    assert (at_main / "weights" / "blob.dat").read_bytes() == original["weights/blob.dat"]


PUSH_PMG = """
    import sys
    import torch
    from pmg import PMGConfig, PMGForCausalLM
    from pmg.data import train_tokenizer

    torch.manual_seed(0)
    tokenizer = train_tokenizer(["To be, or not to be, that is the question:"] * 8, vocab_size=300)
    config = PMGConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, gate_rank=8, chunk_size=8, pad_token_id=tokenizer.pad_token_id,
    )
    model = PMGForCausalLM(config).eval()
    with torch.no_grad():  # fresh PMG models are identity maps through their residual branches
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    model.push_to_hub("org/tiny-pmg")
    tokenizer.push_to_hub("org/tiny-pmg")
    ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, sys.argv[1])
"""

LOAD_PMG_WITHOUT_PMG = """
    import sys
    sys.modules["pmg"] = None  # as if pmg were not installed: any import of it fails
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    expected = torch.load(sys.argv[1])
    model = AutoModelForCausalLM.from_pretrained("org/tiny-pmg", trust_remote_code=True).eval()
    assert "transformers_modules" in type(model).__module__, type(model).__module__
    tokenizer = AutoTokenizer.from_pretrained("org/tiny-pmg", trust_remote_code=True)
    ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids
    assert torch.equal(ids, expected["ids"]), (ids, expected["ids"])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected["logits"])
"""


def test_pmg_pushed_to_the_hub_loads_with_remote_code_where_pmg_is_not_installed(local_hub, tmp_path):
    expected = tmp_path / "expected.pt"
    run_client(PUSH_PMG, local_hub, tmp_path / "pusher-home", expected)
    assert torch.load(expected)["logits"].std() > 0
    run_client(LOAD_PMG_WITHOUT_PMG, local_hub, tmp_path / "loader-home", expected)


DATASET_ROUND_TRIP = """
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError

    api = HfApi()
    api.create_repo("org/tiny", repo_type="dataset")
    api.upload_file(
        path_or_fileobj=b"text\\nhello\\n", path_in_repo="data/train.csv", repo_id="org/tiny", repo_type="dataset"
    )
    with open(hf_hub_download("org/tiny", "data/train.csv", repo_type="dataset")) as file:
        assert file.read() == "text\\nhello\\n"
    assert api.list_repo_files("org/tiny", repo_type="dataset") == [".gitattributes", "data/train.csv"]
    try:
        api.model_info("org/tiny")
    except RepositoryNotFoundError:
        pass
    else:
        raise AssertionError("the dataset org/tiny is no model repo")
"""


def test_dataset_repos_are_kept_apart_from_model_repos(local_hub, tmp_path):
    run_client(DATASET_ROUND_TRIP, local_hub, tmp_path / "home")


MISSING_THINGS = """
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    def expect(error, call, *args, **kwargs):
        try:
            call(*args, **kwargs)
        except error:
            return
        raise AssertionError(f"{call.__name__}{args} did not raise {error.__name__}")

    expect(RepositoryNotFoundError, snapshot_download, "org/missing")
    expect(RepositoryNotFoundError, hf_hub_download, "org/missing", "config.json")
    HfApi().create_repo("org/present")
    expect(EntryNotFoundError, hf_hub_download, "org/present", "config.json")
    expect(RevisionNotFoundError, snapshot_download, "org/present", revision="no-such-branch")
"""


def test_missing_repos_files_and_revisions_raise_the_clients_usual_errors(local_hub, tmp_path):
    run_client(MISSING_THINGS, local_hub, tmp_path / "home")
