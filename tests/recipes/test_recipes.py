"""Recipes: generated Axolotl configs (defaults, overrides, hardware presets) checked by Axolotl's
own schema; refusals with the reason; stage-folder contract. No training here (see test_train.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tests.helpers import chatml_row, make_corpus, make_dataset, pubmedqa_rows
from tools.artifact import is_artifact, read_artifact


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipes-data")
    return {"corpus": make_corpus(d / "corpus"), "dataset": make_dataset(d / "dataset", n_val=6)}


def cli(*args):
    from tools.cli import cli as tools_cli
    r = CliRunner().invoke(tools_cli, [str(a) for a in args], catch_exceptions=False)
    return r


def schema_check(yaml_file: Path, n_gpu: int, gpu: bool = True):
    """Validate a written axolotl.yaml with Axolotl's config model, independently of recipes/."""
    from importlib.metadata import version

    from axolotl.utils.schemas.config import AxolotlConfigWCapabilities
    cfg = yaml.safe_load(yaml_file.read_text())
    caps = {"bf16": gpu, "fp8": False, "tf32": gpu, "n_gpu": n_gpu, "compute_capability": "sm_80" if gpu else None}
    return AxolotlConfigWCapabilities(**cfg, capabilities=caps,
                                      env_capabilities={"torch_version": version("torch").split("+")[0]})


# -- presets ------------------------------------------------------------------------------------

def test_a_stored_preset_reads_back_by_one_rule():
    """Preset.gpus is processes per node (GPUs on GPU, CPU processes on CPU): hardware.preset_choice alone
    reads it back, for StageSpec.from_params and for an SFT stage inheriting stage one's preset; every
    preset made again from its stored form is the same preset, and the CPU one names no GPUs."""
    from recipes.hardware import make_preset, preset_choice
    from recipes.stage import StageSpec
    from tools.errors import UserError

    for device, gpus, nodes, shard, procs in (("gpu", None, 1, None, None), ("gpu", 4, 2, "zero3", None),
                                              ("cpu", None, 1, None, 3), ("cpu", None, 2, None, 2)):
        p = make_preset(device, gpus, nodes, shard, procs)
        assert make_preset(**{k: v for k, v in preset_choice(p.to_dict()).items() if v is not None}) == p
    cpu = make_preset("cpu", procs=3)
    assert cpu.to_dict()["gpus"] == 3 and cpu.procs == 3
    assert preset_choice(cpu.to_dict()) == {"device": "cpu", "gpus": None, "procs": 3, "nodes": 1, "shard": "none"}
    assert preset_choice(None) == dict.fromkeys(("device", "gpus", "procs", "nodes", "shard"))
    spec = StageSpec.from_params({"kind": "completion", "data": [], "base_model": "m", "preset": cpu.to_dict()}, "o")
    assert (spec.device, spec.gpus, spec.procs, spec.nodes) == ("cpu", None, 3, 1)
    gpu = StageSpec.from_params({"kind": "completion", "data": [], "base_model": "m",
                                 "preset": make_preset("gpu", 4).to_dict()}, "o")
    assert (gpu.device, gpu.gpus, gpu.procs, gpu.shard) == ("gpu", 4, None, "zero2")
    with pytest.raises(UserError, match="no GPUs"):
        make_preset("cpu", gpus=2)


@pytest.mark.parametrize("procs", [None, 2])
def test_sft_inherits_stage_ones_cpu_processes(monkeypatch, tmp_path, procs):
    """An SFT stage over a 3-process CPU stage one trains on 3 CPU processes (read back by preset_choice),
    or on the processes it asks for (--procs 2)."""
    import recipes.stage as S
    from recipes.hardware import Preset, make_preset

    one = {"base_model": "org/model", "inputs": [], "start": "adapter", "stage_one": str(tmp_path / "s1"),
           "inherit": {"preset": make_preset("cpu", procs=3).to_dict(), "mode": "lora"}}
    monkeypatch.setattr(S, "resolve_from", lambda from_stage, merged: one)
    r = S._resolve(S.StageSpec("sft", tmp_path / "s2", from_stage=str(tmp_path / "s1"), procs=procs))
    assert r.preset == Preset("cpu", procs or 3, 1, "none") and r.mode == "lora"


