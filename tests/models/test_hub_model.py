"""Hub-style model names (``org/name``) resolve through the local Hugging Face cache first, laid out
here by ``huggingface_hub``'s own cache functions (blobs, snapshots, refs) and checked with its
``scan_cache_dir``; no network is used (a download attempt goes to a closed loopback port)."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants, scan_cache_dir  # noqa: E402
from huggingface_hub.file_download import (  # noqa: E402
    _cache_commit_hash_for_specific_revision,
    _create_symlink,
    _get_pointer_path,
    repo_folder_name,
)

from jaxpaged.hub_model import looks_like_repo_id  # noqa: E402
from jaxpaged.model_source import resolve_model_source  # noqa: E402
from tests.helpers.tiny_checkpoint import make_tiny_checkpoint  # noqa: E402

REPO = "jaxpaged-test/tiny-llama"
COMMIT_MAIN = "a" * 40
COMMIT_V2 = "b" * 40


def put_in_hf_cache(cache_dir: str, repo_id: str, commit: str, folder: str, refs: tuple[str, ...]) -> str:
    """Stores every file of ``folder`` as huggingface_hub's downloads do; returns the snapshot."""
    storage = os.path.join(cache_dir, repo_folder_name(repo_id=repo_id, repo_type="model"))
    for name in sorted(os.listdir(folder)):
        data = open(os.path.join(folder, name), "rb").read()
        blob = os.path.join(storage, "blobs", hashlib.sha256(data).hexdigest())
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        pointer = _get_pointer_path(storage, commit, name)
        os.makedirs(os.path.dirname(pointer), exist_ok=True)
        new = not os.path.exists(blob)
        if new:
            shutil.copyfile(os.path.join(folder, name), blob)
        _create_symlink(blob, pointer, new_blob=new)
    for ref in refs:
        _cache_commit_hash_for_specific_revision(storage, ref, commit)
    return os.path.join(storage, "snapshots", commit)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_dir):
    cache = str(tmp_path / "hub")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    main = put_in_hf_cache(cache, REPO, COMMIT_MAIN, tiny_dir, ("main",))
    v2 = put_in_hf_cache(cache, REPO, COMMIT_V2, tiny_dir, ("v2",))
    return cache, main, v2


def test_cache_layout_is_huggingface_hubs_own(hub_cache):
    cache, _, _ = hub_cache
    (repo,) = scan_cache_dir(cache).repos
    assert repo.repo_id == REPO and repo.repo_type == "model"
    assert {r.commit_hash: set(r.refs) for r in repo.revisions} == {COMMIT_MAIN: {"main"}, COMMIT_V2: {"v2"}}


def test_names_and_revisions_resolve_from_the_local_cache(hub_cache):
    _, main, v2 = hub_cache
    assert looks_like_repo_id(REPO) and not looks_like_repo_id("/abs/path") and not looks_like_repo_id("a/b/c")
    source = resolve_model_source(REPO)
    assert source.model_path == source.config_dir == main
    assert os.path.isfile(os.path.join(main, "config.json")) and os.path.isfile(os.path.join(main, "model.safetensors"))
    assert resolve_model_source(REPO, revision="v2").model_path == v2
    assert resolve_model_source(REPO, revision=COMMIT_V2).model_path == v2
    assert resolve_model_source(REPO, revision="main").model_path == main


def test_missing_repo_offline_names_it(hub_cache):
    with pytest.raises(ValueError, match=r"model 'jaxpaged-test/absent'.*not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        resolve_model_source("jaxpaged-test/absent")
    with pytest.raises(ValueError, match=r"revision 'nope'"):
        resolve_model_source(REPO, revision="nope")


def test_missing_repo_online_tries_the_hub_and_says_why_it_failed(hub_cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "2")
    with pytest.raises(ValueError, match=r"model 'jaxpaged-test/absent' is neither in the local Hugging Face cache"):
        resolve_model_source("jaxpaged-test/absent")
    assert resolve_model_source(REPO).model_path == hub_cache[1]  # the cache still comes first


def test_hf_home_and_offline_from_the_environment(tmp_path, tiny_dir):
    main = put_in_hf_cache(str(tmp_path / "home" / "hub"), REPO, COMMIT_MAIN, tiny_dir, ("main",))
    env = dict(os.environ, HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", PYTHONPATH=os.getcwd())
    env.pop("HF_HUB_CACHE", None)
    code = f"from jaxpaged.model_source import resolve_model_source; print(resolve_model_source({REPO!r}).model_path)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == main


def test_engine_loads_a_hub_name(hub_cache, tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from jaxpaged import LLM, SamplingParams
    from tests.helpers.parity_helpers import torch_reference

    llm = LLM(model=REPO, revision="v2", max_num_seqs=2, max_num_batched_tokens=32, max_model_len=64, block_size=8)
    assert llm.model_path == hub_cache[2]
    out = llm.generate(["The quick brown fox"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ref_tokens, _ = torch_reference(ref_model, out.prompt_token_ids, 8)
    assert out.outputs[0].token_ids == ref_tokens
