"""docs/config.md is generated from the config schema; it must match what the generator writes now."""
from dataclasses import dataclass

from fastserve.cli.config_reference import DEFAULT_OUT, field_comments, reference


def test_docs_config_md_is_current():
    assert DEFAULT_OUT.read_text() == reference(), (
        "docs/config.md is stale: run `python -m fastserve.cli.config_reference --write`")


@dataclass
class _Example:
    plain: int = 1
    # a comment above a field without its own
    above: int = 2
    trailing: str = "x"   # first line
                          # continued under it
    other: float = 0.5    # its own


def test_field_comments_reads_trailing_continued_and_above_comments():
    assert field_comments(_Example) == {"plain": "", "above": "a comment above a field without its own",
                                        "trailing": "first line continued under it", "other": "its own"}


def test_reference_lists_every_registered_family_and_section():
    from fastserve import registry

    text = reference()
    for kind, names in registry.KINDS.items():
        for name in names:
            assert f": {name}`" in text, (kind, name)
    for section in ("train", "mesh", "checkpoint", "serve", "export", "optimizer"):
        assert f"## `{section}`" in text
    assert "| `optimizer.learning_rate` |" in text
