"""A stage-1 run with cluster.subspace=phantom-parts: it clusters in the phantom part directions,
and predict reads the run as any other (the subspace is one PCA-whitening map)."""

from __future__ import annotations

import pytest

from bonecluster.data import prepare_sources
from bonecluster.engine import DeepClusterEngine
from bonecluster.names import save_cluster_names
from bonecluster.predict import Predictor
from tests.integration.methods.conftest import method_config, phantoms, train_method  # noqa: F401 (a fixture)

SUBSPACE = ["cluster.subspace=phantom-parts", "cluster.subspace_films=70", "data.workers=1", "train.device=cpu"]


@pytest.mark.parametrize("method, epochs", [("simclr", 0), ("deepcluster", 2)])
def test_a_run_clusters_in_at_most_six_phantom_part_dimensions(phantoms, tmp_path, method, epochs):
    extra = ["selfsup.epochs=0"] if method == "simclr" else []
    cfg = method_config(method, epochs, *SUBSPACE, *extra)
    run = tmp_path / "run"
    _, _, trained = train_method(phantoms, run / "stage1", cfg)
    assert trained.pca.output_dim == 6 and trained.centroids.shape == (7, 6)
    assert len(trained.assignments) == 56 and len(set(trained.assignments.tolist())) > 1
    data = prepare_sources([phantoms], cfg.data, cache=tmp_path / "cache", progress=False)
    save_cluster_names(run / "stage1", {})   # what the pipeline writes next to the model
    predictions = Predictor(run).predict(data)
    assert [p.cluster for p in predictions] == trained.assignments.tolist()


def test_a_misspelt_subspace_is_refused_before_training(tmp_path):
    cfg = method_config("simclr", 0, "cluster.subspace=phantom-part")
    with pytest.raises(ValueError, match="cluster.subspace='phantom-part'.*phantom-parts"):
        DeepClusterEngine(cfg, tmp_path / "run", progress=False)
