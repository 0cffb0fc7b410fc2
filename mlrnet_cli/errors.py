"""The one error hierarchy of mlrnet: library code raises these, `cli.main` prints them as one line."""

from __future__ import annotations


class MlrnetError(Exception):
    """Base class: a problem the user can fix. `exit_code` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(MlrnetError):
    """Options that contradict each other or a stage that is not built: exit 2, like a parse error."""

    exit_code = 2


class ConfigError(MlrnetError):
    """A hyperparameter or option value out of range or malformed (e.g. `--noise uniform:1.5`)."""


class DataError(MlrnetError):
    """An input table that cannot be used: unreadable, empty, missing columns, too few rows."""


class ArtifactError(MlrnetError):
    """An artifact that is missing, truncated, foreign, or from a different run than its neighbours."""


class ArtifactExistsError(ArtifactError):
    """Refusing to replace an artifact made from different inputs (without `--overwrite`)."""


class FingerprintMismatchError(ArtifactError):
    """Two artifacts that should chain were made from different inputs."""


class ModelError(MlrnetError):
    """A model folder or hub id that cannot be loaded safely."""


class HubUnavailableError(MlrnetError):
    """The model/dataset hub could not be reached (offline machine)."""


class WorkspaceBusyError(MlrnetError):
    """Another run is writing the same outputs (its lock is held)."""


class Stage1MissingError(ArtifactError):
    """A stage that needs the stage-1 classifier (`train --method glc`) found no finished `collect-losses` run."""
