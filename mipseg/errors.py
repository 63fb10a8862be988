"""Errors that the command line reports as one clear line per problem and exit status 2."""

from __future__ import annotations

from collections.abc import Iterable


class InputError(Exception):
    """Bad user input: a missing or corrupt file, a wrong shape, a wrong dataset.json.

    Parameters
    ----------
    problems
        One human-readable line per problem, each naming the file (or value) it concerns.
    """

    def __init__(self, problems: str | Iterable[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if not self.problems:
            raise ValueError("InputError needs at least one problem")
        super().__init__("\n".join(self.problems))
