"""The marker of a built twin (kvlab.models.twins): `kvlab_twin.json` in the twin's folder, written
last, so a folder with a current marker is a complete twin of that recipe."""

from __future__ import annotations

from kvlab.schema import Record


class TwinMarker(Record):
    KIND = "twin"
    twin_of: str  # the card's name
    hf_id: str | None
    recipe: str  # digest of the twin's config, recipe version and seed: another one is rebuilt
    kvlab_version: str
    seed: int
    params: int  # parameters of the random-weight model
    note: str = "random weights; the real model's layers and per-layer KV geometry"

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        return data if version == 0 else super().upgrade(data, version)  # the same keys before schema_version
