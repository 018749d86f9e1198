"""A reward function of your own, named in a recipe as ``examples.rl.rewards:date_digits``.

tunesmith calls it with the keywords it accepts: ``prompts``, ``completions``, ``references`` and
``completion_lengths`` (lists of the same length; a reference is None where the data has none), and
expects one number per completion. Run from the repository root, so the module path resolves.
"""


def date_digits(completions, references, **kwargs):
    """Partial credit for an ISO date: the share of the reference's characters that match, in place."""
    scores = []
    for completion, reference in zip(completions, references):
        answer = completion.strip()[: len(reference)]
        scores.append(sum(a == b for a, b in zip(answer, reference)) / len(reference))
    return scores
