"""The local Hub fixture behaves like the Hub for the real HuggingFace client libraries.

HuggingFace code runs in subprocesses: ``HF_ENDPOINT`` is read at import time, and each run needs a fresh
``HF_HOME`` so that nothing cached by an earlier run hides a missing token.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures.hub import HubFixture, fake_token, start_hub

BERT, SST2, GPT2, IMDB, WIKITEXT = (
    "sky-test/tiny-bert",
    "sky-test/tiny-sst2",
    "sky-test/tiny-gpt2",
    "sky-test/tiny-imdb",
    "sky-test/tiny-wikitext",
)


def run_hf(
    code: str,
    hub: HubFixture,
    home: Path,
    *,
    token: str | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter against ``hub`` with ``HF_HOME=home`` and ``HF_TOKEN=token``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING"))}
    env.update(hub.env(home, token=False))
    if token is not None:
        env["HF_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=home,
        text=True,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def last_json(proc: subprocess.CompletedProcess[str]) -> dict:
    """The JSON object a script printed on its last stdout line, failing with its stderr if it crashed."""
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def http(
    url: str, token: str | None = None, method: str = "GET", timeout: float = 5
) -> tuple[int, dict, bytes]:
    """One plain HTTP request: status, headers and body, error statuses included."""
    request = urllib.request.Request(url, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_repos_and_token(hf_hub: HubFixture) -> None:
    assert set(hf_hub.repos) == {BERT, SST2, GPT2, IMDB, WIKITEXT}
    assert hf_hub.token.startswith("hf_skytest") and len(hf_hub.token) >= 34
    assert hf_hub.url.startswith("http://127.0.0.1:")
    for weights in hf_hub.root.glob("models/*/*/model.safetensors"):
        assert weights.stat().st_size < 1_000_000


def test_gated_model_needs_a_token(hf_hub: HubFixture, tmp_path: Path) -> None:
    proc = run_hf(
        f"""
        from transformers import AutoTokenizer
        try:
            AutoTokenizer.from_pretrained("{BERT}")
        except OSError as error:
            print("refused:", error)
        else:
            print("loaded")
        """,
        hf_hub,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "refused:" in proc.stdout and "gated repo" in proc.stdout, proc.stdout


def test_gated_model_loads_with_hf_token(hf_hub: HubFixture, tmp_path: Path) -> None:
    proc = run_hf(
        f"""
        import json
        from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                                  pipeline)
        tokenizer = AutoTokenizer.from_pretrained("{BERT}")
        model = AutoModelForSequenceClassification.from_pretrained("{BERT}", num_labels=2)
        logits = model(**tokenizer(["a great movie"], return_tensors="pt")).logits
        classifier = pipeline("sentiment-analysis", model="{SST2}")
        gpt_tokenizer = AutoTokenizer.from_pretrained("{GPT2}")
        gpt = AutoModelForCausalLM.from_pretrained("{GPT2}")
        batch = gpt_tokenizer(["the river", "a king built the city"], padding=True, return_tensors="pt")
        loss = gpt(**batch, labels=batch["input_ids"]).loss
        print(json.dumps({{"shape": list(logits.shape), "gpt_loss": loss.item(),
                          "labels": classifier(["Great movie!", "Terrible film."])}}))
        """,
        hf_hub,
        tmp_path,
        token=hf_hub.token,
    )
    result = last_json(proc)
    assert result["shape"] == [1, 2] and result["gpt_loss"] > 0
    assert [answer["label"] for answer in result["labels"]] == ["POSITIVE", "NEGATIVE"]
    assert hf_hub.token not in proc.stdout + proc.stderr


def test_login_from_environment(hf_hub: HubFixture, tmp_path: Path) -> None:
    login = "import os; from huggingface_hub import login; login(token=os.environ['HF_TOKEN'])"
    good_home, bad_home = tmp_path / "good", tmp_path / "bad"
    good_home.mkdir(), bad_home.mkdir()

    accepted = run_hf(login, hf_hub, good_home, token=hf_hub.token)
    assert accepted.returncode == 0, accepted.stderr[-4000:]
    token_file = good_home / "token"
    assert token_file.read_text() == hf_hub.token
    assert token_file.stat().st_mode & 0o777 == 0o600

    wrong = fake_token()
    rejected = run_hf(login, hf_hub, bad_home, token=wrong)
    assert rejected.returncode != 0
    assert "401" in rejected.stderr or "Invalid" in rejected.stderr, rejected.stderr[-4000:]
    assert not (bad_home / "token").exists()


def test_load_dataset_from_hub(hf_hub: HubFixture, tmp_path: Path) -> None:
    proc = run_hf(
        f"""
        import json
        from datasets import load_dataset
        imdb = load_dataset("{IMDB}")
        wiki = load_dataset("{WIKITEXT}", "wikitext-2-raw-v1")
        print(json.dumps({{"imdb": {{k: v.num_rows for k, v in imdb.items()}},
                          "labels": imdb["train"].features["label"].names,
                          "wiki": {{k: v.column_names for k, v in wiki.items()}}}}))
        """,
        hf_hub,
        tmp_path,
        token=hf_hub.token,
    )
    result = last_json(proc)
    assert result["imdb"] == {"train": 64, "test": 32}
    assert result["labels"] == ["neg", "pos"]
    assert result["wiki"] == {"train": ["text"], "validation": ["text"], "test": ["text"]}


def test_seed_finetune_runs_against_the_hub(hf_hub: HubFixture, tmp_path: Path) -> None:
    """The seed's single-node fine-tune in transformers 5 spelling: one epoch of 64 rows is 4 CPU steps.

    ``fp16=True`` stays, as in the seed: on CPU transformers ignores it.
    """
    proc = run_hf(
        f"""
        import json
        from datasets import load_dataset
        from transformers import (AutoModelForSequenceClassification, AutoTokenizer, Trainer,
                                  TrainingArguments)

        tokenizer = AutoTokenizer.from_pretrained("{BERT}")
        model = AutoModelForSequenceClassification.from_pretrained("{BERT}", num_labels=2)
        dataset = load_dataset("{IMDB}")
        tokenized = dataset.map(lambda x: tokenizer(x["text"], truncation=True, max_length=256), batched=True)
        trainer = Trainer(
            model=model,
            args=TrainingArguments(output_dir="finetune", num_train_epochs=1, per_device_train_batch_size=16,
                                   fp16=True, eval_strategy="epoch", save_strategy="no"),
            train_dataset=tokenized["train"],
            eval_dataset=tokenized["test"],
            processing_class=tokenizer,
        )
        trainer.train()
        print(json.dumps(trainer.evaluate()))
        """,
        hf_hub,
        tmp_path,
        token=hf_hub.token,
        timeout=180,
    )
    metrics = last_json(proc)
    assert metrics["eval_loss"] > 0


def test_gating_and_request_log(hf_hub: HubFixture) -> None:
    url = f"{hf_hub.url}/{BERT}/resolve/main/config.json"
    status, headers, _ = http(url)
    assert (status, headers["X-Error-Code"]) == (401, "GatedRepo")
    status, headers, body = http(url, hf_hub.token)
    assert status == 200 and json.loads(body)["model_type"] == "bert"
    assert len(headers["X-Repo-Commit"]) == 40 and headers["ETag"]
    status, headers, _ = http(f"{hf_hub.url}/{BERT}/resolve/main/missing.json", hf_hub.token, "HEAD")
    assert (status, headers["X-Error-Code"]) == (404, "EntryNotFound")
    mine = [r for r in hf_hub.requests if r.path == f"/{BERT}/resolve/main/config.json"]
    assert [(r.authorized, r.status) for r in mine[-2:]] == [(False, 401), (True, 200)]
    assert all(hf_hub.token not in repr(r) for r in hf_hub.requests)


def test_unapproved_token_gets_403_and_switches(hf_hub: HubFixture) -> None:
    approved, other = fake_token(), fake_token()
    with start_hub(
        hf_hub.root, host=["127.0.0.1", "127.0.0.2"], tokens={approved: "a", other: "b"}, approved=[approved]
    ) as hub:
        url = f"/{BERT}/resolve/main/config.json"
        assert http(hub.url_for("127.0.0.2") + url, approved)[0] == 200
        status, headers, _ = http(hub.url + url, other)
        assert (status, headers["X-Error-Code"]) == (403, "GatedRepo")
        status, _, body = http(hub.url + "/api/whoami-v2", other)
        assert status == 200 and json.loads(body)["name"] == "b"
        assert http(hub.url + "/api/whoami-v2", fake_token())[0] == 401

        hub.unavailable = True
        assert http(hub.url + url, approved)[0] == 503
        hub.unavailable = False

        hub.hang_whoami = True
        started = time.monotonic()
        with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
            http(hub.url + "/api/whoami-v2", approved, timeout=0.5)
        assert time.monotonic() - started < 3
        assert hub.requests[-1].status == 0
        stopped = time.monotonic()
    assert time.monotonic() - stopped < 3


def test_listen_on_another_address_later(hf_hub: HubFixture) -> None:
    url = hf_hub.listen("127.0.0.3")
    assert (
        url.startswith("http://127.0.0.3:") and hf_hub.env(Path("/x"), host="127.0.0.3")["HF_ENDPOINT"] == url
    )
    assert http(f"{url}/api/whoami-v2", hf_hub.token)[0] == 200
