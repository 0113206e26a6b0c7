"""Typed records: one pydantic model per JSON record kvlab writes, shared by its writer and readers.

Every record carries `schema_version`. `Record.write` goes through `kvlab.io` (atomic); `Record.read`
validates, accepts the previous layout where `upgrade` knows it, and otherwise refuses with a
one-line KvlabError naming the file and the version it found.

Figures say where they come from in the type: a field declared with `figure(...)` carries its
source (`measured`, `predicted`, `simulated`, `computed`, or `served` = measured on a real engine
and simulated on kvlab's simulator), read back with `Record.source_of(name, served)`
(`served`: what the run's engine makes such a figure, `kvlab.deploy.engines.served_source(engine)`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvlab.errors import KvlabError
from kvlab.io import write_json_atomic

Source = Literal["measured", "predicted", "simulated", "computed", "served"]
SOURCES: tuple[str, ...] = ("measured", "predicted", "simulated", "computed", "served")


def figure(source: Source, *, unit: str | None = None, description: str | None = None, default: Any = None) -> Any:
    """A record field that is a figure: its source (and unit) travel in the type's metadata."""
    extra = {"source": source} | ({"unit": unit} if unit else {})
    return Field(default=default, description=description, json_schema_extra=extra)


class RecordError(KvlabError):
    """A record file that is missing, torn, of another layout or invalid (one line, names the file)."""


class Part(BaseModel):
    """A typed part of a record (a record's nested object): strict keys, figures with sources."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @classmethod
    def source_of(cls, name: str, served: str | None = None) -> str | None:
        """The source a field declares (figure(...)); `served` said as `served` where given (what the
        run's engine makes it: kvlab.deploy.engines.served_source)."""
        field = cls.model_fields.get(name)
        extra = field.json_schema_extra if field is not None else None
        source = extra.get("source") if isinstance(extra, dict) else None
        return served if source == "served" and served else source

    @classmethod
    def unit_of(cls, name: str) -> str | None:
        field = cls.model_fields.get(name)
        extra = field.json_schema_extra if field is not None else None
        return extra.get("unit") if isinstance(extra, dict) else None

    @classmethod
    def figure_sources(cls) -> dict[str, str]:
        """Every field that declares a source -> that source (`served` unresolved)."""
        out = {}
        for name, field in cls.model_fields.items():
            extra = field.json_schema_extra
            if isinstance(extra, dict) and "source" in extra:
                out[name] = extra["source"]
        return out


class Record(Part):
    """Base of every JSON record. Subclasses set KIND (the file's role) and VERSION."""

    KIND: ClassVar[str] = "record"
    VERSION: ClassVar[int] = 1
    schema_version: int = 0  # set to VERSION by write(); 0 never appears in a written file

    # -- layout -------------------------------------------------------------------------------

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        """The previous layouts this type still reads, turned into the current one. By default
        none: a file without schema_version or of another version is refused."""
        raise RecordError(f"a {cls.KIND} record of schema_version {version} is not readable by this kvlab "
                          f"(it reads version {cls.VERSION}); rerun the step that wrote it")

    # -- reading and writing --------------------------------------------------------------------

    @classmethod
    def from_data(cls, data: Any, where: str = "record") -> Self:
        if not isinstance(data, dict):
            raise RecordError(f"{where}: a {cls.KIND} record must be a JSON object")
        version = data.get("schema_version", 0)
        if version != cls.VERSION:
            if not isinstance(version, int):
                raise RecordError(f"{where}: schema_version {version!r} is not a number")
            try:
                data = cls.upgrade(dict(data), version)
            except RecordError as e:
                raise RecordError(f"{where}: {e}") from None
            data["schema_version"] = cls.VERSION
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "(top)"
            raise RecordError(f"{where}: not a valid {cls.KIND} record (field {loc}: {first['msg']})") from None

    @classmethod
    def read(cls, path: str | os.PathLike) -> Self:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise RecordError(f"{path}: cannot read ({e.strerror or e})") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise RecordError(f"{path}: not a JSON record ({e})") from None
        return cls.from_data(data, str(path))

    @classmethod
    def read_optional(cls, path: str | os.PathLike) -> Self | None:
        """The record, or None where the file is missing or torn (a step that did not finish);
        a record of another layout still raises."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        return cls.from_data(data, str(path))

    def to_data(self) -> dict:
        return {**self.model_dump(mode="json"), "schema_version": self.VERSION}

    def write(self, path: str | os.PathLike) -> Path:
        return write_json_atomic(path, self.to_data())
