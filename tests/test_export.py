"""Hugging Face hand-off: `python -m bltjax.export`, Hub ids read from huggingface_hub's cache, and
trained entropy-model workdirs accepted wherever an entropy model is.

The Hub cache is built here the way huggingface_hub lays it out (``models--owner--name/refs/main``,
``snapshots/<commit>/<file>`` symlinks into ``blobs/<sha256>``), in a temporary HF_HUB_CACHE
with HF_HUB_OFFLINE=1: nothing leaves the machine. The transformers tests need the hf extra.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import test_trainer

from bltjax import checkpoints
from bltjax import tokenizer as byte_tokenizer
from bltjax.config import load_config
from bltjax.convert import hf, hf_tokenizer, hub
from bltjax.convert.export import ExportError, export_to_hf
from bltjax.data.entropy import load_entropy_model
from bltjax.data.sidecars import SidecarError
from bltjax.inference.generation.folders import default_entropy_model
from bltjax.inference.restore import RestoreError, load_for_inference
from bltjax.models.factory import build_model, example_inputs

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_ID = "someone/blt-tiny"
data_dir = test_trainer.data_dir  # the training tests' module fixture: the bundled corpus, prepared once
TEXTS = [
    "Grüße aus dem Jargon File: <s> is text here, not BOS.",
    "床前明月光，疑是地上霜。",
    "  two  spaces\tand\na tab",
]


def build_hub_cache(cache: pathlib.Path, repo_id: str, source: pathlib.Path, commit: str = COMMIT) -> pathlib.Path:
    """Lays ``source``'s files out as huggingface_hub caches a download of ``repo_id`` at ``commit``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in sorted(p for p in source.iterdir() if p.is_file()):
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo / "blobs" / blob)
        (snapshot / file.name).symlink_to(pathlib.Path("..", "..", "blobs", blob))
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, fixtures_dir, monkeypatch) -> pathlib.Path:
    """A private, offline HF_HUB_CACHE holding fixture B as someone/blt-tiny."""
    cache = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return build_hub_cache(cache, REPO_ID, fixtures_dir / "hf_blt_tiny_b")


# --- Hub ids ----------------------------------------------------------------------------------


def test_hub_ids_are_told_from_paths():
    assert hub.parse_hub_id("facebook/blt-1b") == ("facebook/blt-1b", "main")
    assert hub.parse_hub_id("facebook/blt-1b@v1.0") == ("facebook/blt-1b", "v1.0")
    for path in ("runs/quickstart/blt", "/abs/org/name", "./org/name", "~/x", "gs://bucket/x", "model", "a/../b"):
        assert hub.parse_hub_id(path) is None, path


def test_hub_id_resolves_to_the_cached_snapshot(hub_cache, fixtures_dir):
    folder = hub.resolve_model_source(REPO_ID)
    assert pathlib.Path(folder) == hub_cache and (pathlib.Path(folder) / "config.json").is_symlink()
    loaded = load_for_inference(REPO_ID, devices=jax.local_devices()[:1])
    assert loaded.source == os.fspath(hub_cache) and loaded.config.model_type == "blt"
    _, reference = hf.load_hf_blt(fixtures_dir / "hf_blt_tiny_b")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.params), reference)
    entropy = load_entropy_model(REPO_ID)  # the patcher of the cached BLT
    assert entropy.source == "huggingface" and entropy.path == os.fspath(hub_cache)


def test_eval_results_of_a_hub_model_stay_out_of_the_cache(hub_cache, tmp_path, monkeypatch):
    from bltjax.inference.evaluate import default_output_path

    monkeypatch.chdir(tmp_path)
    loaded = load_for_inference(REPO_ID, devices=jax.local_devices()[:1])
    path = pathlib.Path(default_output_path(loaded, "validation"))
    assert path == tmp_path / "eval" / ("models--" + REPO_ID.replace("/", "--")) / "validation.json"
    assert hub.cached_repo_folder_name(tmp_path / "run") is None


