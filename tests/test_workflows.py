"""The seed document's three HuggingFace workflows, end to end, as its examples are written.

Only what must change here is changed: the provider (``sky.Local()`` or the sshd test nodes instead of AWS), the
model and data names (the tiny gated twins the local Hub serves), ``processing_class=`` (transformers 5 dropped
``tokenizer=``), an eval split for ``trainer.evaluate()`` (transformers 5 raises without one), the tokenising and
collating a causal LM needs before ``Trainer`` can use raw text, and sizes small enough for two CPU cores.
The functions never log in: the plugin's bootstrap did, and ``from_pretrained()`` of the gated repos just works.

The DDP example also returns every rank's weights: with the torch plugin they are identical after training (the
gradients were all-reduced); without it the ranks, which shuffle and seed by rank, end up with different ones.
"""

from __future__ import annotations

import math
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

import sky_jupyter as sky
from tests.test_plugins import ProcessWatch, assert_nowhere

if TYPE_CHECKING:
    from tests.fixtures.hub import HubFixture
    from tests.fixtures.sshd_cluster import Cluster

BERT, SST2, GPT2, IMDB, WIKITEXT = (
    "sky-test/tiny-bert",  # distilbert-base-uncased
    "sky-test/tiny-sst2",  # distilbert-base-uncased-finetuned-sst-2-english
    "sky-test/tiny-gpt2",  # gpt2
    "sky-test/tiny-imdb",  # imdb
    "sky-test/tiny-wikitext",  # wikitext
)
QUIET = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
         "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def local_hub_env(hf_hub: HubFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> sky.Image:
    """HF_ENDPOINT set here (the plugin passes it on to the nodes) and an image with a fresh HF_HOME."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HOME", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hf_hub.url)
    return sky.Image(env={**QUIET, "HF_HOME": str(tmp_path / "hf-home")})


def gated_downloads(hub: HubFixture, repo: str) -> list[int]:
    """Statuses of the file downloads (``resolve``) from ``repo``."""
    return [r.status for r in hub.requests if r.path.startswith(f"/{repo}/resolve/")
            or r.path.startswith(f"/datasets/{repo}/resolve/")]


# -- 1. single-node fine-tuning -----------------------------------------------------------------------------------
@sky.compute
def finetune(model_name: str, epochs: int) -> dict:
    from datasets import load_dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_name)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_name, num_labels=2,
    )

    dataset = load_dataset(IMDB)
    train = dataset["train"].map(
        lambda x: tokenizer(x["text"], truncation=True, max_length=256),
        batched=True,
    )
    test = dataset["test"].map(
        lambda x: tokenizer(x["text"], truncation=True, max_length=256),
        batched=True,
    )

    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir="finetune",
            num_train_epochs=epochs,
            per_device_train_batch_size=16,
            fp16=True,  # ignored on CPU; used on the seed's A100
        ),
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
    )

    trainer.train()
    return trainer.evaluate()


def test_single_node_finetuning(hf_hub: HubFixture, local_hub_env: sky.Image, tmp_path: Path, capfd) -> None:
    hf_hub.hub.clear_requests()
    with sky.ComputePool(
        provider=sky.Local(root=tmp_path),
        nodes=1,
        image=local_hub_env,
        plugins=[sky.plugins.huggingface(token=hf_hub.token)],
    ) as pool:
        result = finetune(BERT, epochs=1) >> pool
        print(result)
    assert math.isfinite(result["eval_loss"]) and result["epoch"] == 1.0
    assert 200 in gated_downloads(hf_hub, BERT) and not {401, 403} & set(gated_downloads(hf_hub, BERT))
    assert gated_downloads(hf_hub, IMDB)
    token_file = Path(local_hub_env.environ["HF_HOME"]) / "token"  # the plugin's login, not the function's
    assert token_file.read_text() == hf_hub.token and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    out, err = capfd.readouterr()
    assert "eval_loss" in out
    assert_nowhere(hf_hub.token, out, err, folders=(tmp_path,))


# -- 2. multi-node distributed training ---------------------------------------------------------------------------
@sky.compute
def distributed_finetune(model_name: str) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_name)
    model = AutoModelForCausalLM.from_pretrained(model_name)
    before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()

    dataset = load_dataset(WIKITEXT, "wikitext-2-raw-v1")
    # Trainer handles data sharding across DDP ranks
    dataset = dataset.map(lambda x: tokenizer(x["text"], truncation=True, max_length=32), batched=True,
                          remove_columns=["text"])
    rank = sky.instance_info().rank  # replicas that were not synchronised would visibly diverge

    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir="distributed-finetune",
            num_train_epochs=1,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=4,
            fp16=True,
            ddp_find_unused_parameters=False,
            seed=rank,
        ),
        train_dataset=dataset["train"].shuffle(seed=rank),
        eval_dataset=dataset["validation"],
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )

    trainer.train()
    after = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    return {**trainer.evaluate(), "world_size": trainer.args.world_size, "trained": not torch.equal(before, after),
            "weights": after.numpy()}


def check_ddp(results: list[dict], synced: bool, ranks: int = 2) -> None:
    assert len(results) == ranks
    for result in results:
        assert result["trained"] and math.isfinite(result["eval_loss"])
        assert result["world_size"] == (ranks if synced else 1)
    same = all(np.array_equal(results[0]["weights"], other["weights"]) for other in results[1:])
    assert same is synced, "weights should be identical exactly when the torch plugin synchronised the ranks"
    if not synced:
        assert not np.allclose(results[0]["weights"], results[1]["weights"], rtol=0, atol=1e-6)


def test_multi_node_ddp_on_local_nodes(hf_hub: HubFixture, local_hub_env: sky.Image, tmp_path: Path) -> None:
    """Two worker processes on this machine (runs without root; the unsynchronised control runs on SSH)."""
    with sky.ComputePool(
        provider=sky.Local(root=tmp_path),
        nodes=2,
        image=local_hub_env,
        plugins=[
            sky.plugins.torch(backend="gloo"),
            sky.plugins.huggingface(token=hf_hub.token),
        ],
    ) as pool:
        results = distributed_finetune(GPT2) @ pool
    check_ddp(results, synced=True)


def test_ddp_over_two_workers_on_each_of_two_nodes(hf_hub: HubFixture, local_hub_env: sky.Image,
                                                   tmp_path: Path) -> None:
    """The same job, unchanged, on 2 nodes x 2 workers: Trainer sees world size 4 and the four replicas end equal."""
    with sky.ComputePool(
        provider=sky.Local(root=tmp_path),
        nodes=2,
        workers_per_node=2,
        image=local_hub_env,
        plugins=[
            sky.plugins.torch(backend="gloo"),
            sky.plugins.huggingface(token=hf_hub.token),
        ],
    ) as pool:
        assert [(w.node, w.local_rank) for w in pool.workers] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        results = distributed_finetune(GPT2) @ pool
    check_ddp(results, synced=True, ranks=4)


@pytest.mark.ssh
@pytest.mark.parametrize("with_torch", [True, False], ids=["torch-plugin", "no-torch-plugin"])
def test_multi_node_ddp_on_ssh_nodes(hf_hub: HubFixture, sshd_cluster: Cluster, with_torch: bool, capfd) -> None:
    pytest.importorskip("paramiko")
    endpoint = hf_hub.listen(sshd_cluster.bridge_addr)  # how the nodes reach the Hub on this machine
    nodes = sshd_cluster.nodes[:2]
    torch_plugin = [sky.plugins.torch(backend="gloo")] if with_torch else []
    name = f"ddp-{'torch' if with_torch else 'plain'}"
    hf_home = f"~/hf-{name}"  # a cold cache per pool: the downloads below must come from the gated repos
    hf_hub.hub.clear_requests()
    with ProcessWatch(hf_hub.token) as watch, sky.ComputePool(
        provider=sky.SSH([n.host_string for n in nodes], key_file=sshd_cluster.key_file),
        nodes=2,
        image=sky.Image(env={**QUIET, "HF_HOME": hf_home}),
        name=name,
        plugins=[
            *torch_plugin,
            sky.plugins.huggingface(token=hf_hub.token, endpoint=endpoint),
        ],
    ) as pool:
        results = distributed_finetune(GPT2) @ pool
        for node in nodes:  # while the pool lives: the token file and the env file, private
            token_file = node.home / hf_home.removeprefix("~/") / "token"
            assert token_file.read_text() == hf_hub.token and stat.S_IMODE(token_file.stat().st_mode) == 0o600
            assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
            env_file = node.home / ".sky_jupyter" / "env.sh"  # the one place on the node meant to hold it
            assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    check_ddp(results, synced=with_torch)
    assert watch.logins_seen, "the nodes' login processes were never seen"
    assert watch.leaks == [], "the token was on a command line (ps on the nodes)"
    assert gated_downloads(hf_hub, GPT2) and gated_downloads(hf_hub, WIKITEXT)
    assert [r.status for r in hf_hub.requests if r.path == "/api/whoami-v2"] == [200, 200]  # each node logged in
    out, err = capfd.readouterr()
    assert_nowhere(hf_hub.token, out, err)
    for node in nodes:  # after it: nowhere
        assert not (node.home / hf_home.removeprefix("~/") / "token").exists()
        assert_nowhere(hf_hub.token, folders=(node.home / ".sky_jupyter", node.home / hf_home.removeprefix("~/")))


# -- 3. inference with pipelines ----------------------------------------------------------------------------------
@sky.compute
def classify(texts: list[str]) -> list[dict]:
    import torch
    from transformers import pipeline

    classifier = pipeline(
        "sentiment-analysis",
        model=SST2,
        device=0 if torch.cuda.is_available() else -1,  # 0: the node's first GPU (the seed's T4); -1: its CPU
    )
    return classifier(texts)


def test_batch_inference_with_a_pipeline(hf_hub: HubFixture, local_hub_env: sky.Image, tmp_path: Path) -> None:
    with sky.ComputePool(
        provider=sky.Local(root=tmp_path),
        nodes=1,
        image=local_hub_env,
        plugins=[sky.plugins.huggingface(token=hf_hub.token)],
    ) as pool:
        predictions = classify(["Great movie!", "Terrible film."]) >> pool
    assert [p["label"] for p in predictions] == ["POSITIVE", "NEGATIVE"]
    assert all(0.5 < p["score"] <= 1 for p in predictions)
