"""User rewards (`module:function`) for tests: deliberately misbehaving or trivial."""

CALLS: list[int] = []


def infinite_on_call(prompts, completions, bad_call: int, **columns):
    """+inf for every completion on the `bad_call`-th call (1-based; 0 = every call), 0 otherwise."""
    CALLS.append(len(CALLS) + 1)
    bad = bad_call == 0 or len(CALLS) == bad_call
    return [float("inf") if bad else 0.0 for _ in completions]


def constant(prompts, completions, value: float, **kwargs):
    """`value` for every completion; extra recipe args (e.g. credentials) are accepted and ignored."""
    return [value for _ in completions]
