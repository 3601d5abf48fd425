import os
import shutil
import tempfile

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The test session writes nothing into the user's cache: converted models, tokenizers and SVD factors
# go to one temporary folder for the session, made by the first process (xdist's workers inherit it)
# and removed at its end.
if "TINYLAB_TEST_CACHE" not in os.environ:
    os.environ["TINYLAB_TEST_CACHE"] = tempfile.mkdtemp(prefix="tinylab-test-cache-")
    os.environ["TINYLAB_TEST_CACHE_OWNER"] = str(os.getpid())
os.environ["TINYLAB_CACHE"] = os.environ["TINYLAB_TEST_CACHE"]
# Trackio reads TRACKIO_DIR once, when it is first imported (importing trl imports it): every Trackio
# run of the session goes into that folder too, never into ~/.cache/huggingface/trackio.
os.environ["TRACKIO_DIR"] = os.path.join(os.environ["TINYLAB_TEST_CACHE"], "trackio")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models run fastest on one thread

pytest_plugins = ["fresh_process"]  # tests marked fresh_process run alone in a fresh child process


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct (converted once into the cache)."""
    from tinylab.model.loading import load_model

    return load_model()


@pytest.fixture
def gpu_stand_in():
    """The stand-in for a GPU model on these CPU-only machines: a context manager making torch's
    default device "meta" while the model stays on the CPU. A tensor made without an explicit
    device then lands on meta and the step fails, as a CPU tensor would beside a CUDA model.

        def test_x(gpu_stand_in):
            model, tok = tiny_model("llama", dtype=torch.bfloat16)
            with gpu_stand_in():
                evaluate(model, tok, task, n=4)
    """
    return lambda: torch.device("meta")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run the same steps on CUDA: skipped where there is none (run them with `pytest -m gpu`)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    """The process that made the session's cache folder removes it (not xdist's workers, nor the
    child processes of fresh_process tests)."""
    if os.environ.get("TINYLAB_TEST_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["TINYLAB_TEST_CACHE"], ignore_errors=True)
