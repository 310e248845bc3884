"""The suite's hub server answers huggingface_hub's calls as the hub does: each error is the class the
real hub's answer maps to, and refs, trees, paths-info, tags and repo info read back what was committed."""

from __future__ import annotations

import pytest

from hub_repos import GATED_ID, MODEL_ID, PRIVATE_ID, serve_test_repos
from hub_server import TOKEN, HubServer


@pytest.fixture(scope="module")
def hub():
    server = serve_test_repos(HubServer())
    yield server
    server.close()


@pytest.fixture(scope="module")
def api(hub):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token=TOKEN)


def test_each_refusal_is_the_error_class_of_the_real_hubs_answer(hub, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def fetch(repo_id: str, name: str = "config.json", revision: str | None = None, token=False):
        return hf_hub_download(repo_id, name, revision=revision, endpoint=hub.url, token=token, cache_dir=tmp_path)

    with pytest.raises(RepositoryNotFoundError) as missing:
        fetch("test-org/no-such-model")
    assert missing.value.response.status_code == 401  # anonymous: 401, as for a private repo
    with pytest.raises(RepositoryNotFoundError) as private:
        fetch(PRIVATE_ID)
    assert private.value.response.status_code == 401 and not isinstance(private.value, GatedRepoError)
    with pytest.raises(GatedRepoError):
        fetch(GATED_ID)
    with pytest.raises(RevisionNotFoundError):
        fetch(MODEL_ID, revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        fetch(MODEL_ID, "no-such-file.json")
    assert fetch(PRIVATE_ID, token=TOKEN).endswith("config.json")  # the token opens it


def test_refs_tree_paths_info_tags_and_info_read_back_the_commits(hub, api):
    api.create_tag(MODEL_ID, tag="v1.0")
    hub.commit(MODEL_ID, {"README.md": b"# tiny\n"}, message="Add a card")
    refs = api.list_repo_refs(MODEL_ID)
    assert [(ref.name, ref.target_commit) for ref in refs.branches] == [("main", hub.head(MODEL_ID))]
    assert [ref.name for ref in refs.tags] == ["v1.0"] and refs.tags[0].target_commit != hub.head(MODEL_ID)
    assert api.model_info(MODEL_ID, revision="v1.0").sha == refs.tags[0].target_commit

    tree = {entry.path: entry for entry in api.list_repo_tree(MODEL_ID)}
    assert "README.md" in tree and tree["model-00001-of-00002.safetensors"].lfs is not None
    assert tree["config.json"].lfs is None  # a regular file: committed inline
    at_tag = [entry.path for entry in api.list_repo_tree(MODEL_ID, revision="v1.0")]
    assert "README.md" not in at_tag
    info = api.get_paths_info(MODEL_ID, ["config.json", "no-such-file"])
    assert [entry.path for entry in info] == ["config.json"] and info[0].size == len(hub.files(MODEL_ID)["config.json"])
