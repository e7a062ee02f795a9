"""`make plots` and `make compare`: read test-matrix directories and write plots, report.md and a fairness audit.

runs.py loads a directory into typed records (compare.py joins several;
inference.py reads what `make bench-inference` measured for a run),
stats.py (means, Student-t intervals, paired differences) and curves.py
aggregate over seeds, plots.py draws, audit.py checks that compared arms
differ only in their intended axis, markdown.py writes report.md and
build.py ties them together.
"""
