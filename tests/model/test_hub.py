"""Models by name: Hub ids and kaggle: handles load from each library's own cache, offline.

The caches are laid out as huggingface_hub and kagglehub write them (``write_hub_cache``,
``write_kaggle_cache``), and found through the libraries' own lookups. Failures a user
meets online (gated repo, no such repo, no credentials) are raised at the library
boundary with the library's own error classes.
"""

from __future__ import annotations

import sys

import pytest
import torch

from paligemma_xray.errors import CheckpointError
from paligemma_xray.infer import Detector
from paligemma_xray.model import hub, load, save_lora
from paligemma_xray.model.tiny import (
    tiny_model,
    write_hub_cache,
    write_kaggle_cache,
    write_tiny_hf,
    write_tiny_npz,
)

MIX = "google/paligemma-3b-mix-224"
PG2 = "google/paligemma2-3b-pt-224"
KAGGLE = "google/paligemma/jax/paligemma-3b-pt-224"


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty Hub cache in HF_HOME, HF_HUB_OFFLINE=1, no token."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("HF_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    import huggingface_hub.constants

    # Not the user's own login (the library fixes the token file's path when imported).
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    # In-process callers other than ours (peft checks a Hub base's config) stay offline too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return home


def _cache(hf_home, tmp_path, repo_id, version=1, seed=0, **options):
    folder = write_tiny_hf(tmp_path / f"src-{repo_id.replace('/', '-')}-{seed}", version=version, seed=seed)
    return write_hub_cache(hf_home, repo_id, folder, **options)


def _same_weights(model, reference) -> bool:
    ours, theirs = model.state_dict(), reference.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize(("repo_id", "version"), [(MIX, 1), (PG2, 2)])
def test_hub_id_loads_from_the_cache_offline(hf_home, tmp_path, repo_id, version):
    _cache(hf_home, tmp_path, repo_id, version=version, seed=3)
    model, processor = load(repo_id, progress=False)
    assert _same_weights(model, tiny_model(version, seed=3)[0])
    assert model.config.text_config.model_type == ("gemma" if version == 1 else "gemma2")
    assert processor.tokenizer.convert_tokens_to_ids("<loc0001>") != processor.tokenizer.unk_token_id
    assert Detector.load(repo_id, device="cpu", progress=False).model_id == repo_id


def test_a_cache_laid_out_by_hand_with_plain_files(hf_home, tmp_path):
    """models--org--name/snapshots/<sha>/… as plain copies, refs/main written with a newline."""
    import shutil

    folder = write_tiny_hf(tmp_path / "src", version=2, seed=7)
    repo = hf_home / "hub" / "models--google--paligemma2-3b-mix-448"
    sha = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha + "\n")
    model, _ = load("google/paligemma2-3b-mix-448", progress=False)
    assert _same_weights(model, tiny_model(2, seed=7)[0])


def test_revision_picks_branch_tag_or_commit(hf_home, tmp_path):
    _cache(hf_home, tmp_path, MIX, seed=0)
    commit = _cache(hf_home, tmp_path, MIX, seed=1, revision="v2").name
    main_model = tiny_model(1, seed=0)[0]
    v2_model = tiny_model(1, seed=1)[0]
    assert _same_weights(load(MIX, progress=False)[0], main_model)
    assert _same_weights(load(MIX, revision="v2", progress=False)[0], v2_model)
    assert _same_weights(load(MIX, revision=commit, progress=False)[0], v2_model)
    detector = Detector.load(MIX, device="cpu", revision="v2", progress=False)
    assert detector.model_id == f"{MIX}@v2"
    with pytest.raises(CheckpointError, match="revision nope"):
        load(MIX, revision="nope", progress=False)


def test_a_local_path_of_the_same_spelling_wins(hf_home, tmp_path, monkeypatch):
    _cache(hf_home, tmp_path, MIX, seed=0)
    monkeypatch.chdir(tmp_path)
    write_tiny_hf(tmp_path / MIX, seed=5)  # ./google/paligemma-3b-mix-224/
    assert _same_weights(load(MIX, progress=False)[0], tiny_model(1, seed=5)[0])


def test_missing_id_offline_is_one_clear_line(hf_home, monkeypatch):
    import huggingface_hub.constants

    # HF_HUB_OFFLINE set after huggingface_hub was imported (as here) is honoured all the same.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(CheckpointError) as caught:
        load("google/no-such-model", progress=False)
    message = str(caught.value)
    assert "google/no-such-model" in message and "HF_HUB_OFFLINE" in message and "\n" not in message
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load("runs/r1.npz", progress=False)  # a path, not a name: never sent to the Hub


