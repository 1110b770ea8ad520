"""The errors of the pattern engine: a bad rule document, and a rule set that contradicts itself."""

from __future__ import annotations

__all__ = ["RuleError", "RuleSetError"]


class RuleError(ValueError):
    """A rule document that is not valid. `path` names the bad part (`rules[0].steps[1].within`)
    so the rule service can answer INVALID_ARGUMENT with it; `str()` is `path: problem`."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class RuleSetError(ValueError):
    """A rule set the engine cannot apply: one version of a rule with two definitions, or a newer
    version that activates before an older one. Versions are immutable; a change is a new version."""