def test_a_local_folder_named_like_a_hub_id_wins(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(f"{REPO / 'experiments' / 'byte_lm.py'}:tiny")
    model = build_model(config)
    params = jax.jit(model.init)(jax.random.key(0), *example_inputs(config))["params"]
    checkpoints.save_model(tmp_path / REPO_ID, config, params)
    loaded = load_for_inference(REPO_ID, devices=jax.local_devices()[:1])
    assert loaded.config.model_type == "byte_lm" and loaded.source == str(tmp_path / REPO_ID)


def test_an_id_neither_local_nor_cached_is_a_clear_error(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = (
        r"someone/missing: no such folder, and no snapshot of the Hugging Face model someone/missing "
        r"\(revision main\) in the cache .*hf_cache; fetch it into that cache with `hf download someone/missing`"
    )
    with pytest.raises(RestoreError, match=expected):
        load_for_inference("someone/missing")
    with pytest.raises(FileNotFoundError, match="no snapshot of the Hugging Face model someone/missing"):
        load_entropy_model("someone/missing")
    with pytest.raises(RestoreError, match=r"runs/a/b: no such directory"):  # not an id: a plain missing path
        load_for_inference("runs/a/b")


def test_lookups_never_go_online(hub_cache, monkeypatch):
    """Even without HF_HUB_OFFLINE, only the cache is read: a missing id is an error, not a download."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []
    real = huggingface_hub.snapshot_download

    def spy(repo_id, **kwargs):
        calls.append(kwargs)
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    assert pathlib.Path(hub.resolve_model_source(f"{REPO_ID}@main")) == hub_cache
    with pytest.raises(hub.ModelSourceError, match=r"`hf download someone/other --revision v2`"):
        hub.resolve_model_source("someone/other@v2")
    assert [c["local_files_only"] for c in calls] == [True, True]
    assert {str(c["cache_dir"]) for c in calls} == {os.environ["HF_HUB_CACHE"]}


# --- the export ---------------------------------------------------------------------------------


def test_tokenizer_files_are_bltjax_ids_without_transformers(tmp_path):
    """tokenizer.json read by the `tokenizers` library itself gives bltjax's ids and text back."""
    tokenizers = pytest.importorskip("tokenizers")
    hf_tokenizer.write_tokenizer_files(tmp_path)
    backend = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in TEXTS[1:]:  # TEXTS[0] writes "<s>", which only transformers (split_special_tokens) keeps as bytes
        ids = backend.encode(text).ids
        assert ids == byte_tokenizer.encode(text, eos=False).tolist()
        assert backend.decode(ids, skip_special_tokens=True) == text
    assert sorted(set(hf_tokenizer.byte_symbols().values())) == sorted(hf_tokenizer.byte_symbols().values())


def test_export_of_a_hf_folder_is_complete_atomic_and_exact(fixtures_dir, tmp_path):
    source = fixtures_dir / "hf_blt_tiny_b"
    out = tmp_path / "export"
    result = export_to_hf(source, out, max_shard_bytes=500_000)
    assert result.files == (
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    )
    assert result.entropy_model == str(source)  # the folder's own patcher goes along
    assert not list(tmp_path.glob(".export*"))  # nothing left of the staging folder
    _, params = hf.load_hf_blt(out)
    _, reference = hf.load_hf_blt(source)
    jax.tree.map(np.testing.assert_array_equal, params, reference)
    config = json.loads((out / "config.json").read_text())
    original = json.loads((source / "config.json").read_text())
    assert config["patching_threshold"] == pytest.approx(original["patching_threshold"])
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    with pytest.raises(ExportError, match=r"--out: .*export already exists \(pass --overwrite"):
        export_to_hf(source, out)
    export_to_hf(source, out, dtype="bfloat16", overwrite=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not (out / hf.INDEX_FILE).exists() and (out / "model.safetensors").is_file()


def test_export_refuses_bad_input_before_writing(fixtures_dir, tmp_path):
    config = load_config(f"{REPO / 'experiments' / 'byte_lm.py'}:tiny")
    model = build_model(config)
    params = jax.jit(model.init)(jax.random.key(0), *example_inputs(config))["params"]
    byte_lm = checkpoints.save_model(tmp_path / "byte_lm", config, params)
    with pytest.raises(ExportError, match=r"--model: .*byte_lm holds a 'byte_lm' model"):
        export_to_hf(byte_lm, tmp_path / "out")
    with pytest.raises(ExportError, match=r"--dtype: expected one of \['bfloat16', 'float32'\], got 'fp8'"):
        export_to_hf(byte_lm, tmp_path / "out", dtype="fp8")
    with pytest.raises(ExportError, match="--entropy-model: .*no such folder"):
        export_to_hf(fixtures_dir / "hf_blt_tiny_b", tmp_path / "out", entropy_model=tmp_path / "nowhere")
    blt_config = load_config(f"{REPO / 'experiments' / 'blt_tiny.py'}")
    blt_config.patching.mode, blt_config.patching.threshold = "entropy", 1.25
    blt_config.model.document_mask = False
    blt = build_model(blt_config)
    blt_params = jax.jit(blt.init)(jax.random.key(1), *example_inputs(blt_config))["params"]
    blt_dir = checkpoints.save_model(tmp_path / "blt", blt_config, blt_params)
    with pytest.raises(ExportError, match=r"--entropy-model: .*blt is an entropy-patched BLT .* give its entropy"):
        export_to_hf(blt_dir, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blt", "byte_lm"]
    # With its entropy model: the byte LM becomes transformers' patcher, with the BLT's threshold.
    result = export_to_hf(blt_dir, tmp_path / "out", entropy_model=byte_lm)
    assert result.entropy_model == str(byte_lm)
    patcher, patcher_params, threshold = hf.load_hf_entropy_model(tmp_path / "out")
    shape = lambda s: (s.dim, s.n_layers, s.n_heads, s.hidden_dim, s.window, s.rope_theta)  # noqa: E731
    assert threshold == 1.25 and shape(patcher.config.stack) == shape(build_model(config).config.stack)
    jax.tree.map(np.testing.assert_array_equal, patcher_params, jax.device_get(nn.meta.unbox(params)))


def _run(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
    )


def _trained_blt(data_dir, tmp_path) -> pathlib.Path:
    """A tiny BLT trained for 3 steps (space patching, no document masks: transformers has none)."""
    from bltjax.training.trainer import train

    config = test_trainer.tiny_config(
        data_dir, **{"train.steps": 3, "train.log_every": 1, "model.document_mask": False}
    )
    workdir = tmp_path / "blt"
    train(config, workdir, console=open(os.devnull, "w"))
    return workdir


@pytest.mark.slow
def test_exported_training_workdir_loads_in_transformers_with_parity(data_dir, tmp_path):
    torch = pytest.importorskip("torch", reason="the hf extra (torch, transformers) is not installed")
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    workdir = _trained_blt(data_dir, tmp_path)
    out = tmp_path / "export"
    done = _run("bltjax.export", f"--model={workdir}", f"--out={out}", "--dtype=f32", "--shard-size=150KB")
    assert done.returncode == 0, done.stderr
    assert "one byte per patch" in done.stderr  # space patching: transformers needs patch_lengths
    assert (out / hf.INDEX_FILE).is_file() and len(list(out.glob("model-*-of-*.safetensors"))) >= 2

    reference = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    loaded = load_for_inference(workdir, devices=jax.local_devices()[:1])
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids == byte_tokenizer.encode(text, eos=False).tolist()
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        tokens = np.array([ids], np.int32)
        lengths = [1] + [4] * ((len(ids) - 1) // 4) + ([(len(ids) - 1) % 4] if (len(ids) - 1) % 4 else [])
        with torch.no_grad():
            theirs = reference(
                input_ids=torch.tensor(tokens, dtype=torch.long),
                patch_lengths=torch.tensor([lengths], dtype=torch.long),
                use_cache=False,
            ).logits.numpy()
        with_next = np.array([lengths[:-1] + [lengths[-1] + 1]], np.int32)  # bltjax: lengths add up to N + 1
        ours = np.asarray(loaded.model.apply({"params": loaded.params}, tokens, with_next))
        err = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
        assert err <= 1e-4, f"{text!r}: rel err {err:.2e}"

    bf16 = tmp_path / "export_bf16"
    assert _run("bltjax.export", f"--model={workdir}", f"--out={bf16}", "--dtype=bf16").returncode == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(bf16)
    assert model.dtype == torch.bfloat16
    assert model.model.local_encoder.embed_tokens.weight.shape == (260, 64)


@pytest.mark.slow
def test_export_and_generate_read_a_hub_id_offline(hub_cache, tmp_path):
    out = tmp_path / "export"
    env = {"HF_HUB_CACHE": os.environ["HF_HUB_CACHE"], "HF_HUB_OFFLINE": "1"}
    done = _run("bltjax.export", f"--model={REPO_ID}", f"--out={out}", env=env)
    assert done.returncode == 0, done.stderr
    assert f"exported {hub_cache} -> {out}" in done.stdout
    generated = _run("bltjax.generate", f"--model={REPO_ID}", "--prompt=Hi", "--max-bytes=3", env=env)
    assert generated.returncode == 0, generated.stderr
    assert f"entropy model: {hub_cache}" in generated.stdout  # the cached folder's own patcher
    missing = _run("bltjax.export", "--model=someone/missing", f"--out={out}-2", env=env)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert "no snapshot of the Hugging Face model someone/missing" in missing.stderr


# --- trained entropy-model workdirs ---------------------------------------------------------------


@pytest.fixture(scope="module")
def entropy_workdir(tmp_path_factory, corpus_data) -> tuple[pathlib.Path, pathlib.Path]:
    """(an entropy model trained 2 steps by bltjax.train, a private copy of the data to write sidecars into)."""
    from bltjax.training.trainer import train

    root = tmp_path_factory.mktemp("entropy_workdir")
    data = root / "data"
    shutil.copytree(corpus_data, data)
    config = load_config(f"{REPO / 'experiments' / 'entropy_model.py'}:tiny")
    config.data.path = str(data)
    config.train.steps = 2
    config.data.batch_size = 8  # one row per fake device
    config.train.log_every = 1
    config.train.eval_every = 0
    config.optimizer.warmup_steps = 1
    workdir = root / "entropy_model"
    train(config, workdir, console=open(os.devnull, "w"))
    return workdir, data


@pytest.mark.slow
def test_entropy_model_workdir_is_accepted_like_its_export(entropy_workdir):
    from bltjax.data import entropy

    workdir, data = entropy_workdir
    from_run = load_entropy_model(workdir)
    step = checkpoints.complete_steps(workdir)[-1]
    from_step = load_entropy_model(workdir / "checkpoints" / str(step))
    exported = checkpoints.save_model(workdir.parent / "export", from_run.config, jax.device_get(from_run.params))
    from_export = load_entropy_model(exported)
    assert from_run.source == "bltjax" and from_run.fingerprint == from_step.fingerprint == from_export.fingerprint
    summary = entropy.run(data, workdir, threshold=1.0, log=open(os.devnull, "w"))
    assert summary.tag is not None and summary.computed
    recorded = json.loads((data / "sidecars.json").read_text())["entropy_model"]
    assert recorded["fingerprint"] == from_export.fingerprint
    # generate's default: the run's own entropy-model workdir next to the BLT's, proven by that fingerprint
    config = ml_collections.ConfigDict({"data": {"path": str(data)}})
    assert default_entropy_model(workdir.parent / "blt", config) == workdir
    shutil.move(exported, workdir / "export")  # the quickstart's layout: its export comes first
    assert default_entropy_model(workdir.parent / "blt", config) == workdir / "export"


@pytest.mark.slow
def test_entropy_cli_accepts_a_workdir_and_refuses_a_blt_run(entropy_workdir, data_dir, tmp_path):
    workdir, data = entropy_workdir
    done = _run("bltjax.entropy", f"--data={data}", f"--entropy-model={workdir}", "--threshold=1.5")
    assert done.returncode == 0, done.stderr
    assert "threshold=1.5" in done.stdout
    blt_run = _trained_blt(data_dir, tmp_path)
    with pytest.raises(SidecarError, match=r"field 'model_type' is 'blt'; an entropy model must be a 'byte_lm'"):
        load_entropy_model(blt_run)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(SidecarError, match="nor a training workdir with a complete checkpoint"):
        load_entropy_model(tmp_path / "empty")


def test_readme_hugging_face_commands_use_real_flags():
    """Every command of the README's Hugging Face section parses with its program's flags (the slow
    tests above run the same commands on real folders)."""
    import importlib
    import shlex

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Using Hugging Face checkpoints") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    commands = [line for block in blocks for line in block.splitlines() if "python -m bltjax." in line]
    assert {c.split("python -m ")[1].split()[0] for c in commands} >= {"bltjax.export", "bltjax.entropy"}
    for command in commands:
        words = shlex.split(command.split("python -m ", 1)[1])
        module = importlib.import_module(words[0])
        if hasattr(module, "PROGRAM"):
            module.PROGRAM.parse([words[0], *words[1:]])  # raises CommandLineError for an unknown flag
        else:  # an argparse program
            parser_flags = {a for a in words[1:] if a.startswith("--")}
            source = pathlib.Path(module.__file__).read_text()
            assert all(f'"{flag.split("=")[0]}"' in source for flag in parser_flags), command
