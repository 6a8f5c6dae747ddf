from pathlib import Path

import pytest
from pydantic import ValidationError

from serve_apps.config import AppArgs, app_args_from_serve_config, load_serve_config

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
    from serve_apps.ray_app import INGRESS, SERVICE_DEPLOYMENTS

    assert {d.name for d in app.deployments} == {INGRESS, *SERVICE_DEPLOYMENTS.values()}
    for d in app.deployments:
        # On a 2-core machine every replica must ask for a fraction of a CPU.
        assert 0 < d.ray_actor_options.num_cpus < 1
