"""The shipped presets and how a name on the command line (or in `hftl.run`) finds one.

recipes/configs/ in a checkout; a wheel carries them inside the package as hftl/configs/. Nothing heavy is imported.
"""
from __future__ import annotations

from pathlib import Path

PRESETS = next((p for p in (Path(__file__).resolve().parent / "configs", Path(__file__).resolve().parents[1] / "recipes" / "configs")
                if p.is_dir()), Path(__file__).resolve().parents[1] / "recipes" / "configs")
DEFAULT_CONFIG = PRESETS / "text" / "minilm_vader_full.yaml"


def load(config: str | None, overrides: list[str]):
    """The Config `hftl train CONFIG key=value ...` runs: CONFIG a path or a preset's name (None: the embedded default)."""
    from .config import load_config

    overrides = list(overrides)  # the caller's list stays as it was
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)  # `hftl train train.epochs=1` means: default preset + override
        config = None
    return load_config(preset(config) if config else DEFAULT_CONFIG, overrides)


def preset(config: str) -> Path:
    """A config path as given, else the preset it names: `recipes/configs/text/x.yaml` (or `text/x.yaml`) also works
    from an installed wheel, whose presets live inside the package."""
    path = Path(config)
    if path.exists():
        return path
    parts = path.parts[2:] if path.parts[:2] == ("recipes", "configs") else path.parts
    packaged = PRESETS.joinpath(*parts) if parts else None
    if packaged is not None and packaged.is_file():
        return packaged
    named = presets().get(config.removesuffix(".yaml")) if len(path.parts) == 1 else None  # a bare name: `hftl train minilm_sst2_lora`
    return named or path


def presets() -> dict[str, Path]:
    """Every shipped preset by its name (the file name without .yaml; the names are unique across the folders)."""
    return {p.stem: p for p in sorted(PRESETS.rglob("*.yaml"))}
