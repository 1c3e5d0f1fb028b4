"""gptforge: train your own GPT from a folder of text, stage by stage."""

from pathlib import Path

__version__ = "0.1.0"

SAMPLE = "@sample"


def sample_data_dir() -> Path:
    """The bundled demo corpus (Tang/Song poems and Shakespeare; provenance in the README)."""
    return Path(__file__).resolve().parent / "sample_data"


def resolve_input(path: str) -> Path:
    """`@sample` names the bundled corpus; anything else is a filesystem path."""
    return sample_data_dir() if path == SAMPLE else Path(path)
