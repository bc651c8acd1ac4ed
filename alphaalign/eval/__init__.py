"""Safety evaluation (`alphaalign eval`): the safety suites, judging and rates, the utility hook, and the
refusal detector's accuracy on its labelled set."""
