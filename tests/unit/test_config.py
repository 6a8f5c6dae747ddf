from pathlib import Path

import pytest
from pydantic import ValidationError

from serve_apps.config import load_serve_config
from serve_apps.registry import AppArgs, app_args_from_serve_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_smoke_models():
    args = AppArgs()
    assert args.llm.is_smoke and args.codegen.is_smoke
    assert args.llm.served_model_name != args.codegen.served_model_name


@pytest.mark.parametrize(
    ("raw", "bad_key"),
    [
        ({"llm": {"served_model_name": "m", "max_batch_sise": 4}}, "max_batch_sise"),
        ({"limit": {"max_tokens": 5}}, "limit"),
        ({"codegen": {"served_model_name": "c", "backend": "tensorrt"}}, "backend"),
        ({"limits": {"max_token": 5}}, "max_token"),
    ],
)
def test_misspelled_or_unknown_keys_are_rejected(raw, bad_key):
    with pytest.raises(ValidationError) as info:
        AppArgs.model_validate(raw)
    assert bad_key in str(info.value)


def test_duplicate_served_model_names_are_rejected():
    with pytest.raises(ValidationError, match="different served_model_name"):
        AppArgs.model_validate(
            {"llm": {"served_model_name": "same"}, "codegen": {"served_model_name": "same"}}
        )


def test_config_yaml_is_a_valid_serve_config_with_valid_args():
    from ray.serve.schema import ServeDeploySchema

    raw = load_serve_config(REPO / "config.yaml")
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    assert app.import_path == "serve_apps.ray_app:build_app"
    args = app_args_from_serve_config(raw)
    assert args.llm.is_smoke
    # Every deployment named in the config exists in the graph build_app binds.
    from serve_apps.registry import INGRESS, SERVICES

    assert {d.name for d in app.deployments} == {INGRESS, *(s.name for s in SERVICES)}
    for d in app.deployments:
        # On a 2-core machine every replica must ask for a fraction of a CPU.
        assert 0 < d.ray_actor_options.num_cpus < 1


def test_vllm_options_are_typed_and_validated():
    cfg = AppArgs.model_validate(
        {
            "llm": {
                "served_model_name": "m",
                "backend": "vllm",
                "vllm": {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.85},
            }
        }
    ).llm
    assert cfg.vllm_options.tensor_parallel_size == 2
    assert cfg.vllm_options.enforce_eager is False
    # backend vllm without options: the defaults
    assert (
        AppArgs.model_validate(
            {"llm": {"served_model_name": "m", "backend": "vllm"}}
        ).llm.vllm_options.tensor_parallel_size
        == 1
    )


@pytest.mark.parametrize(
    ("llm", "message"),
    [
        ({"vllm": {"enforce_eager": True}}, "need `backend: vllm`"),
        ({"backend": "vllm", "vllm": {"tensor_parallel_sise": 2}}, "tensor_parallel_sise"),
        ({"backend": "vllm", "vllm": {"gpu_memory_utilization": 1.5}}, "gpu_memory_utilization"),
        ({"backend": "vllm", "vllm": {"tensor_parallel_size": 0}}, "tensor_parallel_size"),
        ({"backend": "vllm", "device": "cuda:1"}, "device auto, cuda or cpu"),
    ],
)
def test_bad_vllm_options_fail_when_the_config_is_parsed(llm, message):
    with pytest.raises(ValidationError) as info:
        AppArgs.model_validate({"llm": {"served_model_name": "m", **llm}})
    assert message in str(info.value)


def test_vllm_config_maps_onto_vllm_engine_args_without_importing_vllm():
    import sys

    from serve_apps.config import ModelConfig
    from serve_apps.engines import create_llm_engine

    cfg = ModelConfig.model_validate(
        {
            "served_model_name": "m",
            "backend": "vllm",
            "max_batch_size": 32,
            "max_model_len": 4096,
            "dtype": "bfloat16",
            "vllm": {
                "tensor_parallel_size": 4,
                "gpu_memory_utilization": 0.8,
                "quantization": "awq",
                "enforce_eager": True,
            },
        }
    )
    engine = create_llm_engine(cfg, "org/model")
    args = engine.engine_args  # type: ignore[attr-defined]
    assert args["model"] == "org/model" and args["max_num_seqs"] == 32
    assert args["max_model_len"] == 4096 and args["dtype"] == "bfloat16"
    assert args["tensor_parallel_size"] == 4 and args["gpu_memory_utilization"] == 0.8
    assert args["quantization"] == "awq" and args["enforce_eager"] is True
    # Constraints mean the same as on the transformers backend: llguidance, compact JSON.
    assert args["structured_outputs_config"] == {
        "backend": "guidance",
        "disable_any_whitespace": True,
    }
    assert "distributed_executor_backend" not in args  # no placement group given
    placed = create_llm_engine(cfg, "org/model", placement_group=object())
    assert placed.engine_args["distributed_executor_backend"] == "ray"  # type: ignore[attr-defined]
    assert "vllm" not in sys.modules
