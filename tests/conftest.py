"""Hypothesis profiles. ``mutants`` (used by .ci/mutants.py): derandomized and without the
example database, so that which planted bug a test catches does not depend on earlier
runs, and without shrinking (only whether a bug is caught matters there)."""

from hypothesis import Phase, settings

settings.register_profile("mutants", derandomize=True, database=None,
                          phases=[Phase.explicit, Phase.generate])
