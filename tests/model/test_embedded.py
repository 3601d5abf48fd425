"""Two processes sharing one fresh cache folder (two notebooks training at once) do not corrupt it.

The SVD cache ($TINYLAB_CACHE/svd, one safetensors file per weight fingerprint, rank and method)
and the model cache ($TINYLAB_CACHE/models, the embedded model converted from GGUF) are written
atomically (temporary file or folder, then rename). These tests start real subprocesses, hold them
at a barrier (each prints "ready" and waits for a line on stdin) and release them together, so
both compute and write the same entries at the same moment. A damaged SVD file is ignored and
recomputed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tinylab.basics.cache import cache_dir
from tinylab.model.tiny import tiny_model

_SVD_WORKER = textwrap.dedent("""
    import hashlib, json, sys
    import torch
    torch.set_num_threads(int(sys.argv[3]))
    from tinylab.adapter.config import TinyLoRAConfig
    from tinylab.adapter.attach import apply_tinylora
    from tinylab.model.tiny import tiny_model

    size, order = sys.argv[1], sys.argv[2]
    if size == "small":
        models = {("llama", 0): tiny_model("llama", seed=0)[0]}
        configs = [TinyLoRAConfig(r=2)]
    else:
        models = {(a, s): tiny_model(a, seed=s)[0] for a in ("llama", "qwen2") for s in (0, 1)}
        configs = [TinyLoRAConfig(r=r, svd=m) for r in (1, 4) for m in ("exact", "lowrank")]
    jobs = [(key, c) for key in models for c in configs]
    if order == "reverse":
        jobs.reverse()
    print("ready", flush=True)
    sys.stdin.readline()  # the barrier: the parent releases every worker at once
    digests, keys = {}, set()
    for (arch, seed), config in jobs:
        adapter = apply_tinylora(models[arch, seed], config)
        h = hashlib.sha256()
        for name, module in adapter.named_modules():
            for t in (module.U, module.S, module.Vh):  # (out, r), (r,), (r, in)
                h.update(t.numpy().tobytes())
            keys.add((adapter.fingerprints[name], config.r, config.svd))
        digests[f"{arch}/{seed}/r{config.r}/{config.svd}"] = h.hexdigest()
        adapter.remove()
    print(json.dumps({"digests": digests, "n_keys": len(keys)}), flush=True)
""")

_MODEL_WORKER = textwrap.dedent("""
    import hashlib, json, sys
    import torch
    torch.set_num_threads(1)
    from tinylab.model.loading import load_model

    print("ready", flush=True)
    sys.stdin.readline()
    model, tokenizer = load_model()
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t[:4].contiguous().numpy().tobytes())
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True)
    print(json.dumps({"weights": h.hexdigest(), "ids": list(ids if isinstance(ids, list) else ids["input_ids"])}),
          flush=True)
""")


def _env(cache: Path | None) -> dict:
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    if cache is None:
        env["TINYLAB_SVD_DISK_CACHE"] = "0"  # the reference: computed, never read from disk
        env["TINYLAB_CACHE"] = str(cache_dir())
    else:
        env["TINYLAB_CACHE"] = str(cache)
        env.pop("TINYLAB_SVD_DISK_CACHE", None)
    return env


def _run_together(script: str, workers: list[tuple[Path | None, list[str]]], timeout: float = 600) -> list[dict]:
    """Start every worker, wait until all print "ready", release them at once, return their JSON."""
    logs = [tempfile.TemporaryFile("w+") for _ in workers]  # a file, not a pipe: a chatty stderr cannot block
    procs = [subprocess.Popen([sys.executable, "-c", script, *args], env=_env(cache), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=log, text=True)
             for (cache, args), log in zip(workers, logs)]

    def stderr(i: int) -> str:
        logs[i].seek(0)
        return logs[i].read()[-3000:]

    try:
        for i, p in enumerate(procs):
            line = p.stdout.readline()
            assert line.strip() == "ready", f"worker failed before the barrier: {line}{p.wait() and stderr(i)}"
        for p in procs:  # released back to back: all are inside the same writes within milliseconds
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for i, p in enumerate(procs):
            out, _ = p.communicate(timeout=timeout)
            assert p.returncode == 0, f"worker failed:\n{stderr(i)}"
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for p, log in zip(procs, logs):
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()


def _fresh_cache(tmp_path: Path) -> Path:
    """An empty cache folder, except the tiny models' tokenizer (not what is under test here)."""
    tiny_model("llama")  # makes sure the shared tokenizer is cached
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tokenizers").symlink_to(cache_dir() / "tokenizers", target_is_directory=True)
    return cache


