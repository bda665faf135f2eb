"""The same 2-node DDP training job (a ``Trainer`` fine-tune of the tiny GPT-2 from a local folder, gloo on
CPU) run through ``fn() @ pool`` on a warm 2-node ``sky.SSH`` pool with ``sky.plugins.torch(backend="gloo")``
and through ``torchrun`` started over ssh on the same two sshd test nodes; interleaved rounds, medians.
Goal: sky's wall time within 1.1x of torchrun's.

Figures, all in the same run:
- sky ``call``: the client's wall time of ``ddp_train(...) @ pool`` on the warm pool (the worker already has
  torch/transformers imported and the process group joined, as a pool that ran one job has);
- torchrun ``job only``: from the moment both ranks entered ``ddp_train`` (after the script's imports) until
  the last one returned, measured inside the workers: the launcher's own cost taken out entirely;
- torchrun ``including process start``: from starting both ``ssh ... torchrun`` commands until both exit
  (ssh, torchrun, Python start, imports, rendezvous, the job, exit) -- what a user waits for.
The baseline script is generated from this file's ``ddp_train`` source, so both run the very same code.

Needs root: it starts its own sshd nodes (tests/fixtures/sshd_cluster.py) and nodes use /usr/bin/python3.11,
whose site-packages must hold torch and transformers (ensure_node_python installs them).

    .venv/bin/python bench/ddp.py [--rounds 3] [--steps 150]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import paired_comparison, report, seconds

import sky_jupyter as sky
from tests.fixtures.sshd_cluster import (
    NODE_PYTHON,
    Cluster,
    ensure_node_python,
    pinned_requirements,
    start_cluster,
)
from tests.fixtures.tiny_models import make_gpt2, wiki_lines

#: Environment both launchers give the job: quiet, offline, one thread per rank (two ranks share two cores).
JOB_ENV = {
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
MARKER = "DDP_RESULT "


def ddp_train(model_dir: str, data_file: str, steps: int, batch: int, seq_len: int) -> dict:
    """Fine-tune the causal LM in ``model_dir`` on the text lines of ``data_file`` for ``steps`` DDP steps.

    Trainer shards the data across ranks and all-reduces the gradients; the weights' hash proves the ranks
    ended identical. Wall-clock stamps (``time.time()``: every node shares this machine's clock) let the
    caller take the launcher's cost out.
    """
    import hashlib
    import os
    import time

    started = time.time()
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    imported = time.time()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lines = [line for line in pq.read_table(data_file).column("text").to_pylist() if line.strip()]
    dataset = Dataset.from_dict({"text": lines}).map(
        lambda x: tokenizer(x["text"], truncation=True, max_length=seq_len),
        batched=True,
        remove_columns=["text"],
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir="ddp-bench-out",
            max_steps=steps,
            per_device_train_batch_size=batch,
            learning_rate=1e-3,
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            ddp_find_unused_parameters=False,
            dataloader_num_workers=0,
            seed=0,
        ),
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )
    train_started = time.time()
    output = trainer.train()
    train_s = time.time() - train_started
    weights = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    return {
        "rank": int(os.environ.get("RANK", "0")),
        "world_size": trainer.args.world_size,
        "threads": torch.get_num_threads(),
        "train_loss": output.training_loss,
        "weights_sha256": hashlib.sha256(weights.numpy().tobytes()).hexdigest(),
        "imports_s": imported - started,
        "setup_s": train_started - started,
        "train_s": train_s,
        "started": started,
        "finished": time.time(),
    }


# The torchrun script: this file's ddp_train, the imports a warm worker already holds, and nothing of sky.
SCRIPT_MAIN = f"""

if __name__ == "__main__":
    import json
    import sys
    import time

    main_started = time.time()
    # What a warm sky worker already holds: the job's modules, including those transformers loads lazily.
    import pyarrow.parquet  # noqa: F401
    import torch  # noqa: F401
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401
    from datasets import Dataset  # noqa: F401
    from transformers import (  # noqa: F401
        AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments,
    )

    imported = time.time()
    result = ddp_train(*json.loads(sys.argv[1]))
    stamps = {{"main_started": main_started, "imported": imported}}
    print({MARKER!r} + json.dumps({{**result, **stamps}}), flush=True)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
"""


def write_job_files(folder: Path, lines: int) -> tuple[Path, Path, Path]:
    """The tiny GPT-2, a parquet file of wikitext-like lines and the torchrun script, all readable by the
    node users."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    model_dir = make_gpt2(folder / "tiny-gpt2")
    data_file = folder / "wiki-train.parquet"
    pq.write_table(pa.table({"text": pa.array(wiki_lines(lines, 0), pa.string())}), data_file)
    script = folder / "ddp_train.py"
    script.write_text(
        "from __future__ import annotations\n\n\n"
        + textwrap.dedent(inspect.getsource(ddp_train))
        + SCRIPT_MAIN
    )
    for path in (folder, *folder.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return model_dir, data_file, script


def check_synced(results: list[dict], label: str) -> None:
    """Both ranks trained as one DDP job: world size 2 and identical weights."""
    if sorted(r["rank"] for r in results) != [0, 1] or any(r["world_size"] != 2 for r in results):
        raise RuntimeError(f"{label}: expected ranks 0 and 1 in a world of 2, got {results}")
    if len({r["weights_sha256"] for r in results}) != 1:
        raise RuntimeError(
            f"{label}: the ranks' weights differ after training, so gradients were not synchronised"
        )


def job_span(results: list[dict]) -> float:
    """Seconds from the moment both ranks had entered the job until the last one returned."""
    return max(r["finished"] for r in results) - max(r["started"] for r in results)


def free_port(cluster: Cluster) -> int:
    node0 = cluster.nodes[0]
    code = f"import socket; s = socket.socket(); s.bind(('{node0.addr}', 0)); print(s.getsockname()[1])"
    probe = f'{NODE_PYTHON} -c "{code}"'
    return int(cluster.ssh(node0, probe, check=True).stdout.strip())


def run_torchrun(cluster: Cluster, script: Path, job_args: list[Any]) -> dict[str, Any]:
    """One torchrun job on both nodes, both started over ssh at once; wall times and per-rank results."""
    nodes = cluster.nodes[:2]
    port = free_port(cluster)
    torchrun = (
        "/usr/local/bin/torchrun"
        if Path("/usr/local/bin/torchrun").exists()
        else f"{NODE_PYTHON} -m torch.distributed.run"
    )
    argv_json = json.dumps(job_args).replace("'", "'\\''")
    commands = []
    for rank, node in enumerate(nodes):
        env = {**JOB_ENV, "GLOO_SOCKET_IFNAME": node.ifname, "ACCELERATE_USE_CPU": "1"}
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        commands.append(
            f"cd ~ && env {exports} {torchrun} --nnodes 2 --nproc-per-node 1 --node-rank {rank} "
            f"--master-addr {nodes[0].addr} --master-port {port} {script} '{argv_json}'"
        )
    launched = time.time()
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            cluster.ssh_argv(node, cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node, cmd in zip(nodes, commands)
    ]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    wall = time.perf_counter() - t0
    exited = time.time()
    results = []
    for node, proc, (out, err) in zip(nodes, procs, outputs):
        found = [line[len(MARKER) :] for line in out.splitlines() if line.startswith(MARKER)]
        if proc.returncode != 0 or not found:
            raise RuntimeError(
                f"torchrun on {node.name} failed ({proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}"
            )
        results.append(json.loads(found[-1]))
    check_synced(results, "torchrun")
    return {
        "process_wall_s": wall,
        "job_span_s": job_span(results),
        "startup_s": max(r["started"] for r in results) - launched,  # ssh + torchrun + python + imports
        "imports_s": max(r["imported"] - r["main_started"] for r in results),
        "exit_after_job_s": exited - max(r["finished"] for r in results),  # torchrun and ssh winding down
        "setup_s": max(r["setup_s"] for r in results),
        "train_s": max(r["train_s"] for r in results),
        "results": results,
    }


def run_sky(pool: sky.ComputePool, job_args: list[Any]) -> dict[str, Any]:
    task = sky.compute(ddp_train)
    t0 = time.perf_counter()
    results = task(*job_args) @ pool
    wall = time.perf_counter() - t0
    check_synced(results, "sky")
    return {
        "call_wall_s": wall,
        "job_span_s": job_span(results),
        "setup_s": max(r["setup_s"] for r in results),
        "train_s": max(r["train_s"] for r in results),
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=3, help="timed rounds (each: one sky job, one torchrun job)"
    )
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per job")
    parser.add_argument("--batch", type=int, default=8, help="per-rank batch size")
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/ddp.py needs root: it starts sshd test nodes (users, network namespaces)")
    ensure_node_python(pinned_requirements())

    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # node users read the model, data and script from here
        os.environ.setdefault("SKY_JUPYTER_HOME", str(root / "sky_home"))
        model_dir, data_file, script = write_job_files(root / "job", lines=2000)
        job_args = [str(model_dir), str(data_file), args.steps, args.batch, args.seq_len]
        with start_cluster(2, root / "cluster") as cluster:
            t0 = time.perf_counter()
            with sky.ComputePool(
                provider=sky.SSH(cluster.host_strings()[:2], key_file=cluster.key_file),
                nodes=2,
                image=sky.Image(env=JOB_ENV),
                plugins=[sky.plugins.torch(backend="gloo")],
                name="bench-ddp",
                progress=lambda rank, phase, line: None,
            ) as pool:
                pool_start_s = time.perf_counter() - t0
                # Untimed first jobs: the worker imports transformers, the nodes' page cache fills.
                sky_first = run_sky(pool, job_args)
                torchrun_first = run_torchrun(cluster, script, job_args)
                sky_runs, torchrun_runs = [], []
                for round_ in range(args.rounds):
                    order = ("sky", "torchrun") if round_ % 2 == 0 else ("torchrun", "sky")
                    for which in order:
                        if which == "sky":
                            sky_runs.append(run_sky(pool, job_args))
                        else:
                            torchrun_runs.append(run_torchrun(cluster, script, job_args))
                        last = (sky_runs if which == "sky" else torchrun_runs)[-1]
                        print(
                            f"round {round_}: {which:8s} "
                            + ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k.endswith("_s")),
                            flush=True,
                        )

    sky_call = [r["call_wall_s"] for r in sky_runs]
    sky_span = [r["job_span_s"] for r in sky_runs]
    tr_wall = [r["process_wall_s"] for r in torchrun_runs]
    tr_span = [r["job_span_s"] for r in torchrun_runs]
    ratio_process = statistics.median(sky_call) / statistics.median(tr_wall)
    report(
        "ddp",
        {
            "what": "2-node DDP Trainer fine-tune (tiny GPT-2, gloo, CPU, 1 thread per rank) on two sshd "
            "test nodes sharing this machine: sky @ warm pool vs torchrun over ssh; interleaved rounds, "
            "medians",
            "job": {
                "steps": args.steps,
                "per_rank_batch": args.batch,
                "seq_len": args.seq_len,
                "world_size": 2,
                "train_loss_last_sky": sky_runs[-1]["results"][0]["train_loss"],
                "threads_per_rank": sky_runs[-1]["results"][0]["threads"],
            },
            "sky": {
                "call_wall": seconds(sky_call),
                "job_span_inside_workers": seconds(sky_span),
                "dispatch_overhead_median_s": round(statistics.median(c - s for c, s in zip(sky_call, sky_span)), 4),
                "job_setup_before_train": seconds([r["setup_s"] for r in sky_runs]),
                "train_only": seconds([r["train_s"] for r in sky_runs]),
                "pool_start_s": round(pool_start_s, 3),
                "first_call_wall_s_untimed": round(sky_first["call_wall_s"], 3),
            },
            "torchrun": {
                "job_only": seconds(tr_span),
                "including_process_start": seconds(tr_wall),
                "startup_before_job": seconds([r["startup_s"] for r in torchrun_runs]),
                "script_imports": seconds([r["imports_s"] for r in torchrun_runs]),
                "exit_after_job": seconds([r["exit_after_job_s"] for r in torchrun_runs]),
                "job_setup_before_train": seconds([r["setup_s"] for r in torchrun_runs]),
                "train_only": seconds([r["train_s"] for r in torchrun_runs]),
                "first_process_wall_s_untimed": round(torchrun_first["process_wall_s"], 3),
            },
            "ratio_sky_call_over_torchrun_including_process_start": round(ratio_process, 4),
            **paired_comparison("torchrun", sky_runs, sky_call, torchrun_runs, tr_span, goal=1.1),
            "goal_note": "goal_met: both the ratio of medians and the median of per-round ratios; "
            "judged on the strict figure (torchrun with its launcher cost removed). Even so the "
            "warm sky worker skips first-use costs inside the job that a fresh process pays (lazy "
            "transformers modules, first load): compare job_setup_before_train; train_only compares the "
            "loops alone. Weights identical across ranks checked on every job.",
            "note": "2-core machine shared with other test runs while measuring",
        },
    )


if __name__ == "__main__":
    main()
