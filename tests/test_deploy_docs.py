"""Every values example in docs/clusters.md renders, validates and configures the operator."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent / "kube"))
import deploy_render as dr

DOC = dr.REPO / "docs" / "clusters.md"
BLOCKS = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_has_examples():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_values_example_renders_and_configures_the_operator(index: int, tmp_path: Path) -> None:
    from dptrain.operator._profiles import load_config, placements

    values = yaml.safe_load(BLOCKS[index])
    path = tmp_path / "values.yaml"
    path.write_text(BLOCKS[index])
    objects = dr.helm_template(dr.CASES_BY_NAME["default"], values_files=[path])
    for obj in objects:
        dr.validate_object(obj)
    config = tmp_path / "operator.yaml"
    config.write_text(dr.one(objects, "ConfigMap", "dptrain-operator-config")["data"]
                      ["operator.yaml"])
    chosen = placements(load_config(config))
    profiles = values.get("acceleratorProfiles", {})
    assert chosen.gpu_name == profiles.get("gpu", "generic")
    assert chosen.tpu_name == profiles.get("tpu", "gke")
    if "trainer" in values:
        assert chosen.trainer.image == values["trainer"]["image"]
    deployment = dr.one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == values.get("replicas", 1)