def _check_svd_files(folder: Path) -> list[Path]:
    """Every file in the SVD cache is complete: safetensors with finite U (out, r), S (r,), Vh (r, in)."""
    files = sorted(folder.iterdir())
    assert files and all(f.suffix == ".safetensors" for f in files), [f.name for f in files]  # no .tmp left
    for f in files:
        r = int(f.stem.rsplit("-r", 1)[1])
        t = load_file(f)
        assert set(t) == {"U", "S", "Vh"}
        assert t["U"].shape[1] == r and t["S"].shape == (r,) and t["Vh"].shape[0] == r
        assert all(torch.isfinite(x).all() for x in t.values())
    return files


def _snapshot(files: list[Path]) -> dict[str, tuple[int, int]]:
    return {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}


def test_two_processes_fill_one_fresh_svd_cache(tmp_path):
    cache = _fresh_cache(tmp_path)
    first, second, reference = _run_together(_SVD_WORKER, [
        (cache, ["many", "forward", "1"]),
        (cache, ["many", "forward", "2"]),  # two threads: the threaded SVD path writes too
        (None, ["many", "reverse", "1"]),  # the reference, without the disk cache
    ])
    assert len(reference["digests"]) == 16
    assert first["digests"] == second["digests"] == reference["digests"]
    files = _check_svd_files(cache / "svd")
    assert len(files) == reference["n_keys"]

    # A third process reads it back (in the other order) and recomputes nothing: a recomputation
    # would rewrite its file (new inode), so an unchanged snapshot proves the files were used.
    before = _snapshot(files)
    (reader,) = _run_together(_SVD_WORKER, [(cache, ["many", "reverse", "1"])])
    assert reader["digests"] == reference["digests"]
    assert _snapshot(_check_svd_files(cache / "svd")) == before


def _damage(path: Path, kind: str) -> None:
    t = load_file(path)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "garbage":
        path.write_bytes(os.urandom(200))
    elif kind == "huge_header":
        path.write_bytes((1 << 62).to_bytes(8, "little") + b"{}")
    elif kind == "nan":
        save_file({k: v.clone().fill_(float("nan")) if k == "S" else v for k, v in t.items()}, path)
    elif kind == "wrong_shape":
        save_file({"U": t["U"][:, :1].contiguous(), "S": t["S"][:1].contiguous(), "Vh": t["Vh"][:1].contiguous()}, path)
    elif kind == "missing_key":
        save_file({"U": t["U"], "S": t["S"]}, path)


DAMAGES = ("empty", "truncated", "garbage", "huge_header", "nan", "wrong_shape", "missing_key")


def test_damaged_svd_cache_files_are_ignored_and_recomputed(tmp_path):
    cache = _fresh_cache(tmp_path)
    (reference,) = _run_together(_SVD_WORKER, [(cache, ["small", "forward", "1"])])
    files = _check_svd_files(cache / "svd")
    assert len(files) == reference["n_keys"] == 14
    damaged = {}
    for i, f in enumerate(files):
        kind = DAMAGES[i % len(DAMAGES)]
        _damage(f, kind)
        damaged[f.name] = (kind, f.read_bytes())

    (again,) = _run_together(_SVD_WORKER, [(cache, ["small", "forward", "1"])])
    assert again["digests"] == reference["digests"]  # the same factors, recomputed
    repaired = _check_svd_files(cache / "svd")  # and written back whole
    assert len(repaired) == 14
    assert all(f.read_bytes() != damaged[f.name][1] for f in repaired), "a damaged file was left in place"


@pytest.mark.slow
def test_two_processes_convert_the_embedded_model_into_one_fresh_cache(tmp_path, embedded):
    cache = tmp_path / "cache"
    first, second = _run_together(_MODEL_WORKER, [(cache, []), (cache, [])], timeout=900)
    assert first == second
    models = cache / "models"
    assert [p.name for p in models.iterdir()] == ["SmolLM2-135M-Instruct"]  # no temporary folder left
    folder = models / "SmolLM2-135M-Instruct"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    weights = load_file(folder / "model.safetensors")
    reference = embedded[0].state_dict()
    assert {name for name in reference if name != "lm_head.weight"} <= set(weights)  # lm_head is tied
    assert all(torch.equal(t, reference[name]) for name, t in weights.items())
