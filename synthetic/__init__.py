"""The rendered learning tasks, written as raw files like any dataset (`synthetic.tasks`), and their scorer.

shapes (VQA on rendered shapes), motion (a moving ball), digits (espeak-ng spoken digits). Nothing but
scripts and tests imports this package: the data reaches training through the shard builders.
"""
