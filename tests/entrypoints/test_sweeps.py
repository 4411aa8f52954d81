"""Sweep plugins: a real 2-trial Optuna search on tiny data, the SLURM launcher config, and the
resume rule for jobs that Lightning's SLURM auto-requeue brought back."""

from __future__ import annotations

import csv
import importlib.util

import pytest
import yaml
from hydra import compose
from omegaconf import OmegaConf

from anchordet.app import resolve_resume

NEEDS_OPTUNA = pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
    reason="hydra-optuna-sweeper is not installed (pip install -e '.[optuna]'; the dev extra has it)")
NEEDS_SUBMITIT = pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="hydra-submitit-launcher is not installed (pip install -e '.[slurm]'; the dev extra has it)")


@pytest.mark.slow
@NEEDS_OPTUNA
def test_optuna_search_runs_two_trials_and_reports_the_best(run_cli, tmp_path):
    sweep_dir = tmp_path / "sweep"
    # No -m: hparams_search=optuna switches Hydra to multirun itself.
    run_cli("train.py", "hparams_search=optuna", "experiment=tiny", "hydra.sweeper.n_trials=2",
            f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [row["run"] for row in rows] == ["0", "1"]
    searched = ("optim.optimizer.lr", "anchor.k_per_level", "head.box_weight", "head.obj_weight")
    trial_values = []
    for row in rows:
        # Each trial trained with the values the sampler drew for it.
        overrides = dict(item.split("=", 1) for item in row["overrides"].split())
        trained = OmegaConf.load(sweep_dir / row["run"] / ".hydra" / "config.yaml")
        for key in searched:
            assert float(OmegaConf.select(trained, key)) == pytest.approx(float(overrides[key]))
        assert 0.001 <= trained.optim.optimizer.lr <= 0.05 and trained.anchor.k_per_level in (2, 3, 4)
        assert 1.0 <= trained.head.box_weight <= 10.0 and 0.5 <= trained.head.obj_weight <= 2.0
        trial_values.append({key: float(overrides[key]) for key in searched})
    assert trial_values[0] != trial_values[1]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(float(row["best"]) for row in rows))
    assert {k: float(v) for k, v in results["best_params"].items()} in trial_values


@NEEDS_OPTUNA
def test_optuna_search_space_composes_for_both_heads(hydra_context):
    cfg = compose(config_name="train", overrides=["hparams_search=optuna"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.hydra.sweeper.sampler.seed == cfg.seed
    for key in cfg.hydra.sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, f"search key {key} is not in the config"
    rpn = compose(config_name="train", overrides=["hparams_search=optuna", "head=rpn", "anchor=kmeans"],
                  return_hydra_config=True)
    for key in rpn.hydra.sweeper.params:
        assert OmegaConf.select(rpn, key) is not None, f"search key {key} is not in the RPN config"


@NEEDS_SUBMITIT
def test_slurm_launcher_config_is_complete_and_asks_for_the_requeue_signal(hydra_context, tmp_path):
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
    from submitit.slurm.slurm import _make_sbatch_string

    cfg = compose(config_name="train", return_hydra_config=True, overrides=[
        "hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
        f"hydra.sweep.dir={tmp_path}"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert set(launcher) == set(OmegaConf.structured(SlurmQueueConf).keys())
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == 4 and launcher["nodes"] == 2
    # The sbatch script submitit writes from these settings (the launcher's mapping of its keys to
    # sbatch options, done by hand): SIGUSR1 90 s before the limit, which is what Lightning's
    # SLURMEnvironment(auto_requeue=True) listens for, and not submitit's own USR2.
    script = _make_sbatch_string(
        command="python -u -m submitit.core._submit", folder=str(tmp_path), nodes=launcher["nodes"],
        ntasks_per_node=launcher["tasks_per_node"], cpus_per_task=launcher["cpus_per_task"],
        gpus_per_node=launcher["gpus_per_node"], mem=f"{launcher['mem_gb']}GB",
        time=launcher["timeout_min"], job_name=launcher["name"],
        additional_parameters=launcher["additional_parameters"], signal_delay_s=launcher["signal_delay_s"])
    assert "#SBATCH --signal=USR1@90" in script and "USR2" not in script
    assert "#SBATCH --ntasks-per-node=4" in script and "#SBATCH --nodes=2" in script


def test_a_requeued_job_resumes_from_its_newest_hpc_checkpoint(tmp_path):
    cfg = OmegaConf.create({"ckpt_path": None, "resume": False, "paths": {"output_dir": str(tmp_path)}})
    assert resolve_resume(cfg) is None
    (tmp_path / "hpc_ckpt_old.ckpt").write_bytes(b"")  # not a Lightning name: ignored
    for n in (2, 10, 9):  # numbered, not dated: hpc_ckpt_10 is the newest
        (tmp_path / f"hpc_ckpt_{n}.ckpt").write_bytes(b"")
    assert resolve_resume(cfg) == (tmp_path / "hpc_ckpt_10.ckpt").resolve()
    explicit = tmp_path / "other.ckpt"
    cfg.ckpt_path = str(explicit)
    assert resolve_resume(cfg) == explicit.resolve()  # an explicit ckpt_path still wins
