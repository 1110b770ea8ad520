"""One entry point for checking a stored definition, whatever its kind: the problem comes back as
(path, problem) so a service can answer INVALID_ARGUMENT naming the bad part."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streammesh.definitions.rule_errors import RuleError
from streammesh.definitions.rules import Rule, parse_rule
from streammesh.definitions.window_defs import WindowDef, WindowDefError, parse_window_def

__all__ = ["KINDS", "KIND_RULE", "KIND_WINDOW", "DefinitionProblem", "check_definition"]

KIND_RULE = "rule"
KIND_WINDOW = "window"
KINDS = (KIND_RULE, KIND_WINDOW)


class DefinitionProblem(ValueError):
    """A definition the engine could not run; `path` names the bad part (`definition.within`)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def check_definition(
    kind: str, document: Mapping[str, Any], where: str = "definition"
) -> Rule | WindowDef:
    """Parse `document` as the engine will; raise DefinitionProblem for the first bad part."""
    if kind == KIND_RULE:
        try:
            return parse_rule(document, where)
        except RuleError as error:
            raise DefinitionProblem(error.path, error.problem) from None
    elif kind == KIND_WINDOW:
        try:
            return parse_window_def(document, where)
        except WindowDefError as error:
            # The window parser's message is "<path>: <problem>".
            path, _, problem = str(error).partition(": ")
            raise DefinitionProblem(path, problem or str(error)) from None
    raise DefinitionProblem("kind", f"must be one of {', '.join(KINDS)}")
