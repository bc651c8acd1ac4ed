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


SEEN: list[dict] = []


def recording(prompts, completions, **columns):
    """len(completion) for each row; records what it was called with in SEEN."""
    SEEN.append({"prompts": list(prompts), "completions": list(completions), **columns})
    return [float(len(c)) for c in completions]


async def async_length(prompts, completions, scale: float = 1.0, **columns):
    """An async reward: scale · number of characters."""
    return [scale * len(c) for c in completions]


def label_only(prompts, completions, label, *, bonus: float = 1.0):
    """`bonus` for harmful rows, 0 for benign: a reward without **kwargs, named columns only."""
    return [bonus if lab == "harmful" else 0.0 for lab in label]


def completions_only(completions):
    """Takes one positional argument: not a valid reward."""
    return [0.0 for _ in completions]
