"""The demo: a synthetic corpus with ground truth, a simulated labeller, and summaries measured against it.

Nothing outside this package (and the tests and benchmarks) reads ground truth or knows the demo exists; the
stages run on the demo exactly as on a user's shards, with the settings the demo writes into its own config
file. ``corpus.py`` renders the shards, ``run.py`` drives ``make demo``, ``safety.py`` / ``dedup.py`` /
``bias.py`` / ``audits.py`` hold each stage's demo settings and summary, ``synthetic_embeddings.py`` feeds the
dedup benchmarks.
"""
