"""Batch scoring of drug libraries (the `score` job kind, workers/kinds/score.py).

    shards.py       the score_shards table as a lease kind (app/leases.py claims, heartbeats,
                    reaps and republishes it like a job), shard creation and summaries
    source.py       which file shards read (a gzip library is decompressed once per job)
                    and which columns hold the SMILES and ids
    rdkit_child.py  row checks + RDKit canonicalisation; the loop of a pool child process
    canon.py        the pool of RDKit child processes (fresh interpreters over pipes)
    table.py        the output table: per-shard Parquet parts, the ordered merge, top-K
    runner.py       scoring one shard (read -> canonicalise -> tokenise -> forward ->
                    write), the shard Celery task, and the parent job's loop

A parent `score` job cuts the library into row blocks (shards), publishes one message per
shard on the job's queue, and then works through pending shards itself while any other
worker on the queue takes others: one worker finishes the job alone, N workers share it.
Shard state lives in SQL, so a lost worker costs only its unfinished shard.
"""
