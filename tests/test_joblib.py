"""joblib's Parallel and scikit-learn's n_jobs spread over a pool's workers (sky.plugins.joblib / sklearn)."""

from __future__ import annotations

import os

import pytest

import sky_jupyter as sky

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`

joblib = pytest.importorskip("joblib")
sklearn = pytest.importorskip("sklearn")


def where(i: int) -> tuple[int, int]:
    import time

    time.sleep(0.2)  # long enough that one worker cannot take every batch
    return i, os.getpid()


@pytest.fixture(scope="module")
def sklearn_pool(tmp_path_factory):
    with sky.ComputePool(provider=sky.Local(root=tmp_path_factory.mktemp("joblib")), nodes=2,
                         plugins=[sky.plugins.sklearn()], name="joblib-two") as pool:
        yield pool


def test_parallel_runs_its_batches_on_every_worker_of_the_pool(sklearn_pool):
    pids = {w.handle.pid for w in sklearn_pool.workers}
    assert "scikit-learn" in sklearn_pool.image.pip and "joblib" in sklearn_pool.image.pip
    results = joblib.Parallel()(joblib.delayed(where)(i) for i in range(8))  # the pool's backend, n_jobs=-1
    assert [i for i, _ in results] == list(range(8))
    assert {pid for _, pid in results} == pids  # both nodes did work, none of it ran here
    assert os.getpid() not in pids


def test_a_grid_search_spread_over_two_nodes_finds_what_it_finds_here(sklearn_pool):
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    x, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 1, 10], "gamma": ["scale", 0.01]}
    remote = GridSearchCV(SVC(), grid, cv=3, n_jobs=-1).fit(x, y)
    with joblib.parallel_config(backend="sequential"):
        here = GridSearchCV(SVC(), grid, cv=3, n_jobs=1).fit(x, y)
    assert remote.best_params_ == here.best_params_
    assert remote.cv_results_["mean_test_score"].tolist() == here.cv_results_["mean_test_score"].tolist()


def test_an_error_in_a_batch_comes_back_with_its_type(sklearn_pool):
    def boom(i: int) -> int:
        if i == 3:
            raise KeyError(f"item {i}")
        return i

    with pytest.raises(KeyError, match="item 3"):
        joblib.Parallel()(joblib.delayed(boom)(i) for i in range(6))
    assert joblib.Parallel()(joblib.delayed(abs)(-i) for i in range(3)) == [0, 1, 2]  # the backend still works


def test_outside_a_running_pool_the_backend_says_what_is_missing(tmp_path):
    with sky.ComputePool(provider=sky.Local(root=tmp_path), nodes=1, plugins=[sky.plugins.joblib()],
                         name="joblib-gone"):
        pass
    with joblib.parallel_config(backend="sky"), pytest.raises(sky.ConfigError, match="no running pool"):
        joblib.Parallel()(joblib.delayed(abs)(i) for i in range(2))
    with pytest.raises(sky.ConfigError, match="non-zero whole number"):
        sky.plugins.joblib(n_jobs=0)