def test_hardware_presets_pass_axolotl_schema(tmp_path, tiny_llama, data):
    from recipes.stage import StageSpec, write_stage

    cases = {"gpu1": ({}, 1), "gpu4_zero2": ({"gpus": 4, "shard": "zero2"}, 4),
             "gpu8_fsdp2": ({"gpus": 8, "shard": "fsdp2"}, 8), "nodes2x4": ({"gpus": 4, "nodes": 2}, 8)}
    arts = {}
    for name, (kw, world) in cases.items():
        art = write_stage(StageSpec("completion", tmp_path / name, base_model=str(tiny_llama), data=[str(data["corpus"])], **kw))
        arts[name] = art
        m = schema_check(art.path / "axolotl.yaml", world)
        assert m.base_model == str(tiny_llama)
        cfg = yaml.safe_load((art.path / "axolotl.yaml").read_text())
        # the MediLoRA recipe
        assert (cfg["adapter"], cfg["load_in_4bit"], cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"]) == \
            ("qlora", True, 8, 16, 0.05)
        assert cfg["lora_target_modules"] == ["q_proj", "v_proj"]
        assert (cfg["lr_scheduler"], cfg["learning_rate"], cfg["warmup_steps"]) == ("cosine", 2e-4, 100)
        assert (cfg["micro_batch_size"], cfg["gradient_accumulation_steps"], cfg["num_epochs"]) == (2, 4, 2)
        assert cfg["bf16"] == "auto" and cfg["datasets"][0]["type"] == "completion"
        assert cfg["output_dir"] == str(art.path / "output")
        assert art.extra["arch"] == "causal" and art.stage == "stage.completion"
        assert (art.path / "launch.sh").stat().st_mode & 0o111

    c1 = yaml.safe_load((arts["gpu1"].path / "axolotl.yaml").read_text())
    assert c1["optimizer"] == "adamw_bnb_8bit" and "deepspeed" not in c1 and "fsdp_version" not in c1
    assert "--launcher accelerate" in (arts["gpu1"].path / "launch.sh").read_text()

    z2 = arts["gpu4_zero2"].path
    c = yaml.safe_load((z2 / "axolotl.yaml").read_text())
    assert c["deepspeed"] == str(z2 / "deepspeed_zero2.json")
    assert json.loads((z2 / "deepspeed_zero2.json").read_text())["zero_optimization"]["stage"] == 2
    assert "--multi_gpu --num_processes 4" in (z2 / "launch.sh").read_text()

    f8 = arts["gpu8_fsdp2"].path
    c = yaml.safe_load((f8 / "axolotl.yaml").read_text())
    assert c["fsdp_version"] == 2 and c["fsdp_config"]["transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert c["fsdp_config"]["cpu_ram_efficient_loading"] is False  # Axolotl: not with a 4-bit base
    assert c["optimizer"] == "adamw_torch_fused" and "deepspeed" not in c
    assert "--num_processes 8" in (f8 / "launch.sh").read_text()

    n2 = arts["nodes2x4"].path
    launch = (n2 / "launch.sh").read_text()
    assert "--launcher torchrun -- --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d" in launch
    assert '"${MASTER_ADDR}:${MASTER_PORT}"' in launch
    sb = (n2 / "slurm.sbatch").read_text()
    assert "#SBATCH --nodes=2" in sb and "#SBATCH --gpus-per-node=4" in sb and "launch.sh train" in sb
    # one process cannot drive two nodes: refused with the way to do it, --dry-run shows the commands
    r = cli("train", n2)
    assert r.exit_code == 2 and "sbatch" in r.output and not (n2 / "output").exists()
    r = cli("train", n2, "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)["results"]
    assert plan["commands"][1][1:5] == ["train", str(n2 / "axolotl.yaml"), "--launcher", "torchrun"]


def test_cpu_processes_and_nodes_write_launch_lines(tmp_path, tiny_llama, data):
    """Several CPU processes: DDP over gloo through the same launchers as the GPU presets (trained for
    real in test_train_distributed.py)."""
    r = cli("stage", "completion", "--base-model", tiny_llama, "--corpus", data["corpus"], "--out", tmp_path / "p2",
            "--device", "cpu", "--lora", "--procs", "2", "--json")
    assert r.exit_code == 0, r.output
    man = json.loads(r.output[r.output.index("{"):])["manifest"]
    assert man["extra"]["world_size"] == 2 and man["extra"]["launcher"] == "accelerate"
    launch = (tmp_path / "p2" / "launch.sh").read_text()
    assert "--launcher accelerate -- --multi_gpu --num_processes 2 --num_machines 1" in launch
    for line in ("export ACCELERATE_USE_CPU=true", "export MEDILORA_DEVICE=cpu", "export MEDILORA_SEED=42",
                 "recipes/seeding", "OMP_NUM_THREADS"):
        assert line in launch, line
    cfg = yaml.safe_load((tmp_path / "p2" / "axolotl.yaml").read_text())
    assert cfg["bf16"] is False and "deepspeed" not in cfg and "fsdp_version" not in cfg
    schema_check(tmp_path / "p2" / "axolotl.yaml", 2, gpu=False)
    r = cli("stage", "completion", "--base-model", tiny_llama, "--corpus", data["corpus"], "--out", tmp_path / "n2",
            "--device", "cpu", "--lora", "--nodes", "2", "--procs", "2")
    assert r.exit_code == 0, r.output
    launch = (tmp_path / "n2" / "launch.sh").read_text()
    assert "--launcher torchrun -- --nnodes 2 --nproc_per_node 2 --rdzv_backend c10d" in launch
    assert "ACCELERATE_USE_CPU=true" in launch and (tmp_path / "n2" / "slurm.sbatch").is_file()
    r = cli("train", tmp_path / "n2", "--dry-run", "--json")
    plan = json.loads(r.output)["results"]
    assert plan["world_size"] == 4 and plan["env"]["ACCELERATE_USE_CPU"] == "true"
    # one process stays the plain python launcher, without the multi-process switches
    r = cli("stage", "completion", "--base-model", tiny_llama, "--corpus", data["corpus"], "--out", tmp_path / "p1",
            "--device", "cpu", "--lora")
    launch = (tmp_path / "p1" / "launch.sh").read_text()
    assert r.exit_code == 0 and "--launcher python" in launch and "ACCELERATE_USE_CPU" not in launch
    for args, msg in ((["--device", "cpu", "--gpus", "2"], "--procs"), (["--gpus", "2", "--procs", "4"], "differs"),
                      (["--device", "cpu", "--procs", "0"], "at least 1")):
        r = cli("stage", "completion", "--base-model", tiny_llama, "--corpus", data["corpus"], "--out",
                tmp_path / "bad", *args)
        assert r.exit_code == 2 and msg in r.output, (args, r.output)
    assert not (tmp_path / "bad").exists()


def test_zero3_with_quantized_base(tmp_path, tiny_llama, data):
    """ZeRO-3 + QLoRA is written with bf16 (Axolotl 0.19 stores 4-bit weights in bf16: recipes/hardware.py);
    without bf16, or with an 8-bit base, it is refused with the reason."""
    out = tmp_path / "z3"
    r = cli("stage", "completion", "--base-model", tiny_llama, "--corpus", data["corpus"], "--out", out,
            "--gpus", "4", "--shard", "zero3")
    assert r.exit_code == 0, r.output
    cfg = yaml.safe_load((out / "axolotl.yaml").read_text())
    assert (cfg["adapter"], cfg["load_in_4bit"], cfg["bf16"]) == ("qlora", True, True)
    assert json.loads((out / "deepspeed_zero3.json").read_text())["zero_optimization"]["stage"] == 3
    assert cfg["deepspeed"] == str(out / "deepspeed_zero3.json")
    schema_check(out / "axolotl.yaml", 4)
    bad = tmp_path / "z3-fp16"
    r = cli("stage", "completion", "--base-model", tiny_llama, "--corpus", data["corpus"], "--out", bad,
            "--gpus", "4", "--shard", "zero3", "--set", "bf16=false", "--set", "fp16=true")
    assert r.exit_code == 2 and "ZeRO-3 + QLoRA needs bf16" in r.output and "zero2" in r.output
    r = cli("stage", "completion", "--base-model", tiny_llama, "--corpus", data["corpus"], "--out", bad,
            "--gpus", "4", "--shard", "zero3", "--lora", "--set", "load_in_8bit=true", "--set", "adapter=lora")
    assert r.exit_code == 2 and "ZeRO-3 with an 8-bit base" in r.output
    assert not bad.exists()
    # without quantization ZeRO-3 keeps bf16 "auto"
    r = cli("stage", "completion", "--base-model", tiny_llama, "--corpus", data["corpus"], "--out", tmp_path / "z3l",
            "--gpus", "4", "--shard", "zero3", "--lora")
    assert r.exit_code == 0, r.output
    assert yaml.safe_load((tmp_path / "z3l" / "axolotl.yaml").read_text())["bf16"] == "auto"


def test_axolotl_refusal_is_exit_2_with_its_message(tmp_path, tiny_llama, data):
    out = tmp_path / "bad"
    r = cli("stage", "completion", "--base-model", tiny_llama, "--corpus", data["corpus"], "--out", out,
            "--qlora", "--set", "load_in_4bit=false")
    assert r.exit_code == 2
    assert "Axolotl refuses this config" in r.output and "load_in_4bit to be True for qlora" in r.output
    assert str(out / "axolotl.yaml") in r.output
    assert not out.exists() and not list(tmp_path.glob(".bad.partial-*"))
    r = cli("stage", "completion", "--base-model", tiny_llama, "--corpus", data["corpus"], "--out", out,
            "--set", "lora_rr=4")
    assert r.exit_code == 2 and "lora_rr is not an Axolotl config key" in r.output and "lora_r" in r.output
    r = cli("stage", "completion", "--base-model", tiny_llama, "--corpus", data["corpus"], "--out", out,
            "--device", "cpu", "--shard", "zero2")
    assert r.exit_code == 2 and "NCCL" in r.output


def test_overrides_cpu_profile_and_determinism(tmp_path, tiny_llama, data):
    from recipes.axolotl_cpu import CPU_KEYS
    from recipes.stage import StageSpec, write_stage

    kw = dict(base_model=str(tiny_llama), data=[str(data["dataset"])], device="cpu", mode="lora",
              lora_r=16, epochs=3, lr=1e-3, max_steps=7, packing=False,
              set_items=["fsdp_config.offload_params=true", "lora_target_modules=[q_proj, k_proj, v_proj]",
                         "warmup_steps=null"])
    with pytest.raises(Exception) as ei:  # fsdp keys on CPU are refused
        write_stage(StageSpec("sft", tmp_path / "x", **kw))
    assert "NCCL" in str(ei.value) or "FSDP" in str(ei.value)
    kw["set_items"] = kw["set_items"][1:]
    art = write_stage(StageSpec("sft", tmp_path / "s", **kw))
    cfg = yaml.safe_load((art.path / "axolotl.yaml").read_text())
    for k, v in CPU_KEYS.items():
        assert cfg[k] == v, k
    assert (cfg["adapter"], cfg["load_in_4bit"], cfg["lora_r"], cfg["num_epochs"], cfg["learning_rate"]) == \
        ("lora", False, 16, 3, 1e-3)
    assert cfg["max_steps"] == 7 and cfg["sample_packing"] is False and "warmup_steps" not in cfg
    assert cfg["lora_target_modules"] == ["q_proj", "k_proj", "v_proj"]
    # SFT: chat template, loss on assistant turns only, ChatML end of turn, validation file as test set
    ds = cfg["datasets"][0]
    assert (ds["type"], ds["roles_to_train"], ds["train_on_eos"]) == ("chat_template", ["assistant"], "turn")
    assert cfg["chat_template"] == "chatml" and cfg["eot_tokens"] == ["<|im_end|>"]
    assert "tokens" not in cfg and "special_tokens" not in cfg  # the tiny tokenizer has ChatML, EOS <|im_end|>
    assert cfg["test_datasets"][0]["path"].endswith("validation.jsonl")
    # sequence length from the data: covers the longest row, a bucket
    ts = art.extra["token_stats"]
    assert ts["counted_with"] == "tokenizer" and cfg["sequence_len"] >= ts["max"] and ts["longer_than_sequence_len"] == 0
    assert "--launcher python" in (art.path / "launch.sh").read_text()
    schema_check(art.path / "axolotl.yaml", 1, gpu=False)
    # same inputs -> same bytes; re-running is a no-op
    first = (art.path / "axolotl.yaml").read_bytes()
    again = write_stage(StageSpec("sft", tmp_path / "s", **kw))
    assert again.manifest["finished"] == art.manifest["finished"]
    again = write_stage(StageSpec("sft", tmp_path / "s", force=True, **kw))
    assert (again.path / "axolotl.yaml").read_bytes() == first


def test_bad_inputs_name_file_line_or_field(tmp_path, tiny_llama, data):
    system = "You answer."
    rows = [chatml_row(d, system) for d in pubmedqa_rows(3)]
    rows[2]["messages"] = [m for m in rows[2]["messages"] if m["role"] != "assistant"]
    bad = make_dataset(tmp_path / "bad-ds", rows=rows)
    r = cli("stage", "sft", "--base-model", tiny_llama, "--dataset", bad, "--out", tmp_path / "o")
    assert r.exit_code == 2 and f"{bad / 'train.jsonl'}:3" in r.output and "assistant" in r.output
    r = cli("stage", "sft", "--base-model", tmp_path / "nope", "--dataset", data["dataset"], "--out", tmp_path / "o")
    assert r.exit_code == 2 and "base model folder not found" in r.output
    r = cli("stage", "sft", "--base-model", tiny_llama, "--dataset", data["corpus"], "--out", tmp_path / "o")
    assert r.exit_code == 2 and "expected a dataset artifact" in r.output
    (tmp_path / "half").mkdir()
    r = cli("stage", "completion", "--base-model", tiny_llama, "--corpus", tmp_path / "half", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "no manifest.json" in r.output
    # stage two needs a trained stage one
    s1 = tmp_path / "s1"
    assert cli("stage", "completion", "--base-model", tiny_llama, "--corpus", data["corpus"], "--out", s1,
               "--device", "cpu", "--lora").exit_code == 0
    r = cli("stage", "sft", "--from", s1, "--dataset", data["dataset"], "--out", tmp_path / "s2")
    assert r.exit_code == 2 and "has not finished training" in r.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "s2").exists()
    # an edited axolotl.yaml is not trained silently
    (s1 / "axolotl.yaml").write_text((s1 / "axolotl.yaml").read_text() + "max_steps: 1\n")
    r = cli("train", s1)
    assert r.exit_code == 2 and "edited after" in r.output and not is_artifact(s1 / "output")


def test_train_dry_run_prints_exact_commands(tmp_path, tiny_llama, data, tools_cli):
    s = tmp_path / "stage"
    r = tools_cli("stage", "completion", "--base-model", tiny_llama, "--corpus", data["corpus"], "--out", s,
                  "--device", "cpu", "--lora", "--json")
    assert r.returncode == 0, r.stderr
    man = json.loads(r.stdout)["manifest"]
    assert man["stage"] == "stage.completion" and read_artifact(s).manifest["fingerprint"] == man["fingerprint"]
    r = tools_cli("train", s, "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if not ln.startswith("#")]
    assert len(lines) == 1  # one process: `axolotl train` prepares the data itself
    assert f"axolotl train {s}/axolotl.yaml --launcher python" in lines[0] and "axolotl preprocess" not in r.stdout
    assert "HF_HUB_OFFLINE=1" in lines[0] and "PATH=" in lines[0]
    assert not (s / "output").exists() and not (s / "train.log").exists()
    # two processes: the data is prepared once, before the ranks start
    r = tools_cli("stage", "completion", "--base-model", tiny_llama, "--corpus", data["corpus"], "--out", tmp_path / "s2",
                  "--device", "cpu", "--lora", "--procs", "2")
    assert r.returncode == 0, r.stderr
    r = tools_cli("train", tmp_path / "s2", "--dry-run")
    lines = [ln for ln in r.stdout.splitlines() if not ln.startswith("#")]
    assert len(lines) == 2 and f"axolotl preprocess {tmp_path / 's2'}/axolotl.yaml" in lines[0], r.stdout
    assert "axolotl train" in lines[1] and "--num_processes 2" in lines[1]


def test_sequence_len_that_drops_every_row_is_refused(tmp_path, tiny_llama, data, tools_cli):
    """Axolotl would drop every SFT row and die with 'empty range for randrange()': say why, exit 2."""
    p = tools_cli("stage", "sft", "--base-model", tiny_llama, "--dataset", data["dataset"], "--device", "cpu", "--lora",
                  "--seq-len", "16", "--out", tmp_path / "s")
    assert p.returncode == 2, p.stderr
    assert "every scanned row is longer than sequence_len=16" in p.stderr and "--seq-len" in p.stderr
    assert not (tmp_path / "s").exists()
