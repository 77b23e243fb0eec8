"""The base of every config section (``training.config`` composes them; ``data_pipeline.config``
holds the data sections): unknown keys are refused, and checks between a section's own fields
are its ``field_problems``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def field_problems(cls, fields: dict) -> list[tuple[str, str]]:
        """Checks between this section's own fields, as (field, message). ``fields`` are the ones
        that passed their type checks (a dict, not an instance), so a typo in one field does not
        hide an inconsistency between two others. Checks across sections: training.config_checks."""
        return []