def test_no_network_uses_the_cache_or_says_so(hf_home, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # refused at once
    _cache(hf_home, tmp_path, MIX, seed=2)
    assert _same_weights(load(MIX, progress=False)[0], tiny_model(1, seed=2)[0])
    commit = hub.resolve_model(MIX).name
    assert _same_weights(load(MIX, revision=commit, progress=False)[0], tiny_model(1, seed=2)[0])
    with pytest.raises(CheckpointError, match="cannot reach the Hub") as caught:
        load("google/not-cached", progress=False)
    assert "\n" not in str(caught.value)


def _hub_error(cls, message):
    import httpx2

    response = httpx2.Response(403, request=httpx2.Request("GET", f"https://huggingface.co/api/models/{MIX}"))
    return cls(message, response=response)


def test_gated_repo_says_what_to_do_and_never_shows_the_token(hf_home, monkeypatch):
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        raise _hub_error(GatedRepoError, f"403 Client Error. Cannot access gated repo {MIX}.")

    monkeypatch.setattr(hub, "snapshot_download", gated)
    with pytest.raises(CheckpointError, match="gated repo and no Hugging Face token is set: set HF_TOKEN"):
        load(MIX, progress=False)
    secret = "hf_SECRETabcdefghijklmnop"
    monkeypatch.setenv("HF_TOKEN", secret)
    with pytest.raises(CheckpointError, match="has not been granted") as caught:
        load(MIX, progress=False)
    assert secret not in str(caught.value) and f"https://huggingface.co/{MIX}" in str(caught.value)


def test_repo_that_does_not_exist(hf_home, monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    def missing(*args, **kwargs):
        raise _hub_error(RepositoryNotFoundError, "404 Client Error. Repository Not Found")

    monkeypatch.setattr(hub, "snapshot_download", missing)
    with pytest.raises(CheckpointError, match="no Hugging Face repo of that name") as caught:
        load("google/paligemma-9b-typo", progress=False)
    assert "\n" not in str(caught.value)


def test_a_repo_that_is_not_paligemma_is_refused_before_its_weights(hf_home, tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    snapshot = write_hub_cache(hf_home, "someone/bert-tiny", bert)
    with pytest.raises(CheckpointError, match="'bert' model, not PaliGemma"):
        load("someone/bert-tiny", progress=False)
    with pytest.raises(CheckpointError, match="not PaliGemma"):
        load(snapshot, progress=False)  # a local folder too
    nothing = tmp_path / "readme-only"
    nothing.mkdir()
    (nothing / "README.md").write_text("weights elsewhere")
    write_hub_cache(hf_home, "someone/readme-only", nothing)
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load("someone/readme-only", progress=False)


def test_lora_adapter_repo_whose_base_is_a_hub_id(hf_home, tmp_path):
    from peft import LoraConfig, get_peft_model

    _cache(hf_home, tmp_path, "google/paligemma-3b-pt-224", seed=4, revision="v1")  # only at v1
    base, processor = load("google/paligemma-3b-pt-224", revision="v1", progress=False)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # B starts at zero: make the adapter do something
    pixels = torch.rand(1, 3, 28, 28) * 2 - 1
    ids = torch.tensor([[processor.image_token_id] * processor.image_seq_length + [2, 40, 300, 1]])
    with torch.no_grad():
        tuned = peft_model(input_ids=ids, pixel_values=pixels).logits
    adapter = save_lora(peft_model, tmp_path / "adapter", base="google/paligemma-3b-pt-224", revision="v1")
    write_hub_cache(hf_home, "someone/xray-lora", adapter)
    merged, _ = load("someone/xray-lora", progress=False)
    with torch.no_grad():
        logits = merged(input_ids=ids, pixel_values=pixels).logits
    assert torch.allclose(logits, tuned, atol=1e-4)


def test_a_hub_repo_of_big_vision_weights_gives_its_npz(hf_home, tmp_path):
    jax = tmp_path / "jax"
    write_tiny_npz(jax / "paligemma-3b-pt-224.f16.npz", dtype="float16", seed=6)
    write_tiny_npz(tmp_path / "f32" / "paligemma-3b-pt-224.npz", dtype="float32", seed=6)
    (jax / "paligemma-3b-pt-224.npz").write_bytes((tmp_path / "f32" / "paligemma-3b-pt-224.npz").read_bytes())
    (jax / "README.md").write_text("big_vision weights")
    snapshot = write_hub_cache(hf_home, "google/paligemma-3b-pt-224-jax", jax)
    model, processor = load("google/paligemma-3b-pt-224-jax", progress=False)
    assert model.dtype == torch.float16  # 16-bit first, as the colab
    assert processor.tokenizer.spm_path == str((snapshot / "paligemma_tokenizer.model").resolve())
    model32, _ = load("google/paligemma-3b-pt-224-jax", dtype="float32", progress=False)
    assert _same_weights(model32, load(tmp_path / "f32" / "paligemma-3b-pt-224.npz", progress=False)[0])


def test_portable_ref_keeps_names_and_absolutises_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pg.npz").write_bytes(b"")
    assert hub.portable_ref(MIX) == MIX
    assert hub.portable_ref("kaggle:" + KAGGLE) == "kaggle:" + KAGGLE
    assert hub.portable_ref("pg.npz") == str(tmp_path / "pg.npz")


# --- Kaggle ------------------------------------------------------------------------------


@pytest.fixture
def kaggle_cache(tmp_path, monkeypatch):
    pytest.importorskip("kagglehub", reason="kaggle: handles need the optional kagglehub package")
    cache = tmp_path / "kagglehub"
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(cache))
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle-config"))
    return cache


def _kaggle_variation(cache, tmp_path, version=1, seed=0):
    """The variation as Kaggle ships it: the same weights in 16 and 32 bits, and the tokenizer."""
    f16, spm = write_tiny_npz(
        tmp_path / f"v{version}" / "a" / "paligemma-3b-pt-224.f16.npz", dtype="float16", seed=seed
    )
    f32, _ = write_tiny_npz(
        tmp_path / f"v{version}" / "b" / "paligemma-3b-pt-224.npz", dtype="float32", seed=seed
    )
    files = {f16.name: f16, f32.name: f32, "paligemma_tokenizer.model": spm}
    return write_kaggle_cache(cache, f"{KAGGLE}/{version}", files)


def test_kaggle_handle_picks_the_npz_and_tokenizer_from_the_cache(kaggle_cache, tmp_path):
    import kagglehub
    from kagglehub.cache import Cache
    from kagglehub.handle import parse_model_handle

    folder = _kaggle_variation(kaggle_cache, tmp_path)
    assert Cache().load_from_cache(parse_model_handle(f"{KAGGLE}/1")) == str(folder)  # kagglehub's layout
    assert kagglehub.model_download(f"{KAGGLE}/1") == str(folder)  # a versioned handle: no network
    model, processor = load(f"kaggle:{KAGGLE}/1", progress=False)
    assert model.dtype == torch.float16  # the colab's .f16.npz first
    assert processor.tokenizer.spm_path == str(folder / "paligemma_tokenizer.model")
    reference, _ = load(tmp_path / "v1" / "b" / "paligemma-3b-pt-224.npz", progress=False)
    model32, _ = load(f"kaggle:{KAGGLE}", revision="1", dtype="float32", progress=False)
    assert _same_weights(model32, reference)  # --dtype float32 takes the float32 file


def test_kaggle_unreachable_uses_the_newest_cached_version(kaggle_cache, tmp_path, monkeypatch):
    import kagglehub
    import requests

    _kaggle_variation(kaggle_cache, tmp_path / "one", version=1, seed=0)
    _kaggle_variation(kaggle_cache, tmp_path / "two", version=2, seed=1)

    def unreachable(handle, *args, **kwargs):
        raise requests.exceptions.ConnectionError("Failed to resolve 'api.kaggle.com'")

    monkeypatch.setattr(kagglehub, "model_download", unreachable)
    model, _ = load(f"kaggle:{KAGGLE}", dtype="float32", progress=False)
    newest, _ = load(tmp_path / "two" / "v2" / "b" / "paligemma-3b-pt-224.npz", progress=False)
    assert _same_weights(model, newest)
    with pytest.raises(CheckpointError, match="cannot reach Kaggle") as caught:
        load("kaggle:google/paligemma/jax/paligemma-3b-pt-896", progress=False)
    assert "\n" not in str(caught.value)


def test_kaggle_refusal_asks_for_credentials_without_showing_them(kaggle_cache, monkeypatch):
    import kagglehub
    import requests
    from kagglehub.exceptions import KaggleApiHTTPError

    def refused(handle, *args, **kwargs):
        response = requests.Response()
        response.status_code = 403
        raise KaggleApiHTTPError("403 Client Error. You don't have permission", response=response)

    monkeypatch.setattr(kagglehub, "model_download", refused)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "kaggle-secret-key-123")
    with pytest.raises(CheckpointError, match="KAGGLE_USERNAME and KAGGLE_KEY") as caught:
        load(f"kaggle:{KAGGLE}", progress=False)
    assert "kaggle-secret-key-123" not in str(caught.value) and "\n" not in str(caught.value)


def test_kaggle_handle_mistakes(kaggle_cache, tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="not a Kaggle model handle"):
        load("kaggle:google/paligemma", progress=False)
    with pytest.raises(CheckpointError, match="version number"):
        load(f"kaggle:{KAGGLE}/1", revision="2", progress=False)
    spm_only = tmp_path / "paligemma_tokenizer.model"
    write_tiny_npz(tmp_path / "x.npz")
    write_kaggle_cache(kaggle_cache, f"{KAGGLE}/3", {"paligemma_tokenizer.model": spm_only})
    with pytest.raises(CheckpointError, match=r"no big_vision \.npz"):
        load(f"kaggle:{KAGGLE}/3", progress=False)
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # the extra not installed
    with pytest.raises(CheckpointError, match=r"pip install 'paligemma-xray\[kaggle\]'"):
        load(f"kaggle:{KAGGLE}/1", progress=False)
