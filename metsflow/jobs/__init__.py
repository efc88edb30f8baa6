"""Job bodies run by the Snakemake scripts in ``scripts/``: one module per rule family.

A job processes a shard of studies; a failure of one study is recorded in the shard manifest
(status ``failed`` with the problem) and the QC tables, and the job goes on with the others.
"""
